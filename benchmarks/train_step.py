"""End-to-end training step of an upcycled LLaVA-style model vs the same model made dense.

    python benchmarks/train_step.py [--layers 12] [--batch 8] [--seq 2048]

Step = forward with labels (+ router aux loss), backward, AdamW. bf16 weights, SDPA attention.
Models (one process, one GPU):
- dense: LLaVA (Llama LM d=2048, 12 layers) with FFN width 2 x 5632 (the MoE's active width);
- vlmoe: the same LLaVA with FFN 5632, upcycled by `vlmoe.upcycle_ffn` into 4 experts, top-2;
- Mixtral: stock transformers MixtralForCausalLM of the same shape (grouped_mm experts).
Text-only batches: the LM dominates the step; the vision tower is tiny here.
Writes train_step.json; MFU is against a measured 8192^3 bf16 matmul.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlmoe
from common import print_table, time_cuda, v14_variant, write_json
from telemetry import GpuSampler
from vlmoe.moe.kernels import quack_gemm

HIDDEN, FFN, VOCAB = 2048, 5632, 32000


# A small CLIP tower: the benchmarks' batches are text-only, the LM dominates.
VISION = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=56,
    patch_size=14,
)


def llava(
    num_layers: int,
    intermediate: int,
    *,
    hidden: int = HIDDEN,
    heads: int = 16,
    vocab: int = VOCAB,
    vision: dict | None = None,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
):
    """A random LLaVA with a Llama LM of `num_layers` x (hidden, intermediate), SDPA attention."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        vocab_size=vocab,
        max_position_embeddings=4096,
    )
    vision_config = CLIPVisionConfig(**(VISION if vision is None else vision))
    config = LlavaConfig(text_config=text, vision_config=vision_config, image_token_id=vocab - 1)
    config._attn_implementation = "sdpa"
    with torch.device(device):  # initialise on the GPU: seconds instead of a minute on the host
        return LlavaForConditionalGeneration(config).to(dtype)


def mixtral(num_layers: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=VOCAB,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    config._experts_implementation = "grouped_mm"
    with torch.device("cuda"):
        return MixtralForCausalLM(config).to(torch.bfloat16)


def make_step(model, input_ids, with_aux: bool, optimizer: str = "foreach"):
    # foreach: torch's default AdamW; fused: one kernel per parameter group, fewer passes over
    # the states (the MoE has ~1.7x the dense twin's parameters, so this shrinks its extra cost).
    options = {"fused": True} if optimizer == "fused" else {"foreach": True}
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-5, **options)

    def step() -> None:
        loss = model(input_ids=input_ids, labels=input_ids).loss
        if with_aux:
            loss = loss + vlmoe.aux_loss(model)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)

    return step


def _segments(model, *rest):
    from vlmoe.moe import MoEFeedForward

    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.backend = "segments"
    return (model, *rest)


