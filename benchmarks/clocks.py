"""Step time against the GPU's clocks: the MoE FFN layer and its compiled dense-equivalent (and
the layer under `moe_layer.py`'s probes) from idle and under sustained load, one process.

    python benchmarks/clocks.py [--shape 3] [--probe more] [--compiled-layer] [--seconds 2] [--blocks 4]

Why: the same layer's paired rounds at the 64-expert shape read 9.0-9.5 or 9.8-10.3 ms a step
(NOTES.md sessions 16-17), and tiles that win the tuner's short timing lose 2% inside the layer
at shape 1. Both would follow if the GPU ran at a lower SM clock under a power cap in a long loop
than in a short burst, and more so for some kernels than others. This prints, for each method:
- burst: 5 steps after 2 s idle (what a tuner timing a few calls sees);
- sustained: `--blocks` blocks of `--seconds` each, methods alternating block by block, each block
  split in quarters: median ms, mean SM clock and power, the share of samples under NVML's
  power cap, and joules per step (mean power x median step time);
`--compiled-layer` adds the layer under torch.compile beside its eager self (target 4's gain, and
target 1 read compiled against compiled). Writes clocks.json and clocks.png (`plot_telemetry.py`).
Needs nvidia-ml-py (carried in .whl to the device).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import step_times, write_json
from moe_layer import (
    DENSE_COMPILED,
    FFN_SHAPES,
    PROBES,
    SHIPPED,
    _first_step_s,
    _train_step,
    build_ffn,
    prepare_probe,
)
from plot_telemetry import picture
from telemetry import GpuSampler

COMPILED_LAYER = "vlmoe layer, torch.compile"


def _timed_steps(step, count: int) -> tuple[list[float], float, float]:
    """`count` steps back to back -> (each step's GPU ms, host start, host end)."""
    start = time.perf_counter()
    ms = step_times(step, warmup=0, reps=count)
    return ms, start, time.perf_counter()


def _quarters(ms: list[float], start: float, end: float, sampler: GpuSampler) -> list[dict]:
    """The block in four equal parts by step count, each with its clocks (host times spread
    evenly over the steps: the GPU ran them back to back)."""
    parts = []
    span_s = (end - start) / len(ms)
    for q in range(4):
        lo, hi = q * len(ms) // 4, (q + 1) * len(ms) // 4
        window = sampler.window(start + lo * span_s, start + hi * span_s)
        median = statistics.median(ms[lo:hi])
        part = {"ms": median, **(window.as_dict() if window else {})}
        if window:
            part["joules_per_step"] = window.power_w * median / 1000
        parts.append(part)
    return parts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", type=int, default=3, choices=range(1, len(FFN_SHAPES) + 1))
    parser.add_argument("--probe", action="append", default=[], choices=sorted(PROBES))
    parser.add_argument(
        "--compiled-layer", action="store_true", help="also time torch.compile(layer), as one more method"
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one sustained block")
    parser.add_argument("--blocks", type=int, default=4, help="sustained blocks per method")
    args = parser.parse_args()
    sampler = GpuSampler.open()
    if sampler is None:
        sys.exit("clocks.py needs NVML: pip install nvidia-ml-py")
    shape = FFN_SHAPES[args.shape - 1]
    dense, moe, x, x_dense = build_ffn(*shape)
    compiled = torch.compile(dense)
    steps = {}
    methods = [(DENSE_COMPILED, compiled, x_dense), (SHIPPED, moe, x)]
    if args.compiled_layer:
        methods.append((COMPILED_LAYER, torch.compile(moe), x))
    for name, module, inputs in methods:
        first_s = _first_step_s(module, inputs)  # compiling and tuning, outside every timing
        with torch.no_grad():
            grad_out = torch.randn_like(module(inputs))
        steps[name] = _train_step(module, inputs, grad_out)
        print(f"  {name}: first step {first_s:.1f} s", flush=True)
    for probe in (PROBES[p] for p in args.probe):
        note = prepare_probe(probe, moe, x)  # as the shipped layer's first step, outside every timing
        steps[probe.label] = _train_step(moe, x, torch.randn_like(x), probe.around)
        print(f"  {probe.label}: {note}", flush=True)
    print(f"device: {torch.cuda.get_device_name()}  shape {shape}  power: {sampler.power_source}", flush=True)
    rows = []
    with sampler:
        step_ms = {}
        for name, step in steps.items():
            time.sleep(2.0)
            ms, start, end = _timed_steps(step, 8)
            window = sampler.window(start, end)
            step_ms[name] = statistics.median(ms)
            rows.append(
                {"method": name, "phase": "burst", "ms": ms, "clocks": window.as_dict() if window else None}
            )
            print(
                f"  burst  {name}: {statistics.median(ms):.3f} ms; {window.brief() if window else '-'}",
                flush=True,
            )
        for block in range(args.blocks):
            for name, step in steps.items():
                ms, start, end = _timed_steps(step, max(int(args.seconds * 1000 / step_ms[name]), 8))
                parts = _quarters(ms, start, end, sampler)
                rows.append({"method": name, "phase": "sustained", "block": block, "quarters": parts})
                cells = "  ".join(
                    f"{p['ms']:.2f} ms {p.get('sm_mhz', 0):.0f} MHz {p.get('power_w', 0):.0f} W "
                    f"cap {p.get('reason_share', {}).get('power-cap', 0):.0%}"
                    for p in parts
                )
                print(f"  block {block} {name}:\n    {cells}", flush=True)
    print("\nsustained, all blocks: median of quarter medians")
    for name in steps:
        quarters = [
            q for r in rows if r["method"] == name and r["phase"] == "sustained" for q in r["quarters"]
        ]
        ms = statistics.median(q["ms"] for q in quarters)
        mhz = statistics.fmean(q.get("sm_mhz", 0) for q in quarters)
        watts = statistics.fmean(q.get("power_w", 0) for q in quarters)
        joules = statistics.median(q.get("joules_per_step", 0) for q in quarters)
        print(f"  {name}: {ms:.3f} ms, {mhz:.0f} MHz, {watts:.0f} W, {joules:.2f} J/step")
    print(picture(write_json("clocks", rows)))


if __name__ == "__main__":
    main()
