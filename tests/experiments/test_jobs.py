"""experiments/jobs.py: order, parallel processes, failures, the deadline and the always-run reports."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from experiments.jobs import Job, JobsFailed, only, run_jobs


def note(path: str, text: str, wait: float = 0.0) -> None:
    time.sleep(wait)
    with Path(path).open("a") as file:
        file.write(text + "\n")


def fail() -> None:
    raise RuntimeError("on purpose")


def _job(name, out, after=(), wait=0.0, always=False, target="note"):
    kwargs = {"path": str(out), "text": name, "wait": wait} if target == "note" else {}
    return Job(name, f"{__name__}:{target}", kwargs, tuple(after), always)


def test_in_process_jobs_run_in_order(tmp_path):
    out = tmp_path / "order.txt"
    seconds = run_jobs([_job("a", out), _job("b", out, ["a"])], parallel=1, logs=tmp_path / "logs")
    assert out.read_text().split() == ["a", "b"] and set(seconds) == {"a", "b"}


def test_parallel_jobs_respect_order_failures_and_the_deadline(tmp_path):
    out = tmp_path / "order.txt"
    jobs = [
        _job("slow", out, wait=30.0),
        _job("broken", out, target="fail"),
        _job("after_broken", out, ["broken"]),
        _job("quick", out),
        _job("then", out, ["quick"]),
        _job("report", out, ["slow", "after_broken", "then"], always=True),
    ]
    start = time.perf_counter()
    with pytest.raises(JobsFailed) as failure:
        run_jobs(jobs, parallel=3, logs=tmp_path / "logs", deadline=8.0)
    assert time.perf_counter() - start < 25  # the slow job was stopped, not waited for
    done = out.read_text().split()
    assert done.index("quick") < done.index("then") < done.index("report")
    assert "slow" not in done and "after_broken" not in done
    message = str(failure.value)
    assert "slow: stopped: past the deadline" in message and "after_broken: an earlier job failed" in message
    assert "RuntimeError: on purpose" in (tmp_path / "logs" / "broken.log").read_text()
    assert set(failure.value.seconds) == {"quick", "then", "report"}
    json.dumps(failure.value.seconds)


def test_only_keeps_the_matching_jobs_what_they_need_and_their_reports(tmp_path):
    out = tmp_path / "order.txt"
    todo = [
        _job("prepare", out),
        _job("pretrain", out, after=["prepare"]),
        _job("mole-domains", out, after=["prepare"]),
        _job("mole-a", out, after=["pretrain", "mole-domains"]),
        _job("mole-b", out, after=["pretrain"]),
        _job("mole-report", out, after=["mole-a", "mole-b"], always=True),
        _job("mocle-x", out, after=["pretrain"]),
        _job("mocle-report", out, after=["mocle-x"], always=True),
    ]
    kept = only(todo, "mole-a")
    assert [j.name for j in kept] == ["prepare", "pretrain", "mole-domains", "mole-a", "mole-report"]
    assert kept[-1].after == ("mole-a",)  # the report waits only on what runs
    run_jobs(kept, parallel=1, logs=tmp_path / "logs")
    assert out.read_text().split() == ["prepare", "pretrain", "mole-domains", "mole-a", "mole-report"]
    with pytest.raises(ValueError, match="no job name matches 'nothing'"):
        only(todo, "nothing")
