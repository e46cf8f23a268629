"""The passes that move token rows to and from expert order, each against its torch baseline.

At the performance issue's three shapes (tokens, d, E, k), in one process:
- gather: x.index_select(0, sorted_tokens) (torch, row by row in sorted order) against
  `spread_rows_triton` (token by token, each row read once for its k copies);
- gather-sum: the combine kernel `gather_sum_triton`, the same traffic the other way, as the
  bandwidth yardstick;
- routing: the router's softmax/top-k/balance loss and the dispatch plan, forward and backward,
  as `MoEFeedForward` runs them (NOTES.md, session 9).
Bandwidth counts the bytes each pass must move (one read of the token rows, one write of the
sorted rows, or the reverse), so a pass that reads a row k times shows below the others.

    python benchmarks/row_moves.py [--reps 50]
"""

from __future__ import annotations

import argparse

import torch

from common import print_table, time_cuda, write_json
from vlmoe.moe.dispatch import plan_dispatch
from vlmoe.moe.kernels.combine import gather_sum_triton, spread_rows_triton
from vlmoe.moe.router import Routing

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
    print_table(
        f"row moves, bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}",
        ["(T, d, E, k)", "pass", "ms", "TB/s moved", "x index_select"],
        rows,
    )
    write_json("row_moves", json_rows)


if __name__ == "__main__":
    main()
