"""Where the MoE FFN loses to the dense one: each of its two expert matmuls alone, fwd and fwd+bwd.

    python benchmarks/gemm_efficiency.py [--reps 20]

For the performance issue's three shapes (T, d, ff, E, k), S = T * k token-slots sorted by
expert with a random top-k routing's segment lengths. Each layer of the expert FFN (gate_up:
S x d -> 2ff; down: S x ff -> d) runs as:
- dense: one nn.Linear-style matmul over all S rows (cuBLAS), the dense-equivalent's GEMM;
- grouped [E,N,K]: `grouped_mm` on the weight's nn.Linear layout (vlmoe's `grouped` backend);
- grouped [E,K,N]: `grouped_mm` on a weight stored transposed (would the other layout be faster?);
- segments: one cuBLAS matmul per expert on host-known counts (vlmoe's `segments` backend).
Prints ms and TFLOP/s; writes gemm_efficiency.json. Equal FLOPs in every row of a layer.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, time_cuda, write_json
from moe_layer import DTYPE, FFN_SHAPES
from vlmoe.moe.dispatch import _grouped_mm, segment_linear


def _counts(tokens: int, num_experts: int, top_k: int) -> list[int]:
    chosen = torch.rand(tokens, num_experts, device="cuda").topk(top_k, dim=-1).indices
    return torch.bincount(chosen.flatten(), minlength=num_experts).tolist()


def _variants(x, fan_out: int, num_experts: int, counts: list[int], offsets) -> dict:
    """name -> (forward, leaves) for one layer; weights random, shaped as the layer's."""
    fan_in = x.shape[-1]
    dense_w = (torch.randn(fan_out, fan_in, device="cuda", dtype=DTYPE) * 0.02).requires_grad_()
    expert_w = torch.randn(num_experts, fan_out, fan_in, device="cuda", dtype=DTYPE) * 0.02
    expert_w.requires_grad_()
    kn_w = expert_w.detach().transpose(-2, -1).contiguous().requires_grad_()
    return {
        "dense (one cuBLAS matmul)": (lambda: F.linear(x, dense_w), [x, dense_w]),
        "grouped_mm, weight [E,N,K]": (
            lambda: _grouped_mm(x, expert_w.transpose(-2, -1), offs=offsets),
            [x, expert_w],
        ),
        "grouped_mm, weight [E,K,N]": (lambda: _grouped_mm(x, kn_w, offs=offsets), [x, kn_w]),
        "segments (cuBLAS per expert)": (lambda: segment_linear(x, expert_w, counts), [x, expert_w]),
    }


def _step(forward, leaves, grad_out):
    def run_backward() -> None:
        for leaf in leaves:
            leaf.grad = None
        forward().backward(grad_out)

    return run_backward


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for tokens, hidden, intermediate, num_experts, top_k in FFN_SHAPES:
        counts = _counts(tokens, num_experts, top_k)
        slots = sum(counts)
        offsets = torch.tensor(counts, device="cuda").cumsum(0).to(torch.int32)
        shape = f"({tokens}, {hidden}, {intermediate}, {num_experts}, {top_k})"
        for layer, fan_in, fan_out in (("gate_up", hidden, 2 * intermediate), ("down", intermediate, hidden)):
            x = torch.randn(slots, fan_in, device="cuda", dtype=DTYPE, requires_grad=True)
            grad_out = torch.randn(slots, fan_out, device="cuda", dtype=DTYPE)
            variants = _variants(x, fan_out, num_experts, counts, offsets)
            flops = 2 * slots * fan_in * fan_out
            for name, (forward, leaves) in variants.items():
                with torch.no_grad():
                    fwd_ms = time_cuda(forward, reps=args.reps)
                total_ms = time_cuda(_step(forward, leaves, grad_out), reps=args.reps)
                rows.append(
                    {
                        "shape": shape,
                        "layer": layer,
                        "method": name,
                        "fwd_ms": fwd_ms,
                        "fwd_bwd_ms": total_ms,
                        "fwd_tflops": flops / fwd_ms / 1e9,
                        "fwd_bwd_tflops": 3 * flops / total_ms / 1e9,
                    }
                )
                print(f"  {shape} {layer} {name}: fwd {fwd_ms:.3f} ms, fwd+bwd {total_ms:.3f} ms", flush=True)
            del x, grad_out, variants
            torch.cuda.empty_cache()
    for row in rows:
        dense = next(r for r in rows if r["shape"] == row["shape"] and r["layer"] == row["layer"])
        row["ratio_to_dense"] = dense["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    write_json("gemm_efficiency", rows)
    print_table(
        "expert matmuls alone, bf16; ratio = dense fwd+bwd ms / method fwd+bwd ms",
        ["shape (T, d, ff, E, k)", "layer", "method", "fwd ms", "fwd+bwd ms", "TFLOP/s", "ratio"],
        [
            [
                r["shape"],
                r["layer"],
                r["method"],
                f"{r['fwd_ms']:.3f}",
                f"{r['fwd_bwd_ms']:.3f}",
                f"{r['fwd_bwd_tflops']:.0f}",
                f"{r['ratio_to_dense']:.3f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