def active_params(model, experts_total: int = 1, experts_active: int = 1) -> float:
    """Parameters a token uses, embeddings and output head excluded."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or "lm_head" in name or "vision" in name or "projector" in name:
            continue
        share = experts_active / experts_total if ("experts" in name) else 1.0
        total += p.numel() * share
    return total


def matmul_peak_tflops(sustained: bool = False) -> float:
    """bf16 TFLOP/s of one 8192^3 cuBLAS matmul: from a few calls (the GPU at its idle-to-busy
    clocks, ~1980 MHz on an H200) or, `sustained`, after ~1 s of them back to back, where a GPU
    held at its power cap runs (~1450-1550 MHz at 700 W, NOTES.md session 18), the clocks the
    training step itself runs at."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_cuda(lambda: a @ b, warmup=700 if sustained else 3, reps=300 if sustained else 20)
    return 2 * 8192**3 / ms / 1e9


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--optimizers", nargs="+", default=["foreach"], choices=["foreach", "fused"])
    parser.add_argument(
        "--without-quack", action="store_true", help="also the upcycled model on grouped_mm, QuACK off"
    )
    parser.add_argument(
        "--without-v14", action="store_true", help="also the upcycled model without v14's memory savings"
    )
    parser.add_argument(
        "--segments", action="store_true", help="also the upcycled model on backend='segments'"
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    tokens = args.batch * args.seq
    input_ids = torch.randint(0, VOCAB - 2, (args.batch, args.seq), device="cuda")
    peak, sustained_peak = matmul_peak_tflops(), matmul_peak_tflops(sustained=True)
    print(
        f"{torch.cuda.get_device_name()}  torch {torch.__version__}  bf16 matmul peak {peak:.0f} TFLOP/s "
        f"({sustained_peak:.0f} sustained)"
    )
    sampler = GpuSampler.open()

    rows = []

    def measure(name, model, with_aux, n_active, optimizer):
        step = make_step(model, input_ids, with_aux, optimizer)
        for _ in range(2):  # a first step's compiling and tuning stay out of the clocks' window
            step()
        torch.cuda.synchronize()
        start = time.perf_counter()
        with sampler or contextlib.nullcontext():
            ms = time_cuda(step, warmup=1, reps=10)
        clocks = sampler.window(start, time.perf_counter()) if sampler else None
        flops = 6 * n_active * tokens + 12 * args.layers * HIDDEN * args.seq * tokens
        rows.append(
            {
                "model": name,
                "optimizer": optimizer,
                "ms": ms,
                "tokens_per_s": tokens / ms * 1e3,
                "mfu": flops / ms / 1e9 / peak,
                "mfu_sustained": flops / ms / 1e9 / sustained_peak,
                "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
                "clocks": clocks.as_dict() if clocks else None,
            }
        )
        print(f"  {name}, AdamW {optimizer}: {ms:.1f} ms; {clocks.brief() if clocks else ''}", flush=True)

    builds = [
        ("dense LLaVA, FFN 2 x 5632", lambda: (llava(args.layers, 2 * FFN), False, 1, 1)),
        (
            "vlmoe LLaVA, upcycled 4 experts top-2",
            lambda: (vlmoe.upcycle_ffn(llava(args.layers, FFN), num_experts=4, top_k=2), True, 4, 2),
        ),
        ("transformers Mixtral, 4 experts top-2", lambda: (mixtral(args.layers), False, 4, 2)),
    ]
    if args.segments:
        upcycled = builds[1][1]
        builds.insert(2, ("vlmoe LLaVA, upcycled, backend='segments'", lambda: _segments(*upcycled())))
    for name, build in builds:
        model, with_aux, total, active = build()
        for optimizer in args.optimizers:
            torch.cuda.reset_peak_memory_stats()
            measure(name, model, with_aux, active_params(model, total, active), optimizer)
            if args.without_quack and name.startswith("vlmoe LLaVA, upcycled 4") and quack_gemm.available():
                # The same model, right after, with the SwiGLU in its own pass (QuACK's plain
                # GEMMs, before v17), then with the expert matmuls on torch's grouped_mm.
                with quack_gemm.swiglu_unfused():
                    torch.cuda.reset_peak_memory_stats()
                    active_count = active_params(model, total, active)
                    measure(f"{name}, SwiGLU pass", model, with_aux, active_count, optimizer)
                with quack_gemm.disabled():
                    torch.cuda.reset_peak_memory_stats()
                    active_count = active_params(model, total, active)
                    measure(f"{name}, grouped_mm", model, with_aux, active_count, optimizer)
            if args.without_v14 and name.startswith("vlmoe LLaVA, upcycled 4"):
                # The same model, right after, with the layers' v14 memory savings off (NOTES.md v14).
                with v14_variant(fold=False, gather_inside=False):
                    torch.cuda.reset_peak_memory_stats()
                    measure(
                        f"{name}, without v14",
                        model,
                        with_aux,
                        active_params(model, total, active),
                        optimizer,
                    )
        del model
        torch.cuda.empty_cache()

    for row in rows:
        base = next(r["ms"] for r in rows if r["optimizer"] == row["optimizer"])
        row["step_ratio_to_dense"] = row["ms"] / base
    write_json("train_step", rows)
    print_table(
        f"train step, {args.layers} layers, batch {args.batch}x{args.seq}; ratio = step ms / dense ms",
        ["model", "AdamW", "step ms", "ratio", "tokens/s", "MFU", "MFU sustained", "peak GiB"],
        [
            [
                r["model"],
                r["optimizer"],
                f"{r['ms']:.1f}",
                f"{r['step_ratio_to_dense']:.3f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['mfu']:.2f}",
                f"{r['mfu_sustained']:.2f}",
                f"{r['peak_gib']:.1f}",
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
