"""One MoE layer at decoding size: microseconds per forward, autograd off, bf16.

    python benchmarks/decode_layer.py [--tokens 1 2 8 32 64]

A decoding step is launch-bound: this times 500 forwards queued back to back (one sync at the
end), so it reads the host cost per layer that the generation benchmark sums over 12 layers
and 64 steps, without its run-to-run spread; where the GPU takes longer than the host, the
same column reads the GPU's time. "GPU us" is the kernels' time per forward from the profiler
(run eagerly: a graph replays the same kernels). Variants: the grouped path (sort + plan), the
decode kernels with the torch router (the gate's matmul and the top-k kernel) and with the
default one (the one-kernel routing while the gate is small, `router.FUSED_ROUTING_MAX_GATE`), the
latter replayed from a CUDA graph (`vlmoe.moe.graphs`, as generation runs it), the grouped
path as a graph (what `auto` replays past the decode kernels' 64 tokens), and transformers'
Mixtral block (grouped_mm) of the same weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import kernel_time, print_table, write_json
from moe_layer import DTYPE, SwiGLU, _As3D, _mixtral_block
from vlmoe.moe import MoEFeedForward, graphs
from vlmoe.moe import router as router_module


def us_per_call(fn, reps: int = 500) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def gpu_us_per_call(fn) -> float:
    """Kernel time per call, from the profiler."""
    return kernel_time(fn)[0] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 8, 32, 64])
    parser.add_argument(
        "--layers",
        nargs="+",
        default=["2048,5632,4,2", "2048,1408,64,6"],
        help="hidden,intermediate,experts,top_k per layer: the generation model's and a fine-grained one",
    )
    args = parser.parse_args()
    rows = []
    for spec in args.layers:
        rows += time_layer(*(int(v) for v in spec.split(",")), args.tokens)
    write_json("decode_layer", rows)
    print_table(
        "one MoE layer, no_grad, bf16, us per forward queued back to back",
        ["layer", "tokens", "variant", "us", "GPU us"],
        [[r["layer"], r["tokens"], r["variant"], f"{r['us']:.1f}", f"{r['gpu_us']:.1f}"] for r in rows],
    )


def time_layer(
    hidden: int, intermediate: int, num_experts: int, top_k: int, token_counts: list[int]
) -> list[dict]:
    torch.manual_seed(0)
    layer = f"d={hidden}, ff={intermediate}, {num_experts} experts top-{top_k}"
    dense = SwiGLU(hidden, intermediate).to("cuda", DTYPE)
    moe = MoEFeedForward.from_dense(dense, num_experts, top_k).eval()
    with torch.no_grad():
        moe.experts.gate_up_proj.normal_(std=0.02)
        moe.experts.down_proj.normal_(std=0.02)
        moe.router.gate.weight.normal_(std=0.5)
    mixtral = _As3D(_mixtral_block(hidden, intermediate, num_experts, top_k, "grouped_mm", moe)).eval()
    fused_limit = router_module.FUSED_ROUTING_MAX_TOKENS
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE)
        # name: (backend, fused routing limit, CUDA graph)
        variants = {
            "vlmoe grouped path, torch router": ("grouped", 0, False),
            "vlmoe decode kernels, torch router": ("decode", 0, False),
            "vlmoe decode kernels, default router": ("decode", fused_limit, False),
            "vlmoe decode kernels, default router, CUDA graph": ("decode", fused_limit, True),
            "vlmoe grouped path, default router, CUDA graph": ("grouped", fused_limit, True),
        }
        with torch.no_grad():
            outputs = {}
            for name, (backend, limit, graphed) in variants.items():
                moe.backend, router_module.FUSED_ROUTING_MAX_TOKENS = backend, limit
                graphs.ENABLED = False
                gpu = gpu_us_per_call(lambda x=x: moe(x))
                graphs.ENABLED = graphed
                outputs[name] = moe(x)
                us = us_per_call(lambda x=x: moe(x))
                rows.append({"layer": layer, "tokens": tokens, "variant": name, "us": us, "gpu_us": gpu})
            router_module.FUSED_ROUTING_MAX_TOKENS = fused_limit
            graphs.ENABLED = True
            reference = outputs["vlmoe grouped path, torch router"].float()
            for name, out in outputs.items():
                error = ((out.float() - reference).norm() / reference.norm()).item()
                print(f"  tokens {tokens}, {name}: rel. difference to grouped {error:.2e}")
            rows.append(
                {
                    "layer": layer,
                    "tokens": tokens,
                    "variant": "Mixtral block (grouped_mm)",
                    "us": us_per_call(lambda x=x: mixtral(x)),
                    "gpu_us": gpu_us_per_call(lambda x=x: mixtral(x)),
                }
            )
            rows.append(
                {
                    "layer": layer,
                    "tokens": tokens,
                    "variant": "dense SwiGLU MLP (one expert)",
                    "us": us_per_call(lambda x=x: dense(x)),
                    "gpu_us": gpu_us_per_call(lambda x=x: dense(x)),
                }
            )
    graphs.release()  # the next layer's graphs start from an empty pool
    return rows


if __name__ == "__main__":
    main()
