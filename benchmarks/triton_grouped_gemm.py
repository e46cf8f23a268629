"""Probe: can a plain Triton grouped GEMM beat torch's grouped_mm on the expert matmuls' forward?

    python benchmarks/triton_grouped_gemm.py [--reps 20] [--check]

v9 found grouped_mm's forwards at 0.76-0.82 of one cuBLAS matmul of the same FLOPs
(NOTES.md). This times, per shape and layer (gate_up, down) and per direction (the forward
x_sorted @ W_e^T and the input gradient grad @ W_e, which share the kernel with other strides):
one cuBLAS matmul over all rows (the ideal), grouped_mm, and an M-grouped Triton kernel whose
tile-to-expert table is built on the device (no host sync), autotuned over a few configurations.
`--check` compares the kernel with grouped_mm first (also on CPU, through TRITON_INTERPRET=1).
An experiment: nothing in vlmoe uses this kernel unless it wins.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BLOCK_M = 128


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 2}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ]


@triton.autotune(configs=_configs(), key=["N", "K", "stride_bk"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _grouped_gemm_kernel(
    a,
    b,
    out,
    tile_expert,
    tile_row,
    expert_end,
    num_m_tiles,
    N,
    K,
    stride_be,
    stride_bk,
    stride_bn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    # out[r, n] = sum_k a[r, k] * b[e(r), k, n] for rows r of expert e's segment.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    # Groups of GROUP_M row tiles sweep the columns together, so a weight tile stays in L2.
    group = pid // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m_tiles - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_size
    pid_n = (pid % (GROUP_M * num_n)) // group_size
    expert = tl.load(tile_expert + pid_m)
    if expert < 0:
        return
    row_start = tl.load(tile_row + pid_m)
    row_end = tl.load(expert_end + expert)
    rows = row_start + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < row_end
    a_ptrs = a + rows[:, None].to(tl.int64) * K + ks[None, :]
    b_ptrs = b + expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a_tile = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b_tile = tl.load(b_ptrs, mask=cols[None, :] < N, other=0.0)
        else:
            k_ok = (k0 + ks) < K
            a_tile = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b_tile = tl.load(b_ptrs, mask=k_ok[:, None] & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a_tile, b_tile, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_bk
    out_ptrs = out + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out.dtype.element_ty), mask=row_ok[:, None] & (cols[None, :] < N))


def tile_table(counts: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Row tiles of BLOCK_M rows that never cross an expert boundary, built on the device.
    Returns (expert of each tile or -1, first row of each tile, end row of each expert, tiles)."""
    num_experts = counts.numel()
    max_tiles = triton.cdiv(num_rows, BLOCK_M) + num_experts
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    tile_end = torch.cumsum(tiles, 0)
    ends = torch.cumsum(counts, 0)
    index = torch.arange(max_tiles, device=counts.device)
    expert = torch.searchsorted(tile_end, index, right=True)
    valid = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    first_tile = tile_end[expert] - tiles[expert]
    row = (ends[expert] - counts[expert]) + (index - first_tile) * BLOCK_M
    return (
        torch.where(valid, expert, -1).to(torch.int32),
        row.to(torch.int32),
        ends.to(torch.int32),
        max_tiles,
    )


def grouped_gemm(
    a: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, transpose_weight: bool
) -> torch.Tensor:
    """Rows of expert e: a @ weight[e].T (transpose_weight, the forward) or a @ weight[e] (the
    input gradient). a # [S, K] sorted by expert; weight # [E, O, I]."""
    tile_expert, tile_row, ends, num_m_tiles = tile_table(counts, a.shape[0])
    if transpose_weight:  # b[e, k, n] = weight[e, n, k]
        n, stride_bk, stride_bn = weight.shape[1], weight.stride(2), weight.stride(1)
    else:  # b[e, k, n] = weight[e, k, n]
        n, stride_bk, stride_bn = weight.shape[2], weight.stride(1), weight.stride(2)
    out = a.new_empty(a.shape[0], n)

    def grid(meta):
        return (num_m_tiles * triton.cdiv(n, meta["BLOCK_N"]),)

    _grouped_gemm_kernel[grid](
        a, weight, out, tile_expert, tile_row, ends, num_m_tiles, n, a.shape[1],
        weight.stride(0), stride_bk, stride_bn, BLOCK_M=BLOCK_M,
    )  # fmt: skip
    return out


