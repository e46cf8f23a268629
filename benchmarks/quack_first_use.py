"""First-use cost of the QuACK expert GEMMs: the MoE layer's first fwd+bwd step per shape.

    QUACK_CACHE_DIR=$(mktemp -d) VLMOE_CACHE_DIR=$(mktemp -d) python benchmarks/quack_first_use.py

The first step of a fresh process compiles QuACK's kernels (once per configuration and operand
layout, shapes are symbolic) and times the candidate tiles of each expert matmul (once per
problem shape). Run it twice with the same two cache folders: the first run is the cold cost,
the second what a later run pays (kernels from QuACK's disk cache, tile choices from vlmoe's).
Each shape's line splits its first step: seconds compiling or loading the candidates' kernels
(of which handing them to QuACK's compile workers), timing them, and the rest (Triton's kernels,
the step itself). `VLMOE_QUACK_PARALLEL_COMPILE=0` compiles the candidates one after another in
this process, as before v26; `device_perf.sh`'s `firstpar` part times both, each run with every
cache empty. `--shape 3 --shape 1` times shape 3 first (the order of a cold process matters: the
first shape pays for the kernels the others share). `--preload a,b` has QuACK's compile server
import those modules too (v26 probe).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", type=int, default=3, help="how many of FFN_SHAPES, from the first")
    parser.add_argument(
        "--shape",
        type=int,
        action="append",
        help="FFN_SHAPES' shape N (from 1), in the order given; repeatable, overrides --shapes",
    )
    parser.add_argument(
        "--preload", default="", help="modules the compile server imports too, comma-separated"
    )
    args = parser.parse_args()
    from moe_layer import DTYPE, FFN_SHAPES, SwiGLU
    from vlmoe.moe import MoEFeedForward
    from vlmoe.moe.kernels import quack_gemm

    if not (torch.cuda.is_available() and quack_gemm.available()):
        print("needs QuACK and a Hopper GPU")
        return
    if args.preload:
        quack_gemm.COMPILE_SERVER_PRELOAD += tuple(args.preload.split(","))
    print(
        f"compile server preload {quack_gemm.COMPILE_SERVER_PRELOAD}, "
        f"candidates compiled on QuACK's workers {quack_gemm.PARALLEL_COMPILE}"
    )
    if args.shape and not all(1 <= number <= len(FFN_SHAPES) for number in args.shape):
        parser.error(f"--shape takes 1 to {len(FFN_SHAPES)}, got {args.shape}")
    shapes = [FFN_SHAPES[number - 1] for number in args.shape] if args.shape else FFN_SHAPES[: args.shapes]
    for tokens, hidden, intermediate, num_experts, top_k in shapes:
        torch.manual_seed(0)
        dense = SwiGLU(hidden, intermediate).to("cuda", DTYPE)
        moe = MoEFeedForward.from_dense(dense, num_experts, top_k, backend="grouped")
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
        torch.cuda.synchronize()
        before = quack_gemm.tuning_seconds()
        steps = []
        for _ in range(2):
            start = time.perf_counter()
            moe(x).sum().backward()
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
        shape = f"({tokens}, {hidden}, {intermediate}, {num_experts}, {top_k})"
        new = {key: entry for key, entry in quack_gemm.tuning_seconds().items() if key not in before}
        tuned = list(new.values())
        compile_s = sum(entry["compile_s"] for entry in tuned)
        handing_s = sum(entry["handing_s"] for entry in tuned)
        time_s = sum(entry["time_s"] for entry in tuned)
        on_workers = sum(entry["on_workers"] for entry in tuned)
        print(
            f"{shape}: first step {steps[0]:.1f} s, second {steps[1] * 1e3:.0f} ms; {len(tuned)} problems "
            f"tuned: compile {compile_s:.1f} s (handing {on_workers} to workers {handing_s:.1f} s), "
            f"timing {time_s:.1f} s, the rest {steps[0] - compile_s - time_s:.1f} s",
            flush=True,
        )
        for key, entry in new.items():
            after = " ".join(f"{seconds:.1f}" for seconds in entry["after_s"])
            print(
                f"    {key}: compile {entry['compile_s']:.1f} s (handing {entry['on_workers']} "
                f"{entry['handing_s']:.1f} s, ready at [{after}] s, {entry['worker_failures']} failed on "
                f"workers), timing {entry['time_s']:.2f} s",
                flush=True,
            )
        del moe, dense, x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
