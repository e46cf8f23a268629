"""CPU time per synthetic chart (render + PNG), plain Agg canvas vs the cached-text canvas.

Runs in one process like a `vlmoe data charts` worker (one warm-up chart, then the collector's
old objects frozen and its young threshold raised) and alternates batches of the two renderers,
so a machine shared with other jobs slows both alike; the ratio is the stable number, the
milliseconds depend on the load.

    PYTHONPATH=src python benchmarks/chart_speed.py --charts 400
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg

from vlmoe.data.chart_dataset import YOUNG_GC_THRESHOLD, ChartSetConfig, chart_entry
from vlmoe.data.chart_record import sample_chart_record
from vlmoe.data.chart_render import ChartRenderer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--charts", type=int, default=400)
    parser.add_argument("--size", type=int, default=336)
    parser.add_argument("--batch", type=int, default=25)
    args = parser.parse_args()
    renderers = {
        "plain Agg": ChartRenderer(args.size, FigureCanvasAgg),
        "cached text": ChartRenderer(args.size),
    }
    for renderer in renderers.values():
        renderer.render_png(sample_chart_record(0, 0))
    gc.collect()  # the collector set up as in generate_chart_set
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    per_batch: dict[str, list[float]] = {name: [] for name in renderers}
    for start in range(0, args.charts, args.batch):
        records = [sample_chart_record(0, i) for i in range(start, min(start + args.batch, args.charts))]
        for name, renderer in renderers.items():
            began = time.process_time()
            for record in records:
                renderer.render_png(record)
            per_batch[name].append((time.process_time() - began) / len(records) * 1000)
    config = ChartSetConfig(n=args.charts, size_px=args.size)
    began = time.process_time()
    for index in range(args.charts):  # the main process's share: records, QA, conversations
        line, samples = chart_entry(config, index)
        json.dumps(line), [json.dumps(s) for s in samples]
    entry_ms = (time.process_time() - began) / args.charts * 1000
    result = {
        "charts": args.charts,
        "size_px": args.size,
        "load_average": os.getloadavg(),
        "render_ms_median": {name: statistics.median(v) for name, v in per_batch.items()},
        "render_ms_mean": {name: statistics.fmean(v) for name, v in per_batch.items()},
        "cached_over_plain": statistics.median(
            c / p for c, p in zip(per_batch["cached text"], per_batch["plain Agg"], strict=True)
        ),
        "entry_ms": entry_ms,
    }
    print(f"{args.charts} charts at {args.size} px, load average {result['load_average'][0]:.2f}")
    for name in renderers:
        print(
            f"  {name:12s} render+PNG {result['render_ms_median'][name]:5.1f} ms/chart (median of batches), "
            f"{result['render_ms_mean'][name]:5.1f} mean"
        )
    print(
        f"  cached/plain {result['cached_over_plain']:.3f}; records+QA+conversations {entry_ms:.2f} ms/chart"
    )
    out = Path(__file__).parent / "results" / "chart_speed.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
