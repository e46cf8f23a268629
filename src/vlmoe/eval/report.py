"""The on-screen table of an evaluation summary."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def summary_table(summary: dict[str, Any]) -> Table:
    """One row for the whole benchmark and one per subset, one column per metric (in percent).

    Example:
        >>> summary = {"task": "pope", "num_samples": 2, "metrics": {"accuracy": 0.5}, "by_subset": {}}
        >>> summary_table(summary).row_count
        1
    """
    metric_names = list(summary["metrics"])
    title = f"{summary['task']}: {summary['num_samples']} samples"
    if summary.get("force_expert") is not None:
        title += f", every token to expert {summary['force_expert']} ({summary.get('force_where')})"
    table = Table(title=title)
    table.add_column("subset")
    for name in metric_names:
        table.add_column(name, justify="right")
    rows = [("all", summary["metrics"]), *summary.get("by_subset", {}).items()]
    for name, metrics in rows:
        table.add_row(name, *(f"{100 * metrics.get(metric, float('nan')):.2f}" for metric in metric_names))
    return table
