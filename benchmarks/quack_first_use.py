"""First-use cost of the QuACK expert GEMMs: the MoE layer's first fwd+bwd step per shape.

    QUACK_CACHE_DIR=$(mktemp -d) VLMOE_CACHE_DIR=$(mktemp -d) python benchmarks/quack_first_use.py

The first step of a fresh process compiles QuACK's kernels (once per configuration and operand
layout, shapes are symbolic) and times the candidate tiles of each expert matmul (once per
problem shape). Run it twice with the same two cache folders: the first run is the cold cost,
the second what a later run pays (kernels from QuACK's disk cache, tile choices from vlmoe's).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    from moe_layer import DTYPE, FFN_SHAPES, SwiGLU
    from vlmoe.moe import MoEFeedForward
    from vlmoe.moe.kernels import quack_gemm

    if not (torch.cuda.is_available() and quack_gemm.available()):
        print("needs QuACK and a Hopper GPU")
        return
    for tokens, hidden, intermediate, num_experts, top_k in FFN_SHAPES:
        torch.manual_seed(0)
        dense = SwiGLU(hidden, intermediate).to("cuda", DTYPE)
        moe = MoEFeedForward.from_dense(dense, num_experts, top_k, backend="grouped")
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
        torch.cuda.synchronize()
        steps = []
        for _ in range(2):
            start = time.perf_counter()
            moe(x).sum().backward()
            torch.cuda.synchronize()
            steps.append(time.perf_counter() - start)
        shape = f"({tokens}, {hidden}, {intermediate}, {num_experts}, {top_k})"
        print(f"{shape}: first step {steps[0]:.1f} s, second {steps[1] * 1e3:.0f} ms", flush=True)
        del moe, dense, x
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
