"""Batched greedy decoding throughput: upcycled vlmoe LLaVA vs stock transformers Mixtral.

    python benchmarks/generation.py [--layers 12] [--prompt 128] [--new 128] [--batches 1 32]
        [--static] [--models vlmoe,eager-ffn,grouped,mole,mole-eager,mole-merged,
                  mocle,mocle-eager,mocle-merged,dense,mixtral]

Same LM shape for all (d=2048, FFN 5632, 4 experts top-2, bf16, SDPA, KV cache), text-only
prompts; tokens/s counts generated tokens. Models: vlmoe (`auto`: the decode kernels at small
batch, each layer's FFN replayed as a CUDA graph), the same with the graphs off
(`eager-ffn`), vlmoe forced to the grouped path (the previous version), LLaVA-MoLE (4 LoRA
experts r64 top-1 on each MLP, each replayed as a graph, plain LoRA on attention) with and
without graphs (`mole`, `mole-eager`; not in the defaults), MoCLE (the same experts routed by
one of 64 instruction clusters, a random one per sequence, plus a universal expert: `mocle`,
`mocle-eager`; not in the defaults), the dense LLaVA before
upcycling (FFN 5632: what an MoE layer that cost nothing beyond one expert would reach), stock
Mixtral. `--static`: a static KV cache, with which transformers compiles the decoding step
(torch.compile fullgraph, mode="reduce-overhead": CUDA graphs) for every model alike.
Two readings per model: tokens/s of whole generate calls, and tokens/s from the median step
(the host clock at every generated token, through a stopping criterion that stops nothing), which
a few slow steps of a noisy host do not move. Both are compared with Mixtral round by round.
Writes generation_b<batches>.json (generation_static_b<batches>.json with --static).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlmoe
from common import print_table, span, write_json
from train_step import FFN, VOCAB, llava, mixtral
from vlmoe.moe import MoEFeedForward, SparseLayer, graphs, routing_inputs
from vlmoe.moe import router as router_module


class StepClock(StoppingCriteria):
    """Stops nothing; notes the host clock at every generated token. transformers calls its
    stopping criteria once per step, after the step's token is chosen, and reads the result
    on the host, so the clock follows the GPU within a step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def median_step(self) -> float:
        """Seconds of the median decoding step (the prompt's step excluded)."""
        steps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return statistics.median(steps) if steps else float("nan")


def lora_llava(num_layers: int, by_cluster: bool = False):
    """LLaVA-MoLE (4 LoRA experts r64 top-1 on each MLP, plain LoRA on attention) or, by cluster,
    MoCLE (the same experts routed by one of 64 instruction clusters, plus a universal expert)."""
    mocle = {"router": "cluster", "num_clusters": 64, "universal": True} if by_cluster else {}
    return vlmoe.add_mole(llava(num_layers, FFN), num_experts=4, rank=64, alpha=128, top_k=1, **mocle)


def _num_clusters(model) -> int:
    """The cluster count of a model routed by instruction cluster (MoCLE), else 0."""
    for module in model.modules():
        router = getattr(module, "router", None)
        if isinstance(module, SparseLayer) and router is not None and router.cluster_embedding is not None:
            return router.config.num_clusters
    return 0


def greedy_generate(model, batch: int, prompt: int, new: int, static: bool = False, clock=None) -> None:
    """One greedy generate of exactly `new` tokens after a random `prompt`-token prompt (and,
    for MoCLE, a random instruction cluster per sequence)."""
    input_ids = torch.randint(0, VOCAB - 2, (batch, prompt), device="cuda")
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kwargs["cache_implementation"] = "static"
    if clock is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([clock])
    num_clusters = _num_clusters(model)
    cluster_ids = torch.randint(0, num_clusters, (batch,), device="cuda") if num_clusters else None
    with routing_inputs(model, cluster_ids=cluster_ids):
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)


