"""The forced-expert ablation table from `vlmoe eval` results (ChartMoE's per-expert evaluation).

Each `summary.json` under a folder is one run: routed (`force_expert` null) or every token to
expert i (`vlmoe eval --force-expert i`). The table has one row per (task, metric) and one column
per setting.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class AblationTable:
    """columns: "routed" and "expert i" names; rows: (task, metric) -> {column: value}."""

    columns: list[str] = field(default_factory=list)
    rows: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def to_html(self, expert_names: list[str] | None = None) -> str:
        """An HTML <table>, values in percent, the best of each row in bold."""
        names = expert_names or []

        def title(column: str) -> str:
            if column.startswith("expert ") and column[7:].isdigit() and int(column[7:]) < len(names):
                return f"{column} ({names[int(column[7:])]})"
            return column

        head = "".join(f"<th>{_escape(title(c))}</th>" for c in self.columns)
        lines = [f"<table><tr><th>task</th><th>metric</th>{head}</tr>"]
        for (task, metric), values in self.rows.items():
            best = max(values.values(), default=None)
            cells = []
            for column in self.columns:
                value = values.get(column)
                text = "–" if value is None else f"{100 * value:.2f}"
                cells.append(
                    f"<td><b>{text}</b></td>" if value is not None and value == best else f"<td>{text}</td>"
                )
            lines.append(f"<tr><td>{_escape(task)}</td><td>{_escape(metric)}</td>{''.join(cells)}</tr>")
        lines.append("</table>")
        return "\n".join(lines)


def read_ablation(eval_dir: str | Path) -> AblationTable:
    """Collect every `summary.json` under `eval_dir` into one table.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name, forced, acc in [("0-routed", None, 0.5), ("1-forced", 1, 0.25)]:
        ...     (root / name).mkdir()
        ...     _ = (root / name / "summary.json").write_text(json.dumps(
        ...         {"task": "chartqa", "force_expert": forced, "metrics": {"relaxed_accuracy": acc}}))
        >>> table = read_ablation(root)
        >>> table.columns, table.rows[("chartqa", "relaxed_accuracy")]
        (['routed', 'expert 1'], {'routed': 0.5, 'expert 1': 0.25})
    """
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"--eval-dir {eval_dir} is not a folder of vlmoe eval results")
    table = AblationTable()
    forced: set[int] = set()
    routed = False
    first: dict[tuple[str, str], Path] = {}  # (task, column) -> the summary that filled it
    counted: dict[str, tuple[int, Path]] = {}  # task -> (samples scored, the first summary saying so)
    for path in sorted(eval_dir.rglob("summary.json")):
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue  # not a finished run
        if not isinstance(summary, dict) or not isinstance(summary.get("metrics"), dict):
            continue
        expert = summary.get("force_expert")
        column = "routed" if expert is None else f"expert {int(expert)}"
        if expert is None:
            routed = True
        else:
            forced.add(int(expert))
        task = str(summary.get("task", path.parent.name))
        # Two runs of one setting (two models, --pot and not, --force-where connector and all) would
        # silently share one cell, the later file winning.
        if (task, column) in first:
            raise ValueError(
                f"{first[task, column]} and {path} are both {task} results of one setting ({column}); a "
                "table compares one model's settings: pass the folder of one model's runs as --eval-dir"
            )
        first[task, column] = path
        # A forced run over --limit 50 beside a routed run over every sample compares two sample sets.
        count = summary.get("num_samples")
        if count is not None:
            seen = counted.setdefault(task, (count, path))
            if seen[0] != count:
                raise ValueError(
                    f"{seen[1]} scores {seen[0]} {task} samples and {path} scores {count}; a table compares "
                    "settings on the same samples: rerun them with the same --limit (or none)"
                )
        for metric, value in summary["metrics"].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                table.rows.setdefault((task, metric), {})[column] = float(value)
        table.sources.append(str(path))
    table.columns = (["routed"] if routed else []) + [f"expert {e}" for e in sorted(forced)]
    return table


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
