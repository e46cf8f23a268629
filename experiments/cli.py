"""The command line shared by every experiment's `run.py`: scale, folders, parallel processes, budget."""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from experiments.common import SCALES, get_scale


def shared_jobs(work: str, scale: str, budget: float, workers: int) -> list:
    """Preparation and dense pre-training: every experiment's jobs run after "pretrain"."""
    from experiments.jobs import Job

    kwargs = {"work": work, "scale": scale, "budget": budget}
    return [
        Job("prepare", "experiments.common:prepare", {**kwargs, "workers": workers}),
        Job("pretrain", "experiments.common:pretrain", kwargs, ("prepare",)),
    ]


def parser(description: str) -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parse.add_argument(
        "--work", default=None, help="models and data (default /tmp/vlmoe-experiments/<scale>)"
    )
    parse.add_argument("--results", default=None, help="results folder (default experiments/<name>/results)")
    parse.add_argument(
        "--parallel", type=int, default=None, help="arm processes at once (default: the scale's)"
    )
    parse.add_argument("--budget", type=float, default=1.0, help="multiplies every step count")
    parse.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="chart drawing processes")
    return parse


def limit_threads(scale: str) -> None:
    """One torch thread at smoke scale: models of a few thousand weights gain nothing from threads,
    and on a busy machine their contention made a smoke run ten times slower."""
    if scale == "smoke":
        torch.set_num_threads(1)


def main(
    name: str, jobs: Callable[[str, str, str, float], Sequence], argv: Sequence[str] | None = None
) -> None:
    """One experiment's command line: the shared jobs, its own jobs, in parallel processes or not."""
    from experiments.jobs import run_jobs

    args = parser(f"vlmoe experiment {name}").parse_args(argv)
    limit_threads(args.scale)
    work = args.work or f"/tmp/vlmoe-experiments/{args.scale}"
    results = args.results or str(Path(__file__).parent / name / "results")
    scale = get_scale(args.scale, args.budget)
    todo = [
        *shared_jobs(work, args.scale, args.budget, args.workers),
        *jobs(work, results, args.scale, args.budget),
    ]
    parallel = scale.parallel if args.parallel is None else args.parallel
    for old in ("runs", "routing"):  # a run's results are only its own
        shutil.rmtree(Path(results) / old, ignore_errors=True)
    seconds = run_jobs(todo, parallel, Path(work) / "logs")
    Path(results).mkdir(parents=True, exist_ok=True)
    (Path(results) / "job_seconds.json").write_text(json.dumps(seconds, indent=2))