def check(device: str) -> None:
    from vlmoe.moe.dispatch import _experts_mm, _experts_mm_grad_input

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    counts_list = [150, 0, 37, 300] if device == "cuda" else [5, 0, 9, 3]
    counts = torch.tensor(counts_list, device=device)
    rows, fan_in, fan_out = sum(counts_list), 80, 96  # not multiples of BLOCK_K: the masked loop
    x = torch.randn(rows, fan_in, device=device, dtype=dtype)
    grad = torch.randn(rows, fan_out, device=device, dtype=dtype)
    weight = torch.randn(4, fan_out, fan_in, device=device, dtype=dtype)
    forward = grouped_gemm(x, weight, counts, transpose_weight=True)
    wanted = _experts_mm(x.double(), weight.double(), None, tuple(counts_list))
    grad_x = grouped_gemm(grad, weight, counts, transpose_weight=False)
    wanted_grad = _experts_mm_grad_input(grad.double(), weight.double(), None, tuple(counts_list))
    for name, got, ref in (("forward", forward, wanted), ("grad input", grad_x, wanted_grad)):
        error = float((got.double() - ref).norm() / ref.norm())
        print(f"check {name}: relative error {error:.2e}")
        assert error < 1e-2, name


def _time_layer(x, grad, weight, offsets, counts, reps: int) -> dict:
    from common import time_cuda
    from vlmoe.moe.dispatch import _grouped_mm

    dense_w = weight[0].clone()  # one matmul over all rows: the same FLOPs
    methods = {
        ("forward", "one cuBLAS matmul"): lambda: x @ dense_w.t(),
        ("forward", "grouped_mm"): lambda: _grouped_mm(x, weight.transpose(-2, -1), offs=offsets),
        ("forward", "triton grouped"): lambda: grouped_gemm(x, weight, counts, True),
        ("grad input", "one cuBLAS matmul"): lambda: grad @ dense_w,
        ("grad input", "grouped_mm"): lambda: _grouped_mm(grad, weight, offs=offsets),
        ("grad input", "triton grouped"): lambda: grouped_gemm(grad, weight, counts, False),
    }
    with torch.no_grad():
        return {key: time_cuda(run, reps=reps) for key, run in methods.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        check("cpu")
        return
    check("cuda")
    if args.check:
        return
    from common import print_table, write_json
    from gemm_efficiency import _counts
    from moe_layer import DTYPE, FFN_SHAPES

    torch.manual_seed(0)
    rows = []
    for tokens, hidden, intermediate, num_experts, top_k in FFN_SHAPES:
        counts_list = _counts(tokens, num_experts, top_k)
        counts = torch.tensor(counts_list, device="cuda")
        offsets = counts.cumsum(0).to(torch.int32)
        slots = sum(counts_list)
        shape = f"({tokens}, {hidden}, {intermediate}, {num_experts}, {top_k})"
        for layer, fan_in, fan_out in (("gate_up", hidden, 2 * intermediate), ("down", intermediate, hidden)):
            weight = torch.randn(num_experts, fan_out, fan_in, device="cuda", dtype=DTYPE) * 0.02
            x = torch.randn(slots, fan_in, device="cuda", dtype=DTYPE)
            grad = torch.randn(slots, fan_out, device="cuda", dtype=DTYPE)
            start = time.perf_counter()
            grouped_gemm(x, weight, counts, True)
            grouped_gemm(grad, weight, counts, False)
            torch.cuda.synchronize()
            tune_s = time.perf_counter() - start
            for (direction, name), ms in _time_layer(x, grad, weight, offsets, counts, args.reps).items():
                rows.append(
                    {"shape": shape, "layer": layer, "direction": direction, "method": name, "ms": ms}
                )
                print(f"  {shape} {layer} {direction} {name}: {ms:.3f} ms", flush=True)
            print(f"  autotune + compile: {tune_s:.1f} s", flush=True)
            del weight, x, grad
            torch.cuda.empty_cache()
    for row in rows:
        ideal = next(
            r
            for r in rows
            if (r["shape"], r["layer"], r["direction"]) == (row["shape"], row["layer"], row["direction"])
        )
        row["ratio_to_cublas"] = ideal["ms"] / row["ms"]
    write_json("triton_grouped_gemm", rows)
    print_table(
        "expert matmuls, forward and input gradient alone; ratio = one cuBLAS matmul ms / method ms",
        ["shape (T, d, ff, E, k)", "layer", "direction", "method", "ms", "ratio"],
        [
            [
                r["shape"],
                r["layer"],
                r["direction"],
                r["method"],
                f"{r['ms']:.3f}",
                f"{r['ratio_to_cublas']:.3f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
