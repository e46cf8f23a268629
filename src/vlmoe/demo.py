"""The smallest end-to-end job the core can do: upcycle, train with the balance loss, report.

A dense SwiGLU FFN is fitted to a target made of 4 different linear maps, one per input
cluster; upcycling it into 4 experts (top-2) lets the router split the clusters, so the sparse
model reaches a lower held-out loss than the dense one trained for the same steps.
"""

from __future__ import annotations

import time

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from torch import nn

from vlmoe.moe import MoEFeedForward, aux_loss, record_routing, routing_records


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _task(num: int, hidden: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(4, hidden, generator=generator) * 2
    maps = torch.randn(4, hidden, hidden, generator=generator) / hidden**0.5
    cluster = torch.randint(0, 4, (num,), generator=generator)
    x = centres[cluster] + 0.5 * torch.randn(num, hidden, generator=generator)
    return x, torch.einsum("nd,nde->ne", x, maps[cluster])


def _train(model: nn.Module, x, y, steps: int, progress: Progress, label: str) -> float:
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    task = progress.add_task(label, total=steps)
    loss = torch.tensor(0.0)
    for step in range(steps):
        batch = torch.randint(0, x.shape[0], (256,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        (loss + aux_loss(model)).backward()
        optimiser.step()
        optimiser.zero_grad()
        progress.update(task, advance=1, description=f"{label} loss {loss.item():.4f}")
    return float(loss.detach())


def run_core_demo(steps: int = 600, seed: int = 0, device: str = "cpu") -> dict[str, float]:
    console = Console()
    torch.manual_seed(seed)
    hidden, intermediate = 16, 16
    x, y = _task(10240, hidden, torch.Generator().manual_seed(seed))
    x, y, x_test, y_test = (t.to(device) for t in (x[:8192], y[:8192], x[8192:], y[8192:]))

    dense = _SwiGLU(hidden, intermediate).to(device)
    with Progress(console=console, transient=True) as progress:
        _train(dense, x, y, steps // 3, progress, "dense warm-up")
        moe = MoEFeedForward.from_dense(dense, num_experts=4, top_k=2, load_balance_coef=0.01).to(device)
        with torch.no_grad():
            upcycle_gap = float((moe(x_test) - dense(x_test)).abs().max())
        start = time.perf_counter()
        _train(dense, x, y, steps, progress, "dense")
        _train(moe, x, y, steps, progress, "MoE top-2 of 4")
        seconds = time.perf_counter() - start

    with torch.no_grad(), record_routing(moe):
        dense_loss = float(nn.functional.mse_loss(dense(x_test), y_test))
        moe_loss = float(nn.functional.mse_loss(moe(x_test), y_test))
        load = routing_records(moe)[""].tokens_per_expert().float()
    load = (load / load.sum()).tolist()

    table = Table(title=f"vlmoe core demo: dense FFN vs its top-2-of-4 upcycled MoE, {steps} more steps each")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("max |MoE - dense| right after upcycling", f"{upcycle_gap:.2e}")
    table.add_row("held-out MSE, predicting the mean", f"{float(y_test.var()):.4f}")
    table.add_row("held-out MSE, dense", f"{dense_loss:.4f}")
    table.add_row("held-out MSE, MoE", f"{moe_loss:.4f}")
    table.add_row("expert load (share of slots)", " ".join(f"{share:.2f}" for share in load))
    table.add_row("training time (s)", f"{seconds:.1f}")
    console.print(table)
    return {"upcycle_gap": upcycle_gap, "dense_loss": dense_loss, "moe_loss": moe_loss}
