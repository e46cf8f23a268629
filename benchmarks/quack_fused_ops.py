"""Probe: each step of the fused SwiGLU experts (v17) against the steps it replaces.

    python benchmarks/quack_fused_ops.py [--reps 20]      # both paths, step by step
    python benchmarks/quack_fused_ops.py --epilogues      # QuACK's gated and dgated GEMMs

`dispatch.combined_glu` puts the SwiGLU in the first GEMM's epilogue and pairs gate and up
columns (QuACK's concat_layout) through the backward. Per shape, every step of both paths is
timed alone, with each of quack_gemm's candidate tiles, beside one cuBLAS matmul of the same
FLOPs. `--epilogues` times QuACK's gated forward and its dgated backward (the SwiGLU gradient
in the epilogue, SonicMoE's design, which vlmoe measured and does not use: NOTES.md v17) over
more tiles, with and without the gather and the row reduction.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, time_cuda, write_json
from vlmoe.moe.kernels import quack_gemm
from vlmoe.moe.kernels.swiglu import swiglu_backward_triton, swiglu_forward_triton, swiglu_pairs_backward

SHAPES = [(16384, 2048, 5632, 4, 2), (8192, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6)]


def _problem(tokens, hidden, intermediate, num_experts, top_k):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    slot_experts = torch.rand(tokens, num_experts, device=dev).topk(top_k, dim=-1).indices.reshape(-1)
    _, sorted_slots = torch.sort(slot_experts.to(torch.int32), stable=True)
    counts = torch.bincount(slot_experts, minlength=num_experts)
    offsets = counts.cumsum(0).to(torch.int32)
    sorted_tokens = sorted_slots // top_k
    rows = tokens * top_k
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, device=dev, dtype=dt) * 0.02
    down = torch.randn(num_experts, hidden, intermediate, device=dev, dtype=dt) * 0.02
    grad_tokens = torch.randn(tokens, hidden, device=dev, dtype=dt)
    row_scale = torch.rand(rows, device=dev)
    return dict(
        x=x,
        gate_up=gate_up,
        down=down,
        offsets=offsets,
        sorted_tokens=sorted_tokens,
        grad_tokens=grad_tokens,
        row_scale=row_scale,
        rows=rows,
    )


def _steps(p):
    """(name, path, flops, step) for each call of the fused and the unfused path."""
    x, gate_up, down, offsets, tokens = p["x"], p["gate_up"], p["down"], p["offsets"], p["sorted_tokens"]
    rows, hidden, width = p["rows"], x.shape[1], gate_up.shape[1]
    scale, grad_tokens = p["row_scale"], p["grad_tokens"]
    mm, grad_input, grad_weight = (
        quack_gemm.experts_mm,
        quack_gemm.experts_mm_grad_input,
        quack_gemm.experts_mm_grad_weight,
    )
    x_sorted = x.index_select(0, tokens)
    preact, hidden_rows = quack_gemm.experts_swiglu(x, gate_up, offsets, tokens)
    gate_up_rows = mm(x, gate_up, offsets, token_rows=tokens)
    grad_sorted = grad_tokens.index_select(0, tokens)
    grad_hidden = grad_input(grad_sorted, down, offsets)
    first = 2 * rows * hidden * width
    second = rows * hidden * width  # 2 * rows * hidden * F
    return [
        ("gate_up forward + SwiGLU (epilogue)", "fused", first,
         lambda: quack_gemm.experts_swiglu(x, gate_up, offsets, tokens)),
        ("gate_up forward (gathered)", "unfused", first, lambda: mm(x, gate_up, offsets, token_rows=tokens)),
        ("SwiGLU pass, row scale", "unfused", 0, lambda: swiglu_forward_triton(gate_up_rows, scale)),
        ("down forward", "both", second, lambda: mm(hidden_rows, down, offsets)),
        ("gather output gradient", "both", 0, lambda: grad_tokens.index_select(0, tokens)),
        ("down grad input", "both", second, lambda: grad_input(grad_sorted, down, offsets)),
        ("SwiGLU backward pass, pairs, w * hidden out", "fused", 0,
         lambda: swiglu_pairs_backward(preact, grad_hidden.clone(), scale)),
        ("SwiGLU backward pass", "unfused", 0,
         lambda: swiglu_backward_triton(gate_up_rows, grad_hidden, row_scale=scale)),
        ("down grad weight", "both", second, lambda: grad_weight(grad_sorted, hidden_rows, down, offsets)),
        ("gate_up grad weight (interleaved)", "fused", first,
         lambda: grad_weight(preact, x_sorted, gate_up, offsets, interleaved=True)),
        ("gate_up grad weight", "unfused", first,
         lambda: grad_weight(gate_up_rows, x_sorted, gate_up, offsets)),
        ("gate_up grad input (interleaved)", "fused", first,
         lambda: grad_input(preact, gate_up, offsets, interleaved=True)),
        ("gate_up grad input", "unfused", first, lambda: grad_input(gate_up_rows, gate_up, offsets)),
        ("re-gather x", "both", 0, lambda: x.index_select(0, tokens)),
    ]  # fmt: skip


EPILOGUE_TILES = [
    (128, 192, 2, 1, True),
    (128, 128, 2, 1, True),
    (128, 160, 2, 1, True),
    (128, 192, 1, 1, True),
    (128, 128, 1, 1, True),
    (256, 128, 2, 1, False),
    (256, 192, 2, 1, False),
    (128, 256, 2, 1, False),
]


def epilogue_variants(reps: int) -> list[dict]:
    """The SwiGLU epilogue GEMMs over more tiles than quack_gemm times, and dgated without its
    gather, without its row reduction, and on QuACK's dynamic scheduler: which one costs."""
    rows_out = []
    for shape in SHAPES:
        rows_out += _epilogue_variants_for(shape, reps)
        torch.cuda.empty_cache()
    write_json("quack_epilogue_variants", rows_out)
    return rows_out


