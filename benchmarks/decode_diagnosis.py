"""Why batch-1 eager decoding of the upcycled model trails its layer-level cost (NOTES.md, v8b).

    python benchmarks/decode_diagnosis.py [--layers 12] [--new 64] [--rounds 3]
        [--models dense,vlmoe,mole,mocle,mole-merged,mocle-merged,mixtral]   # default: dense,vlmoe,mixtral

Tests the three leads of the open question, same models as `generation.py`:
1. order and clocks: every model warmed first, then timed in interleaved rounds (A B C A B C);
2. host synchronisations per generated token, counted with torch's sync debug mode (generate's
   own stopping check is one; anything more in the MoE layer would serialise host and GPU);
3. host vs GPU time per token: a torch.profiler trace of one short generate per model, the
   ops with the most host time, and for layer 0's FFN alone the host time per call (queued, no
   sync) against its GPU time (replayed from a CUDA graph).
Writes decode_diagnosis.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlmoe
from common import print_table, write_json
from generation import _num_clusters, decode_tokens_per_s, greedy_generate, lora_llava
from train_step import FFN, HIDDEN, llava, mixtral

PROMPT = 128  # tokens, as in generation.py


def _syncs_per_token(model, new: int = 8) -> float:
    """Host synchronisations per generated token, prefill included (so it reads a little high)."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        greedy_generate(model, 1, PROMPT, new)
    torch.cuda.set_sync_debug_mode(0)
    places = sorted({f"{w.filename.split('site-packages/')[-1]}:{w.lineno}" for w in caught})
    print(f"    sync sites: {places[:12]}", flush=True)
    return len(caught) / new


def _profile(model, name: str, new: int = 16) -> dict:
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        greedy_generate(model, 1, PROMPT, new)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print(f"\n== {name}: top host-time ops over one generate of {new} tokens")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    cuda_us = sum(getattr(a, "self_device_time_total", 0.0) for a in averages)
    cpu_us = sum(a.self_cpu_time_total for a in averages)
    return {"host_ms_per_token": cpu_us / new / 1e3, "gpu_ms_per_token": cuda_us / new / 1e3}


def _ffn_host_and_gpu_us(ffn) -> tuple[float, float]:
    """(host us per call while queueing, GPU us per call from a CUDA-graph replay)."""
    x = torch.randn(1, 1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    if _num_clusters(ffn):  # MoCLE: one sequence of cluster 0
        layer, ids = ffn, torch.zeros(1, dtype=torch.long, device="cuda")

        def ffn(x):
            return layer(x, cluster_ids=ids)

    with torch.no_grad():
        for _ in range(10):
            ffn(x)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(100):  # ~400 launches: stays under the launch queue's depth
            ffn(x)
        host_us = (time.perf_counter() - start) / 100 * 1e6
        torch.cuda.synchronize()
        try:
            gpu_us = _graph_replay_us(ffn, x)
        except Exception as error:  # a layer that cannot be captured (data-dependent shapes)
            print(f"    CUDA graph capture failed: {type(error).__name__}: {str(error)[:200]}", flush=True)
            gpu_us = float("nan")
    return host_us, gpu_us


def _graph_replay_us(ffn, x: torch.Tensor, calls: int = 20, replays: int = 10) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            ffn(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            ffn(x)
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) * 1e3 / (calls * replays)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--models",
        default="dense,vlmoe,mixtral",
        help="of dense,vlmoe,mole,mocle,mole-merged,mocle-merged,mixtral",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    builders = {
        "dense": ("dense LLaVA (FFN 5632)", lambda: llava(args.layers, FFN)),
        "vlmoe": ("vlmoe LLaVA, upcycled 4x top-2", lambda: vlmoe.upcycle_ffn(llava(args.layers, FFN), 4, 2)),
        "mole": ("vlmoe LLaVA-MoLE", lambda: lora_llava(args.layers)),
        "mocle": ("vlmoe MoCLE", lambda: lora_llava(args.layers, by_cluster=True)),
        "mole-merged": ("vlmoe LLaVA-MoLE, LoRA merged", lambda: vlmoe.merge_lora(lora_llava(args.layers))),
        "mocle-merged": (
            "vlmoe MoCLE, LoRA merged",
            lambda: vlmoe.merge_lora(lora_llava(args.layers, by_cluster=True)),
        ),
        "mixtral": ("transformers Mixtral", lambda: mixtral(args.layers)),
    }
    models, ffns = {}, {}
    for key in args.models.split(","):
        name, build = builders[key]
        models[name] = build().eval()
        language_model = models[name].model if key == "mixtral" else models[name].model.language_model
        ffns[name] = language_model.layers[0].mlp
    rows = {name: {"model": name, "tokens_per_s": []} for name in models}
    with torch.no_grad():
        for model in models.values():  # warm every model (and the GPU clocks) before any timing
            greedy_generate(model, 1, PROMPT, args.new)
        for _ in range(args.rounds):
            for name, model in models.items():
                speed, _ = decode_tokens_per_s(model, 1, PROMPT, args.new)  # (whole call, median step)
                rows[name]["tokens_per_s"].append(speed)
                print(f"  {name}: {speed:.0f} tokens/s", flush=True)
        for name, model in models.items():
            rows[name]["syncs_per_token"] = _syncs_per_token(model)
            print(f"  {name}: {rows[name]['syncs_per_token']:.2f} host syncs per token", flush=True)
    for name, model in models.items():
        with torch.no_grad():
            rows[name].update(_profile(model, name))
            host_us, gpu_us = _ffn_host_and_gpu_us(ffns[name])
        rows[name].update(ffn_host_us=host_us, ffn_gpu_us=gpu_us)
    table = list(rows.values())
    write_json("decode_diagnosis", table)
    print_table(
        f"batch-1 greedy decoding, {args.layers} layers, interleaved; per token; FFN us per call",
        ["model", "tokens/s (rounds)", "syncs/token", "host ms/tok", "GPU ms/tok", "FFN host", "FFN GPU"],
        [
            [
                r["model"],
                " ".join(f"{s:.0f}" for s in r["tokens_per_s"]),
                f"{r['syncs_per_token']:.2f}",
                f"{r['host_ms_per_token']:.2f}",
                f"{r['gpu_ms_per_token']:.2f}",
                f"{r['ffn_host_us']:.0f}",
                f"{r['ffn_gpu_us']:.0f}",
            ]
            for r in table
        ],
    )


if __name__ == "__main__":
    main()
