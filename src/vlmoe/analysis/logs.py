"""Router statistics over training, read from the trainer's logs.

The trainer logs per-layer router scalars named `aux/<layer name>/<statistic>` (e.g.
`aux/model.language_model.layers.0.mlp/load_balance`, `.../z_loss`, `.../load_entropy`). A
list-valued statistic (tokens per expert) is turned into its load entropy. Logs are a JSON-lines
file of dicts, an HF `trainer_state.json` or vlmoe's `stage_done.json` (their `log_history`), a
JSON list of dicts, or a folder holding one of those (the newest under it wins). Entries without
aux keys, non-numeric values and missing steps are tolerated.

A folder may be a `vlmoe train` stage or run folder: a finished stage's `stage_done.json` holds
its whole `log_history`, while a checkpoint's `trainer_state.json` stops at that checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from vlmoe.analysis.stats import expert_load_entropy

PREFIX = "aux/"
STAGE_LOG = "stage_done.json"  # what vlmoe train writes when a stage ends (vlmoe.train.stages)
Series = dict[str, dict[str, tuple[list[float], list[float]]]]  # statistic -> layer -> (steps, values)


def read_log_history(path: str | Path) -> list[dict[str, Any]]:
    """The list of logged dicts in `path` (JSONL, trainer_state.json, JSON list, or a folder of one).

    Example:
        >>> import tempfile
        >>> log = Path(tempfile.mkdtemp()) / "log.jsonl"
        >>> _ = log.write_text('{"step": 1, "aux/l0/z_loss": 0.5}\\n')
        >>> read_log_history(log)
        [{'step': 1, 'aux/l0/z_loss': 0.5}]
    """
    path = Path(path)
    if path.is_dir():
        # vlmoe train's stage_done.json holds a finished stage's whole log_history, a checkpoint's
        # trainer_state.json only the steps up to that save; the newest file is the latest stage.
        found = [*path.rglob(STAGE_LOG), *path.rglob("trainer_state.json")]
        candidates = sorted(found, key=lambda p: p.stat().st_mtime)
        candidates = candidates or sorted(path.rglob("*.jsonl"))
        if not candidates:
            raise FileNotFoundError(
                f"--logs {path}: no {STAGE_LOG}, trainer_state.json or *.jsonl under this folder"
            )
        path = candidates[-1]
    if not path.is_file():
        raise FileNotFoundError(f"--logs {path} does not exist; pass a trainer_state.json or a JSONL log")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(
            f"--logs {path} is not a text file (TensorBoard events are not read); pass a "
            f"trainer_state.json, a {STAGE_LOG}, a JSONL log or the training run's folder"
        ) from None
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(text.splitlines()):
                    break  # a half-written last line of a running trainer
                raise ValueError(f"--logs {path} line {number} is not valid JSON") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"--logs {path} is not valid JSON (line {error.lineno}: {error.msg})") from None
        entries = data.get("log_history") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise ValueError(f"--logs {path}: expected a list of dicts or a dict with 'log_history'")
    return [entry for entry in entries if isinstance(entry, dict)]


def router_series(entries: Iterable[Mapping[str, Any]]) -> Series:
    """{statistic: {layer: (steps, values)}} from logged dicts; an entry without "step" uses its index.

    Example:
        >>> router_series([{"step": 10, "aux/layers.0.mlp/load_balance": 1.2, "loss": 3.0},
        ...                {"aux/layers.0.mlp/load_balance": "nan?"}])
        {'load_balance': {'layers.0.mlp': ([10.0], [1.2])}}
    """
    series: Series = {}
    for index, entry in enumerate(entries):
        step = entry.get("step", index)
        if not isinstance(step, (int, float)):
            step = index
        for key, value in entry.items():
            if not isinstance(key, str) or not key.startswith(PREFIX) or key.count("/") < 2:
                continue
            layer, _, statistic = key[len(PREFIX) :].rpartition("/")
            if isinstance(value, list):
                if not all(isinstance(v, (int, float)) for v in value):
                    continue
                value, statistic = expert_load_entropy(value), "load_entropy"
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            steps, values = series.setdefault(statistic, {}).setdefault(layer, ([], []))
            steps.append(float(step))
            values.append(float(value))
    return series
