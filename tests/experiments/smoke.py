"""One experiment's smoke run and the checks every experiment's summary shares."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import ModuleType
from typing import Any


def smoke_summary(run: ModuleType, shared_work: Path, results: Path) -> dict[str, Any]:
    """Run the experiment `run` (its `run.py` module) at smoke scale; its `summary.json`."""
    run.main(["--scale", "smoke", "--work", str(shared_work), "--results", str(results), "--workers", "1"])
    return json.loads((results / "summary.json").read_text())


def assert_every_arm_finite(run: ModuleType, summary: dict[str, Any]) -> None:
    """The summary has the experiment's arms, in order, and every table metric is a number."""
    assert list(summary["arms"]) == list(run.ARMS)
    for arm, metrics in summary["arms"].items():
        for name, _ in run.METRICS:
            assert math.isfinite(metrics[name][0]), (arm, name)
