"""The passes that move token rows to and from expert order, each against its torch baseline.

At the performance issue's three shapes (tokens, d, E, k), in one process:
- gather: x.index_select(0, sorted_tokens) (torch, row by row in sorted order) against
  `spread_rows_triton` (token by token, each row read once for its k copies);
- gather-sum: the combine kernel `gather_sum_triton`, the same traffic the other way, as the
  bandwidth yardstick;
- routing: the router (gate, softmax, top-k, balance loss) and the dispatch plan, forward and
  backward, with the torch top-k chain (the baseline) and with `topk_softmax`'s kernels; GPU time
  in kernels from the profiler (alone, this step is host-bound; in the layer the GEMMs hide the
  host). The plan takes the counting sort in both rows (`vlmoe.moe.kernels.plan`).
Bandwidth counts the bytes each pass must move (one read of the token rows, one write of the
sorted rows, or the reverse), so a pass that reads a row k times shows below the others.

    python benchmarks/row_moves.py [--reps 50]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from common import kernel_time, print_table, time_cuda, write_json
from vlmoe.moe.dispatch import plan_dispatch
from vlmoe.moe.kernels.combine import gather_sum_triton, spread_rows_triton
from vlmoe.moe.kernels.plan import sort_slots_reference, sort_slots_triton
from vlmoe.moe.router import Router, RouterConfig, Routing

SHAPES = [(16384, 2048, 4, 2), (8192, 4096, 8, 2), (16384, 2048, 64, 6)]


def _routing(tokens: int, num_experts: int, top_k: int) -> Routing:
    logits = torch.randn(tokens, num_experts, device="cuda")
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    return Routing(indices, weights, probs, logits)


def _row_passes(x, plan, sorted_rows, weights) -> dict:
    top_k = plan.top_k
    return {
        "gather, index_select": lambda: x.index_select(0, plan.sorted_tokens),
        "gather, spread_rows": lambda: spread_rows_triton(x, plan.slot_rows, top_k),
        "gather_sum (combine)": lambda: gather_sum_triton(sorted_rows, plan.slot_rows, weights, top_k),
    }


def _routing_step(router, x, grad_weights):
    """The router and the dispatch plan as the layer runs them, forward and backward."""

    def step():
        routing = router(x)
        plan_dispatch(routing)
        loss = (routing.combine_weights * grad_weights).sum() + sum(routing.aux_losses.values())
        loss.backward()

    return step


def _kernel_time(step) -> tuple[float, float]:
    """(GPU ms in kernels, kernel launches) per step: the router is too small to fill the GPU,
    so its wall time is the host's, which the layer's GEMMs hide."""
    return kernel_time(step, reps=5)


def _routing_rows(tokens, hidden, num_experts, top_k, reps) -> dict[str, tuple[float, float]]:
    from vlmoe.moe import router as router_module

    config = RouterConfig(num_experts=num_experts, top_k=top_k, load_balance_coef=0.01)
    router = Router(hidden, config).cuda().to(torch.bfloat16)
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad_weights = torch.randn(tokens, top_k, device="cuda")
    times = {}
    saved = router_module.FUSED_TOPK
    try:
        for fused in (False, True):
            router_module.FUSED_TOPK = fused
            name = "routing + plan, fused top-k" if fused else "routing + plan, torch top-k"
            times[name] = _kernel_time(_routing_step(router, x, grad_weights))
    finally:
        router_module.FUSED_TOPK = saved
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    rows, json_rows = [], []
    for tokens, hidden, num_experts, top_k in SHAPES:
        torch.manual_seed(0)
        plan = plan_dispatch(_routing(tokens, num_experts, top_k))
        x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
        sorted_rows = torch.randn(tokens * top_k, hidden, device="cuda", dtype=torch.bfloat16)
        weights = torch.rand(tokens, top_k, device="cuda")
        assert torch.equal(
            spread_rows_triton(x, plan.slot_rows, top_k), x.index_select(0, plan.sorted_tokens)
        )
        moved = (tokens + tokens * top_k) * hidden * x.element_size()  # bytes each pass must move
        passes = _row_passes(x, plan, sorted_rows, weights)
        times = {name: time_cuda(step, warmup=5, reps=args.reps) for name, step in passes.items()}
        for name, ms in times.items():
            tb_per_s = moved / (ms * 1e-3) / 1e12
            ratio = times["gather, index_select"] / ms
            shape = f"({tokens}, {hidden}, {num_experts}, {top_k})"
            rows.append([shape, name, f"{ms:.3f}", f"{tb_per_s:.2f}", f"{ratio:.2f}"])
            json_rows.append(
                dict(tokens=tokens, hidden=hidden, experts=num_experts, top_k=top_k, name=name,
                     ms=ms, tb_per_s=tb_per_s, speedup_vs_index_select=ratio)
            )  # fmt: skip
        shape = f"({tokens}, {hidden}, {num_experts}, {top_k})"
        keys = plan.row_experts.long()[plan.slot_rows]  # the slots' experts, in slot order
        sorts = {
            "plan, torch sort": partial(sort_slots_reference, keys, num_experts, top_k),
            "plan, counting sort": partial(sort_slots_triton, keys, num_experts, top_k),
        }
        sort_times = {name: _kernel_time(step) for name, step in sorts.items()}
        routing_times = sort_times | _routing_rows(tokens, hidden, num_experts, top_k, args.reps)
        for name, (ms, launches) in routing_times.items():
            baseline = routing_times[
                "plan, torch sort" if name.startswith("plan") else "routing + plan, torch top-k"
            ][0]
            rows.append(
                [shape, f"{name} (kernels, {launches:.0f} launches)", f"{ms:.3f}", "", f"{baseline / ms:.2f}"]
            )
            json_rows.append(
                dict(tokens=tokens, hidden=hidden, experts=num_experts, top_k=top_k, name=name,
                     kernel_ms=ms, launches=launches, speedup_vs_torch=baseline / ms)
            )  # fmt: skip
    print_table(
        f"row moves, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        ["(T, d, E, k)", "pass", "ms", "TB/s moved", "x baseline"],
        rows,
    )
    write_json("row_moves", json_rows)


if __name__ == "__main__":
    main()