def _epilogue_variants_for(shape, reps: int) -> list[dict]:
    from quack.gemm_interface import gemm_act, gemm_dact

    rows_out = []
    p = _problem(*shape)
    x, gate_up, down, tokens = p["x"], p["gate_up"], p["down"], p["sorted_tokens"]
    cu = quack_gemm.cu_seqlens(p["offsets"])
    a_idx = tokens.to(torch.int32)
    preact, _ = quack_gemm.experts_swiglu(x, gate_up, p["offsets"], tokens)
    grad_sorted = p["grad_tokens"].index_select(0, tokens)
    dx, post = torch.empty_like(preact), preact.new_empty(preact.shape[0], preact.shape[1] // 2)
    hidden = post.clone()

    def dgated(tile, gather=True, reduce=True, dynamic=False):
        a = p["grad_tokens"] if gather else grad_sorted
        return gemm_dact(
            a, down, preact, activation="swiglu", dx_out=dx, postact_out=post,
            colvec_scale=p["row_scale"], colvec_reduce=reduce, cu_seqlens_m=cu,
            A_idx=a_idx if gather else None, dynamic_scheduler=dynamic, tuned=False,
            config=quack_gemm.gemm_config(tile),
        )  # fmt: skip

    def gated(tile):
        return gemm_act(
            x, gate_up.transpose(-2, -1), activation="swiglu", preact_out=dx, postact_out=hidden,
            cu_seqlens_m=cu, A_idx=a_idx, concat_layout=("B",), tuned=False,
            config=quack_gemm.gemm_config(tile),
        )  # fmt: skip

    variants = []
    for tile in EPILOGUE_TILES:
        variants.append((f"dgated {tile}", lambda tile=tile: dgated(tile)))
    base = EPILOGUE_TILES[0]
    variants += [
        ("dgated, rows pre-gathered (no A_idx)", lambda: dgated(base, gather=False)),
        ("dgated, no row reduction", lambda: dgated(base, reduce=False)),
        ("dgated, dynamic scheduler", lambda: dgated(base, dynamic=True)),
        ("dgated, pre-gathered, no reduction", lambda: dgated(base, gather=False, reduce=False)),
    ]
    variants += [(f"gated {tile}", lambda tile=tile: gated(tile)) for tile in EPILOGUE_TILES]
    for name, step in variants:
        try:
            ms = time_cuda(step, reps=reps)
        except Exception as error:  # a tile this epilogue refuses
            print(f"{shape} {name}: {type(error).__name__} {str(error)[:120]}", flush=True)
            ms = float("nan")
        rows_out.append({"shape": str(shape), "variant": name, "ms": ms})
        print(f"{shape} {name}: {ms:.3f} ms", flush=True)
    return rows_out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--epilogues", action="store_true", help="only the epilogue GEMMs' variants")
    args = parser.parse_args()
    assert quack_gemm.available(), "needs QuACK and a Hopper GPU"
    if args.epilogues:
        epilogue_variants(args.reps)
        return
    quack_gemm.TUNE = False
    candidates = quack_gemm.CANDIDATES
    results, table = [], []
    for shape in SHAPES:
        problem = _problem(*shape)
        a = torch.randn(problem["rows"], 4096, device="cuda", dtype=torch.bfloat16)
        for name, path, flops, step in _steps(problem):
            row = {"shape": str(shape), "step": name, "path": path}
            if flops:
                # One cuBLAS matmul of the same FLOPs: rows x 4096 times 4096 x n.
                n = max(8, round(flops / (2 * problem["rows"] * 4096) / 8) * 8)
                b = torch.randn(4096, n, device="cuda", dtype=torch.bfloat16)
                row["cublas_ms"] = time_cuda(lambda a=a, b=b: a @ b, reps=args.reps)
                for index, tile in enumerate(candidates):
                    quack_gemm.CANDIDATES = (tile,)
                    try:
                        row[f"tile{index}_ms"] = time_cuda(step, reps=args.reps)
                    except (RuntimeError, IndexError) as error:  # the gather refuses cluster_n 2
                        row[f"tile{index}_ms"] = float("nan")
                        row[f"tile{index}_error"] = str(error)[:80]
                quack_gemm.CANDIDATES = candidates
                best = min(v for k, v in row.items() if k.startswith("tile") and k.endswith("_ms") and v == v)
                row["ms"], row["vs_cublas"] = best, row["cublas_ms"] / best
            else:
                row["ms"] = time_cuda(step, reps=args.reps)
            results.append(row)
            cells = [f"{row.get(f'tile{i}_ms', float('nan')):.3f}" for i in range(len(candidates))]
            ratio = f"{row['vs_cublas']:.2f}" if "vs_cublas" in row else ""
            table.append([row["shape"], path, name, f"{row['ms']:.3f}", *cells, ratio])
            print(" | ".join(table[-1]), flush=True)
        for path in ("fused", "unfused"):
            total = sum(r["ms"] for r in results if r["shape"] == str(shape) and r["path"] in (path, "both"))
            table.append(
                [str(shape), path, "TOTAL (best tiles)", f"{total:.3f}", *[""] * len(candidates), ""]
            )
        del problem
        torch.cuda.empty_cache()
    tiles = [f"{m}x{n} {cm}x{cn} {'pp' if pp else 'coop'}" for m, n, cm, cn, pp in candidates]
    print_table(
        "QuACK calls of fused and unfused SwiGLU experts, ms (best tile; vs cuBLAS: its ms, same FLOPs / ms)",
        ["shape", "path", "step", "ms", *tiles, "vs cuBLAS"],
        table,
    )
    write_json("quack_fused_ops", results)


if __name__ == "__main__":
    main()
