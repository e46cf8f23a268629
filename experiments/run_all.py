"""Every experiment in one pool of processes: the shared preparation and pre-training once, then
all arms (the GPU stays busy with up to `--parallel` of them), then each experiment's report.

    python -m experiments.run_all --scale gpu --results out/results --parallel 8 --workers 16

Jobs start in list order as their inputs are ready; ChartMoE's alignments come first (they
gate eight arms), then the experiments in the issue's priority order.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from experiments import cli, common
from experiments.chartmoe import run as chartmoe
from experiments.jobs import JobsFailed, only, run_jobs
from experiments.mocle import run as mocle
from experiments.moe_tuning import run as moe_tuning
from experiments.mole import run as mole

EXPERIMENTS = {"chartmoe": chartmoe, "moe_tuning": moe_tuning, "mole": mole, "mocle": mocle}


def results_dir(results: str | None, name: str) -> Path:
    """`<results>/<name>`, or by default the experiment's own `experiments/<name>/results`."""
    return Path(results) / name if results else Path(__file__).parent / name / "results"


def all_jobs(
    work: str, results: str | None, scale: str, budget: float, workers: int, names: Sequence[str]
) -> list:
    """The shared jobs, then each experiment's, in priority order."""
    todo = cli.shared_jobs(work, scale, budget, workers)
    for name in names:
        todo += EXPERIMENTS[name].jobs(work, str(results_dir(results, name)), scale, budget)
    return todo


def main(argv: Sequence[str] | None = None) -> None:
    parse = cli.parser("every vlmoe experiment, arms in parallel")
    parse.add_argument("--experiments", default=",".join(EXPERIMENTS), help="comma-separated subset")
    parse.add_argument(
        "--deadline", type=float, default=None, help="seconds; then stop training jobs and write the reports"
    )
    parse.add_argument(
        "--only",
        default=None,
        help="regular expression: run only the matching jobs (and what they need, and the reports); "
        "the results already in --results stay, so a report covers the earlier runs too",
    )
    args = parse.parse_args(argv)
    cli.limit_threads(args.scale)
    names = [n.strip() for n in args.experiments.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown:
        raise SystemExit(f"--experiments: unknown {unknown}; choose from {list(EXPERIMENTS)}")
    work = args.work or f"/tmp/vlmoe-experiments/{args.scale}"
    for name in names if args.only is None else ():
        for old in ("runs", "routing"):  # a run's results are only its own
            shutil.rmtree(results_dir(args.results, name) / old, ignore_errors=True)
    scale = common.get_scale(args.scale, args.budget)
    parallel = scale.parallel if args.parallel is None else args.parallel
    logs = Path(args.results) / "logs" if args.results else Path(work) / "logs"
    todo = all_jobs(work, args.results, args.scale, args.budget, args.workers, names)
    if args.only is not None:
        todo = only(todo, args.only)
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    try:
        seconds = run_jobs(todo, parallel, logs, deadline=args.deadline)
    except JobsFailed as error:
        seconds = error.seconds
        raise
    finally:
        total = round(time.perf_counter() - start, 1)
        print(f"experiments: {total} s wall in all; job logs in {logs}")
        (logs / "job_seconds.json").write_text(json.dumps({"total_wall_seconds": total, **seconds}, indent=2))


if __name__ == "__main__":
    main()
