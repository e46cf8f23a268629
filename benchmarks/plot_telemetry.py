"""Pictures of the benchmarks' GPU telemetry, from the JSON they write.

    python benchmarks/plot_telemetry.py results/clocks.json         # -> results/clocks.png
    python benchmarks/plot_telemetry.py results/moe_layer.json      # -> results/moe_layer_rounds.png

Why pictures: at the power cap a step's time follows its SM clock (NOTES.md session 18), and
what the tables print as r(ms, MHz) per method reads at a glance as a timeline or a scatter.
- clocks.json (`clocks.py`): per method, ms per step, SM clock and board power over the
  sustained blocks' quarters, the burst (from idle) as the point before them;
- moe_layer.json with `--telemetry`: per shape, each paired round's ms against its SM clock, one
  colour per method, with each method's r(ms, MHz) in the legend.
`clocks.py` and `moe_layer.py --telemetry` write these beside their JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import textwrap
from pathlib import Path
from typing import Any


def _figure(**kwargs: Any) -> Any:
    """A matplotlib figure drawn off-screen (imported here: the benchmarks that call `picture`
    run where matplotlib may be missing, and say so instead of failing)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(constrained_layout=True, **kwargs)


def _label(method: str) -> str:
    """A legend label: the method's whole name (probes differ only at its end), wrapped."""
    return textwrap.fill(method, width=56, max_lines=3, placeholder=" …")


def correlation(xs: list[float], ys: list[float]) -> float | None:
    """Pearson's r, or None where it is undefined (under 3 points, or no spread)."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return statistics.correlation(xs, ys)


def clocks_series(rows: list[dict]) -> dict[str, dict[str, list[float]]]:
    """clocks.json's rows -> per method, its `ms`, `sm_mhz` and `power_w` in time order: the burst's
    median first (None where it has no telemetry), then each sustained block's quarters."""
    series: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        entry = series.setdefault(row["method"], {"ms": [], "sm_mhz": [], "power_w": []})
        if row["phase"] == "burst":
            clocks = row.get("clocks") or {}
            points = [{"ms": statistics.median(row["ms"]), **clocks}]
        else:
            points = row["quarters"]
        for point in points:
            for field in entry:
                entry[field].append(point.get(field))
    return series


def plot_clocks(rows: list[dict], png: Path, title: str = "") -> Path:
    """Three panels over time (ms per step, SM MHz, board W), one line per method -> `png`."""
    series = clocks_series(rows)
    if not series:
        raise ValueError("no rows to plot (did clocks.py finish?)")
    figure = _figure(figsize=(10, 8))
    axes = figure.subplots(3, 1, sharex=True)
    for method, entry in series.items():
        points = range(len(entry["ms"]))
        for axis, field in zip(axes, ("ms", "sm_mhz", "power_w"), strict=True):
            values = [float("nan") if value is None else value for value in entry[field]]
            axis.plot(points, values, marker="o", markersize=3, label=_label(method))
    for axis, label in zip(axes, ("ms per step", "SM clock (MHz)", "board power (W)"), strict=True):
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[-1].set_xlabel("0: burst from idle; then the sustained blocks' quarters, in order")
    figure.suptitle(title or "step time against the GPU's clock and power")
    figure.savefig(png, dpi=110)
    return png


def plot_rounds(rows: list[dict], png: Path, title: str = "") -> Path:
    """One panel per shape: each paired round's ms against its mean SM clock, per method -> `png`.
    Rows without round telemetry (no `--telemetry`, or LoRA rows) are left out."""
    shapes: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("round_clocks") and row.get("round_ms"):
            shape = row["shape"]  # "(T, d, ff, E, k)" as the JSON has it, or a list
            shapes.setdefault(shape if isinstance(shape, str) else str(tuple(shape)), []).append(row)
    if not shapes:
        raise ValueError("no rows with round telemetry (run moe_layer.py with --telemetry)")
    figure = _figure(figsize=(6 * len(shapes), 5))
    axes = figure.subplots(1, len(shapes), squeeze=False)[0]
    for axis, (shape, shape_rows) in zip(axes, shapes.items(), strict=True):
        for row in shape_rows:
            pairs = [
                (clocks["sm_mhz"], ms)
                for clocks, ms in zip(row["round_clocks"], row["round_ms"], strict=True)
                if clocks
            ]
            mhz, ms = [p[0] for p in pairs], [p[1] for p in pairs]
            r = correlation(ms, mhz)
            label = _label(row["method"]) + ("" if r is None else f"  r = {r:.2f}")
            axis.scatter(mhz, ms, s=24, label=label)
        axis.set_title(f"shape {shape}", fontsize=10)
        axis.set_xlabel("SM clock in the round (MHz)")
        axis.set_ylabel("ms per step")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(title or "paired rounds: step time against the SM clock")
    figure.savefig(png, dpi=110)
    return png


def plot_file(path: Path, out: Path | None = None) -> Path:
    """The picture for a benchmark's JSON (clocks.json or moe_layer.json) -> the PNG written."""
    try:
        payload = json.loads(path.read_text())
        rows = payload["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a benchmark's JSON with 'rows' ({error})") from error
    title = f"{payload.get('device', '')}, torch {payload.get('torch', '')}"
    try:
        if rows and "phase" in rows[0]:
            return plot_clocks(rows, out or path.with_suffix(".png"), title)
        return plot_rounds(rows, out or path.with_name(path.stem + "_rounds.png"), title)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def picture(path: Path) -> str:
    """`plot_file` for a benchmark that has just written `path`: a line saying where the PNG went,
    or why there is none (the JSON and the printed tables stand without it)."""
    try:
        return f"picture: {plot_file(path)}"
    except ImportError as error:
        return f"no picture of {path.name}: {error} (pip install matplotlib)"
    except ValueError as error:
        return f"no picture: {error}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", type=Path, help="clocks.json or moe_layer.json")
    parser.add_argument("-o", "--out", type=Path, help="the PNG (default: beside the JSON)")
    args = parser.parse_args()
    try:
        print(plot_file(args.json, args.out))
    except ValueError as error:
        sys.exit(str(error))


if __name__ == "__main__":
    main()
