"""Batched greedy decoding throughput: upcycled vlmoe LLaVA vs stock transformers Mixtral.

    python benchmarks/generation.py [--layers 12] [--prompt 128] [--new 128]

Same LM shape for both (d=2048, FFN 5632, 4 experts top-2, bf16, SDPA, KV cache), text-only
prompts, batch 1 and 32; tokens/s counts generated tokens. Writes generation.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import vlmoe
from common import print_table, write_json
from train_step import FFN, VOCAB, llava, mixtral


def decode_tokens_per_s(model, batch: int, prompt: int, new: int, reps: int = 3) -> float:
    input_ids = torch.randint(0, VOCAB - 2, (batch, prompt), device="cuda")
    attention_mask = torch.ones_like(input_ids)
    kwargs = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    model.generate(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False, pad_token_id=0
    )
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return batch * new / sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new", type=int, default=128)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    builders = (
        ("vlmoe LLaVA, upcycled 4 experts top-2", lambda: vlmoe.upcycle_ffn(llava(args.layers, FFN), 4, 2)),
        ("transformers Mixtral (grouped_mm)", lambda: mixtral(args.layers)),
    )
    for name, build in builders:
        model = build().eval()
        for batch in (1, 32):
            with torch.no_grad():
                speed = decode_tokens_per_s(model, batch, args.prompt, args.new)
            rows.append({"model": name, "batch": batch, "tokens_per_s": speed})
            print(f"  {name}, batch {batch}: {speed:.0f} tokens/s", flush=True)
        del model
        torch.cuda.empty_cache()
    for row in rows:
        stock = next(r for r in rows if r["batch"] == row["batch"] and "Mixtral" in r["model"])
        row["ratio_to_mixtral"] = row["tokens_per_s"] / stock["tokens_per_s"]
    write_json("generation", rows)
    print_table(
        f"greedy decoding, {args.layers} layers, prompt {args.prompt}, {args.new} new tokens",
        ["model", "batch", "tokens/s", "ratio to Mixtral"],
        [[r["model"], r["batch"], f"{r['tokens_per_s']:.0f}", f"{r['ratio_to_mixtral']:.2f}"] for r in rows],
    )


if __name__ == "__main__":
    main()
