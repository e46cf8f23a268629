"""Run an experiment's jobs (shared preparation, arms x seeds, the report) respecting their order.

A job is a function named by "module:function" with JSON keyword arguments, so the same job runs
in this process (`parallel=1`: CPU smoke runs and tests) or as its own `python -m
experiments.jobs` process (`parallel>1`: the GPU, where one small model leaves the H200 mostly
idle and several arms train at once). Each process writes its log to `<logs>/<job>.log`.

    python -m experiments.jobs '{"target": "experiments.common:prepare", "kwargs": {...}}'
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Job:
    """`target(**kwargs)` once every job named in `after` has finished."""

    name: str
    target: str  # "package.module:function"
    kwargs: dict[str, Any] = field(default_factory=dict)
    after: tuple[str, ...] = ()
    always: bool = False  # run even when some of `after` failed (a report of what finished)


class JobsFailed(RuntimeError):
    def __init__(self, message: str, seconds: dict[str, float]) -> None:
        super().__init__(message)
        self.seconds = seconds  # of the jobs that finished


def call(target: str, kwargs: dict[str, Any]) -> Any:
    """Import and call "module:function" with `kwargs`.

    >>> call("math:gcd", {})
    0
    """
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)(**kwargs)


def only(jobs: Sequence[Job], pattern: str) -> list[Job]:
    """The jobs whose name matches the regular expression `pattern`, the jobs they need (after
    them, transitively), and the `always` jobs (reports) that wait on any of those, each waiting
    only on what is kept; in the original order.

    >>> chain = [Job("prep", "m:f"), Job("a", "m:f", after=("prep",)), Job("b", "m:f", after=("prep",)),
    ...          Job("report", "m:f", after=("a", "b"), always=True)]
    >>> [(j.name, j.after) for j in only(chain, "^a$")]
    [('prep', ()), ('a', ('prep',)), ('report', ('a',))]
    """
    by_name = {job.name: job for job in jobs}
    keep: set[str] = set()
    todo = [job.name for job in jobs if not job.always and re.search(pattern, job.name)]
    if not todo:
        raise ValueError(f"no job name matches {pattern!r}; the jobs are {[job.name for job in jobs]}")
    while todo:
        name = todo.pop()
        if name not in keep:
            keep.add(name)
            todo += by_name[name].after
    kept = []
    for job in jobs:
        if job.name in keep:
            kept.append(job)
        elif job.always and any(name in keep for name in job.after):
            kept.append(replace(job, after=tuple(name for name in job.after if name in keep)))
    return kept


def run_jobs(
    jobs: Sequence[Job], parallel: int, logs: str | Path, deadline: float | None = None
) -> dict[str, float]:
    """Run `jobs` (at most `parallel` at once), each after its `after` jobs; returns seconds per job.

    A failed job fails the jobs after it, except `always` jobs (the reports), which run once
    their inputs have finished either way; the others still run; then `JobsFailed` names the
    failures and their logs. Past `deadline` seconds no job starts and running ones are stopped,
    except `always` jobs, so a run that is too slow still reports what it finished.
    """
    names = [job.name for job in jobs]
    for job in jobs:
        unknown = [name for name in job.after if name not in names]
        if unknown or len(set(names)) != len(names):
            raise ValueError(f"job {job.name}: unknown or duplicate job names {unknown or names}")
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    failed: dict[str, str] = {}
    if parallel <= 1:  # in order; an exception stops the run where it happened
        for job in jobs:
            start = time.perf_counter()
            call(job.target, job.kwargs)
            seconds[job.name] = round(time.perf_counter() - start, 1)
        return seconds
    began = time.perf_counter()
    pending = list(jobs)
    running: dict[str, tuple[Job, subprocess.Popen, Any, float]] = {}
    while pending or running:
        late = deadline is not None and time.perf_counter() - began > deadline
        for job in list(pending):
            if not job.always and (late or any(name in failed for name in job.after)):
                failed[job.name] = "not started: past the deadline" if late else "an earlier job failed"
                pending.remove(job)
        finished = set(seconds) | set(failed)
        ready = [j for j in pending if all(name in (finished if j.always else seconds) for name in j.after)]
        while ready and len(running) < parallel:
            job = ready.pop(0)
            pending.remove(job)
            process, log = _start(job, logs)
            running[job.name] = (job, process, log, time.perf_counter())
        for name, (job, process, log, started) in list(running.items()):
            if late and not job.always and process.poll() is None:
                process.terminate()
                process.wait()
                failed[name] = "stopped: past the deadline"
            if process.poll() is None:
                continue
            log.close()
            del running[name]
            if process.returncode == 0:
                seconds[name] = round(time.perf_counter() - started, 1)
            elif name not in failed:
                failed[name] = f"exit {process.returncode}, log {logs / (name + '.log')}"
        time.sleep(0.2)
    if failed:
        raise JobsFailed("; ".join(f"{name}: {why}" for name, why in failed.items()), seconds)
    return seconds


def _start(job: Job, logs: Path) -> tuple[subprocess.Popen, Any]:
    log = (logs / f"{job.name}.log").open("w")
    # One thread each: the arms share the machine's cores with each other and their data workers.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["VLMOE_EXPERIMENTS_QUIET"] = "1"
    payload = json.dumps({"target": job.target, "kwargs": job.kwargs})
    root = Path(__file__).resolve().parents[1]  # the repository: `experiments` imports from there
    process = subprocess.Popen(
        [sys.executable, "-m", "experiments.jobs", payload],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=root,
    )
    return process, log


def main(argv: Sequence[str]) -> None:
    payload = json.loads(argv[0])
    call(payload["target"], payload["kwargs"])


if __name__ == "__main__":
    main(sys.argv[1:])