def decode_tokens_per_s(
    model, batch: int, prompt: int, new: int, static: bool = False
) -> tuple[float, float]:
    """(generated tokens/s of one generate call, tokens/s of its median step); warm the model
    first (compilation, CUDA graphs)."""
    clock = StepClock()
    torch.cuda.synchronize()
    start = time.perf_counter()
    greedy_generate(model, batch, prompt, new, static, clock)
    torch.cuda.synchronize()
    return batch * new / (time.perf_counter() - start), batch / clock.median_step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--static", action="store_true", help="static cache: transformers compiles decoding")
    parser.add_argument("--models", default="vlmoe,eager-ffn,grouped,dense,mixtral")
    parser.add_argument("--reps", type=int, default=5, help="timed rounds per model (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    fused_limit = router_module.FUSED_ROUTING_MAX_TOKENS

    def grouped():
        model = vlmoe.upcycle_ffn(llava(args.layers, FFN), 4, 2)
        for module in model.modules():
            if isinstance(module, MoEFeedForward):
                module.backend = "grouped"
        return model

    def mole():
        return lora_llava(args.layers)

    def mocle():
        return lora_llava(args.layers, by_cluster=True)

    builders = {
        "vlmoe": (
            "vlmoe LLaVA, upcycled 4x top-2 (auto)",
            lambda: vlmoe.upcycle_ffn(llava(args.layers, FFN), 4, 2),
        ),
        "eager-ffn": (
            "vlmoe LLaVA, upcycled, auto, no CUDA graphs",
            lambda: vlmoe.upcycle_ffn(llava(args.layers, FFN), 4, 2),
        ),
        "grouped": ("vlmoe LLaVA, upcycled, grouped path (previous)", grouped),
        # The decode kernels with the torch router (six launches) instead of the fused one.
        "torch-router": (
            "vlmoe LLaVA, upcycled, auto, torch router",
            lambda: vlmoe.upcycle_ffn(llava(args.layers, FFN), 4, 2),
        ),
        # LLaVA-MoLE: 4 LoRA experts top-1 (rank 64) on each MLP, plain LoRA on attention.
        "mole": ("vlmoe LLaVA-MoLE, 4 LoRA experts r64 top-1", mole),
        "mole-eager": ("vlmoe LLaVA-MoLE, no CUDA graphs", mole),
        # MoCLE: the same experts routed by one of 64 instruction clusters, plus a universal one.
        "mocle": ("vlmoe MoCLE, 4 LoRA experts r64 by cluster + universal", mocle),
        "mocle-eager": ("vlmoe MoCLE, no CUDA graphs", mocle),
        # The same two with plain and universal LoRA merged into the base weights (vlmoe.merge_lora):
        # attention's linears plain again, MoCLE's feed-forwards without the universal expert.
        "mole-merged": ("vlmoe LLaVA-MoLE, LoRA merged (vlmoe.merge_lora)", lambda: vlmoe.merge_lora(mole())),
        "mocle-merged": ("vlmoe MoCLE, LoRA merged (vlmoe.merge_lora)", lambda: vlmoe.merge_lora(mocle())),
        "dense": ("dense LLaVA, FFN 5632 (before upcycling)", lambda: llava(args.layers, FFN)),
        "mixtral": ("transformers Mixtral (grouped_mm)", lambda: mixtral(args.layers)),
    }
    # Every model is built and warmed first, then timed in interleaved rounds (A B C, A B C, ...):
    # eager batch-1 decoding is host-bound and drifts by +-25% between calls on the lent machine
    # (decode_diagnosis.py), so a model timed alone, or first while the GPU clocks are still low,
    # reads its neighbour's noise. Ratios are the median of the per-round ratios.
    models = {}
    for key in args.models.split(","):
        name, build = builders[key]
        models[key] = (name, build().eval())
    rounds = max(args.reps, 1)
    for batch in args.batches:
        speeds: dict[str, list[float]] = {key: [] for key in models}
        step_speeds: dict[str, list[float]] = {key: [] for key in models}
        for repeat in range(rounds + 1):  # round 0 warms up (compilation, CUDA graphs, clocks)
            for key, (name, model) in models.items():
                router_module.FUSED_ROUTING_MAX_TOKENS = 0 if key == "torch-router" else fused_limit
                graphs.ENABLED = key not in ("eager-ffn", "mole-eager", "mocle-eager")
                try:
                    with torch.no_grad():
                        speed, step_speed = decode_tokens_per_s(
                            model, batch, args.prompt, args.new, static=args.static
                        )
                except Exception as error:  # e.g. a model transformers cannot compile: report, go on
                    print(f"  {name}, batch {batch}: {type(error).__name__}: {error}"[:2000], flush=True)
                    speed = step_speed = float("nan")
                if repeat:
                    speeds[key].append(speed)
                    step_speeds[key].append(step_speed)
        router_module.FUSED_ROUTING_MAX_TOKENS = fused_limit
        graphs.ENABLED = True
        for key, (name, _) in models.items():
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "tokens_per_s": statistics.median(speeds[key]),
                    "rounds": speeds[key],
                    "median_step_tokens_per_s": statistics.median(step_speeds[key]),
                    "median_step_rounds": step_speeds[key],
                }
            )
            if "mixtral" in models:
                ratios = [a / b for a, b in zip(speeds[key], speeds["mixtral"], strict=True)]
                rows[-1]["ratio_to_mixtral"] = statistics.median(ratios)
                rows[-1]["round_ratios"] = ratios
                step_ratios = [a / b for a, b in zip(step_speeds[key], step_speeds["mixtral"], strict=True)]
                rows[-1]["median_step_ratio_to_mixtral"] = statistics.median(step_ratios)
                rows[-1]["median_step_round_ratios"] = step_ratios
            else:
                rows[-1]["ratio_to_mixtral"] = rows[-1]["median_step_ratio_to_mixtral"] = float("nan")
            print(
                f"  {name}, batch {batch}: rounds {' '.join(f'{v:.0f}' for v in speeds[key])} tokens/s",
                flush=True,
            )
    batches = "-".join(str(b) for b in args.batches)
    write_json(f"generation{'_static' if args.static else ''}_b{batches}", rows)
    cache = "static cache (compiled)" if args.static else "dynamic cache (eager)"
    print_table(
        f"greedy decoding, {args.layers} layers, prompt {args.prompt}, {args.new} new tokens, {cache}",
        [
            "model",
            "batch",
            "tokens/s (median)",
            "ratio to Mixtral (median of rounds)",
            "range of round ratios",
            "median-step tokens/s",
            "median-step ratio",
            "its range",
        ],
        [
            [
                r["model"],
                r["batch"],
                f"{r['tokens_per_s']:.0f}",
                f"{r['ratio_to_mixtral']:.2f}",
                span(r.get("round_ratios", [float("nan")])),
                f"{r['median_step_tokens_per_s']:.0f}",
                f"{r['median_step_ratio_to_mixtral']:.2f}",
                span(r.get("median_step_round_ratios", [float("nan")])),
            ]
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
