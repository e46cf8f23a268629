"""CPU time per training batch of `ConversationCollator`: each image processed once (for its
part, the per-image tensors concatenated) vs also a second time in one processor call over the
batch (the collator before 2026-12-01; still its path for Idefics3's tiles).

The data are the experiments' (synthetic charts, every chart task, LLaVA-style prompts) with the
tiny model's processor of each family resized to `--size` px. The two paths alternate batch by
batch in one process, so a machine shared with other jobs slows both alike; the ratio is the
stable number.

    PYTHONPATH=src python benchmarks/collate_speed.py --families llava qwen2_vl --size 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from unittest import mock

from vlmoe.data import ChartSetConfig, ConversationCollator, generate_chart_set
from vlmoe.data import collator as collator_module
from vlmoe.models import tiny
from vlmoe.train.data import chart_samples
from vlmoe.train.recipe import ChartDataConfig

TASKS = ["chart_type", "chart_qa", "chart_to_table", "chart_to_json", "chart_to_code"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--families", nargs="+", default=["llava", "qwen2_vl"])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--batches", type=int, default=10)
    args = parser.parse_args()
    charts = ChartDataConfig(n=args.batch * 2, seed=0, size_px=args.size, tasks=TASKS, held_out=0)
    with tempfile.TemporaryDirectory() as work:
        generate_chart_set(Path(work) / "charts", ChartSetConfig(n=charts.n, seed=0, size_px=args.size))
        samples = chart_samples(charts, work)
        rows = []
        for family in args.families:
            _, processor = tiny(family)
            collator = ConversationCollator(processor, max_length=None)
            batches = [samples[(i * args.batch) % len(samples) :][: args.batch] for i in range(args.batches)]
            collator(batches[0])  # warm-up
            times: dict[str, list[float]] = {"once": [], "batch call too": []}
            for batch in batches:
                for path in times:
                    began = time.perf_counter()
                    if path == "once":
                        collator(batch)
                    else:  # the old path: the batch's images processed again in one call
                        with mock.patch.object(collator_module, "_joined_image_inputs", return_value=None):
                            collator(batch)
                    times[path].append(time.perf_counter() - began)
            once, twice = (statistics.median(times[p]) * 1000 for p in ("once", "batch call too"))
            rows.append(
                {"family": family, "once_ms": once, "batch_call_too_ms": twice, "speedup": twice / once}
            )
    print(f"collator, batch {args.batch}, {args.size}-px charts, median of {args.batches} batches")
    print(f"{'family':<12} {'once ms':>9} {'+batch call ms':>15} {'speedup':>8}")
    for row in rows:
        once, twice, speedup = row["once_ms"], row["batch_call_too_ms"], row["speedup"]
        print(f"{row['family']:<12} {once:>9.1f} {twice:>15.1f} {speedup:>8.2f}")
    out = Path(__file__).parent / "results" / "collate_speed.json"
    out.write_text(json.dumps({"size": args.size, "batch": args.batch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
