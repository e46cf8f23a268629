"""Probe: does QuACK's varlen GEMM (CuTe DSL, PyPI `quack-kernels`) beat torch's grouped_mm?

    python benchmarks/quack_gemm.py [--reps 20] [--tune-seconds 200]

v9 and v15 (NOTES.md) found the layer's gap to compiled dense in the grouped GEMM: torch's
grouped_mm runs one CUTLASS configuration (128x256x64, cooperative, cluster 2x1) for every
large shape, at 0.75-0.93 of one cuBLAS matmul of the same FLOPs on the forwards. QuACK is the
GEMM library SonicMoE is built on; it installs beside the user's torch (no torch pin) and has
varlen-M (grouped forward and input gradient, optionally gathering A's rows), varlen-K
(grouped weight gradient), pingpong schedules and an autotuner. This times, per shape and
layer (gate_up, down) and direction, one cuBLAS matmul over all rows (the ideal), grouped_mm
and QuACK with a few fixed configurations (and autotuned, while --tune-seconds lasts),
checks QuACK against grouped_mm, and prints each first call's compile time.
An experiment: nothing in vlmoe uses QuACK unless it wins.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def _configs():
    from vlmoe.moe.kernels.quack_gemm import gemm_config

    return {
        "128x192 pingpong 2x1 (QuACK's SM90 default)": gemm_config((128, 192, 2, 1, True)),
        "128x256 cooperative 2x1 (grouped_mm's tile)": gemm_config((128, 256, 2, 1, False)),
        "256x192 cooperative 2x1": gemm_config((256, 192, 2, 1, False)),
        "128x208 pingpong 1x2": gemm_config((128, 208, 1, 2, True)),
    }


def _quack_call(config, **kwargs):
    """One QuACK GEMM with a fixed configuration (no autotuning); returns out."""
    from quack.gemm_interface import gemm_tuned

    gemm_tuned.fn(config=config, **kwargs)
    return kwargs["out"]


def _problems(x_sorted, x_tokens, token_of_row, grad, weight, cu_seqlens, offsets):
    """direction -> (grouped_mm step, quack kwargs without config, reference output)."""
    from vlmoe.moe.dispatch import _grouped_mm

    slots, fan_in = x_sorted.shape
    num_experts, fan_out = weight.shape[0], weight.shape[1]
    out_fwd = x_sorted.new_empty(slots, fan_out)
    out_grad = x_sorted.new_empty(slots, fan_in)
    out_weight = weight.new_empty(num_experts, fan_out, fan_in)
    return {
        "forward": (
            lambda: _grouped_mm(x_sorted, weight.transpose(-2, -1), offs=offsets),
            {"A": x_sorted, "B": weight.transpose(-2, -1), "out": out_fwd, "cu_seqlens_m": cu_seqlens},
        ),
        "forward, rows gathered in the load": (
            lambda: _grouped_mm(x_tokens[token_of_row], weight.transpose(-2, -1), offs=offsets),
            {
                "A": x_tokens,
                "B": weight.transpose(-2, -1),
                "out": out_fwd,
                "cu_seqlens_m": cu_seqlens,
                "A_idx": token_of_row,
            },
        ),
        "grad input": (
            lambda: _grouped_mm(grad, weight, offs=offsets),
            {"A": grad, "B": weight, "out": out_grad, "cu_seqlens_m": cu_seqlens},
        ),
        "grad weight": (
            lambda: _grouped_mm(grad.t(), x_sorted, offs=offsets),
            {"A": grad.t(), "B": x_sorted, "out": out_weight, "cu_seqlens_k": cu_seqlens},
        ),
    }


def _cublas(x_sorted, grad, weight):
    dense_w = weight[0].clone()  # one matmul over all rows: the same FLOPs
    return {
        "forward": lambda: x_sorted @ dense_w.t(),
        "forward, rows gathered in the load": lambda: x_sorted @ dense_w.t(),
        "grad input": lambda: grad @ dense_w,
        "grad weight": lambda: grad.t() @ x_sorted,
    }


def _time_direction(ideal, grouped_step, kwargs, configs, tune: bool, reps: int, time_cuda):
    """Milliseconds of cuBLAS, grouped_mm and each QuACK configuration on one problem, and notes
    (first-call compile time, failures, wrong results)."""
    from quack.gemm_interface import gemm

    reference = grouped_step().float()
    timings = {
        "one cuBLAS matmul": time_cuda(ideal, reps=reps),
        "grouped_mm": time_cuda(grouped_step, reps=reps),
    }
    notes = {}
    for name, config in configs.items():
        try:
            start = time.perf_counter()
            got = _quack_call(config, **kwargs).float()
            torch.cuda.synchronize()
            notes[name] = f"first call {time.perf_counter() - start:.1f} s"
            error = float((got - reference).norm() / reference.norm())
            if error > 2e-2:
                notes[name] += f", WRONG (relative error {error:.2e})"
                continue
            timings[f"quack {name}"] = time_cuda(lambda: _quack_call(config, **kwargs), reps=reps)  # noqa: B023
        except Exception as error:  # a configuration the kernel cannot build
            notes[name] = f"failed: {type(error).__name__}: {str(error)[:160]}"
    if tune:
        try:
            start = time.perf_counter()
            gemm(**kwargs, tuned=True)
            torch.cuda.synchronize()
            notes["autotuned"] = f"tuning {time.perf_counter() - start:.1f} s"
            timings["quack autotuned"] = time_cuda(lambda: gemm(**kwargs, tuned=True), reps=reps)
        except Exception as error:
            notes["autotuned"] = f"failed: {type(error).__name__}: {str(error)[:160]}"
    return timings, notes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--tune-seconds", type=float, default=200.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("quack_gemm.py needs a CUDA GPU (Hopper or newer); nothing to do on CPU")
        return
    import quack

    from common import print_table, time_cuda, write_json
    from gemm_efficiency import _counts
    from moe_layer import DTYPE, FFN_SHAPES

    print(f"quack {getattr(quack, '__version__', '?')}, torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    configs = _configs()
    started = time.perf_counter()
    rows = []
    for tokens, hidden, intermediate, num_experts, top_k in FFN_SHAPES:
        counts_list = _counts(tokens, num_experts, top_k)
        counts = torch.tensor(counts_list, device="cuda")
        offsets = counts.cumsum(0).to(torch.int32)
        cu_seqlens = torch.cat([offsets.new_zeros(1), offsets])
        slots = sum(counts_list)
        token_of_row = torch.randint(0, tokens, (slots,), device="cuda", dtype=torch.int32)
        shape = f"({tokens}, {hidden}, {intermediate}, {num_experts}, {top_k})"
        for layer, fan_in, fan_out in (("gate_up", hidden, 2 * intermediate), ("down", intermediate, hidden)):
            weight = torch.randn(num_experts, fan_out, fan_in, device="cuda", dtype=DTYPE) * 0.02
            x_tokens = torch.randn(tokens, fan_in, device="cuda", dtype=DTYPE)
            x_sorted = torch.randn(slots, fan_in, device="cuda", dtype=DTYPE)
            grad = torch.randn(slots, fan_out, device="cuda", dtype=DTYPE)
            problems = _problems(x_sorted, x_tokens, token_of_row, grad, weight, cu_seqlens, offsets)
            ideal = _cublas(x_sorted, grad, weight)
            for direction, (grouped_step, kwargs) in problems.items():
                tune = time.perf_counter() - started < args.tune_seconds
                timings, notes = _time_direction(
                    ideal[direction], grouped_step, kwargs, configs, tune, args.reps, time_cuda
                )
                for note, text in notes.items():
                    print(f"  {shape} {layer} {direction} {note}: {text}", flush=True)
                for method, ms in timings.items():
                    rows.append(
                        {
                            "shape": shape,
                            "layer": layer,
                            "direction": direction,
                            "method": method,
                            "ms": ms,
                            "ratio_to_cublas": timings["one cuBLAS matmul"] / ms,
                            "ratio_to_grouped_mm": timings["grouped_mm"] / ms,
                        }
                    )
                    print(f"  {shape} {layer} {direction} {method}: {ms:.3f} ms", flush=True)
            del weight, x_tokens, x_sorted, grad, problems
            torch.cuda.empty_cache()
    write_json("quack_gemm", rows)
    print_table(
        "expert matmuls alone; ratios = one cuBLAS matmul ms / method ms and grouped_mm ms / method ms",
        ["shape (T, d, ff, E, k)", "layer", "direction", "method", "ms", "vs cuBLAS", "vs grouped_mm"],
        [
            [
                r["shape"],
                r["layer"],
                r["direction"],
                r["method"],
                f"{r['ms']:.3f}",
                f"{r['ratio_to_cublas']:.3f}",
                f"{r['ratio_to_grouped_mm']:.3f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
