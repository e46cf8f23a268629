"""Writing an experiment's results: one JSON per run, a summary JSON, a markdown table, PNG curves.

<results>/runs/<arm>-seed<k>.json   what one arm's job measured
<results>/summary.json              every run plus mean and std over seeds per arm
<results>/results.md                the table(s) of means ± std (and the scale, the machine)
<results>/*.png                     loss curves and the experiment's pictures
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch


def write_run(results: str | Path, name: str, data: Mapping[str, Any]) -> Path:
    path = Path(results) / "runs" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))
    return path


def read_runs(results: str | Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((Path(results) / "runs").glob("*.json"))]


def aggregate(runs: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """{arm: {metric: [mean, std, n]}} over the runs (seeds) of each arm, in first-seen order.

    >>> aggregate([{"arm": "a", "x": 1.0}, {"arm": "a", "x": 3.0}], ["x"])["a"]["x"]
    [2.0, 1.4142, 2]
    """
    arms: dict[str, dict[str, Any]] = {}
    for run in runs:
        arms.setdefault(run["arm"], {})
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm]
        for metric in metrics:
            values = [float(r[metric]) for r in rows if r.get(metric) is not None]
            if not values:
                continue
            mean = sum(values) / len(values)
            var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            arms[arm][metric] = [round(mean, 4), round(math.sqrt(var), 4), len(values)]
    return arms


def markdown_table(
    table: Mapping[str, Mapping[str, Any]], columns: Sequence[tuple[str, str]], first: str = "arm"
) -> str:
    """Rows of `table` ({row: {metric: [mean, std, n]}}) with (metric, header) `columns`.

    >>> print(markdown_table({"a": {"x": [0.5, 0.1, 2]}}, [("x", "X")]))
    | arm | X |
    | --- | --- |
    | a | 0.500 ± 0.100 |
    """
    lines = [f"| {first} | " + " | ".join(h for _, h in columns) + " |"]
    lines.append("| --- |" + " --- |" * len(columns))
    for row, values in table.items():
        cells = [_cell(values.get(metric)) for metric, _ in columns]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    mean, std, n = value
    if abs(mean) >= 1000:
        return f"{mean:,.0f}" + (f" ± {std:,.0f}" if n > 1 else "")
    return f"{mean:.3f}" + (f" ± {std:.3f}" if n > 1 else "")


def environment() -> dict[str, str]:
    """The machine and versions, for the results' header."""
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def write_summary(
    results: str | Path, title: str, scale: str, sections: Sequence[tuple[str, str]], data: Mapping[str, Any]
) -> Path:
    """`summary.json` (data + environment) and `results.md` (title, scale note, the sections)."""
    results = Path(results)
    env = environment()
    (results / "summary.json").write_text(json.dumps({"scale": scale, "environment": env, **data}, indent=2))
    note = (
        "Smoke scale: a seconds-long CPU run that proves the pipeline; these numbers are not results."
        if scale == "smoke"
        else "GPU scale."
    )
    versions = f"torch {env['torch']}, transformers {env['transformers']}"
    header = f"# {title}\n\n{note} Machine: {env['gpu']}; {versions}.\n"
    body = "\n\n".join(f"## {name}\n\n{text}" for name, text in sections)
    path = results / "results.md"
    path.write_text(header + "\n" + body + "\n")
    return path


def plot_curves(
    curves: Mapping[str, Sequence[Sequence[tuple[int, float]]]],
    path: str | Path,
    title: str,
    ylabel: str = "loss",
) -> Path:
    """One colour per arm, one line per seed; `curves` maps an arm to its seeds' (step, value) lists."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    for i, (arm, seeds) in enumerate(curves.items()):
        for j, points in enumerate(seeds):
            if points:
                x, y = zip(*points, strict=True)
                axes.plot(x, y, color=colours(i % 10), alpha=0.9, label=arm if j == 0 else None, lw=1.2)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def plot_bars(
    table: Mapping[str, Mapping[str, Any]], metrics: Sequence[tuple[str, str]], path: str | Path, title: str
) -> Path:
    """Grouped bars of each arm's mean (std as error bars) for each metric."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6, 1.2 * len(table) * len(metrics) / 2 + 3), 4))
    axes = figure.add_subplot()
    width = 0.8 / max(len(metrics), 1)
    arms = list(table)
    for j, (metric, label) in enumerate(metrics):
        means = [table[a].get(metric, [math.nan])[0] for a in arms]
        stds = [table[a].get(metric, [0, 0])[1] for a in arms]
        axes.bar([i + j * width for i in range(len(arms))], means, width, yerr=stds, label=label, capsize=3)
    axes.set_xticks(
        [i + width * (len(metrics) - 1) / 2 for i in range(len(arms))], arms, rotation=20, fontsize=8
    )
    axes.set_title(title)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path
