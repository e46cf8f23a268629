"""Every QA answer is exactly what its Program-of-Thought prints."""

from __future__ import annotations

import contextlib
import io
import re
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

from vlmoe.data.chart_qa import QA_KINDS, chart_questions
from vlmoe.data.chart_record import CHART_TYPES, sample_chart_record
from vlmoe.data.chart_text import chart_json


def _printed(program: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(program, "pot.py", "exec"), {"__builtins__": __builtins__})  # fresh namespace
    return out.getvalue().strip()


def test_every_answer_equals_the_output_of_its_program():
    kinds = Counter()
    for index in range(300):
        record = sample_chart_record(5, index)
        for question in chart_questions(record, np.random.default_rng(index), max_questions=8):
            assert _printed(question.program) == question.answer, (record.chart_type, question)
            kinds[question.kind] += 1
    assert set(kinds) == set(QA_KINDS)  # every kind of question is asked somewhere
    assert min(kinds.values()) >= 20


def test_known_answers_on_a_hand_checked_chart():
    record = sample_chart_record(0, 0, "bar")
    values = dict(zip(record.categories, record.series[0].values, strict=True))
    questions = {q.kind: q for q in chart_questions(record, np.random.default_rng(0), max_questions=8)}
    d = record.decimals
    assert questions["sum"].answer == f"{sum(values.values()):.{d}f}"
    assert questions["difference"].answer == f"{max(values.values()) - min(values.values()):.{d}f}"
    assert questions["average"].answer == f"{sum(values.values()) / len(values):.2f}"
    if "extremum" in questions:
        assert questions["extremum"].answer in values


def test_trend_answers_follow_the_data():
    seen = set()
    for index in range(60):
        record = sample_chart_record(1, index, "line")
        for q in chart_questions(record, np.random.default_rng(index), max_questions=8):
            if q.kind == "trend":
                values = record.series[0].values
                steps = np.diff(values)
                expected = (
                    "increasing"
                    if (steps > 0).all()
                    else "decreasing"
                    if (steps < 0).all()
                    else "fluctuating"
                )
                assert q.answer == expected
                seen.add(q.answer)
    assert seen == {"increasing", "decreasing", "fluctuating"}


def _json_views(data: dict) -> dict[str | None, tuple[list[str], list[float]]]:
    """Series name (None for a single unnamed series) -> (labels, values), read from the JSON alone."""
    kind = data["chart_type"]
    if kind in ("bar", "horizontal_bar", "line"):
        return {None: ([d["label"] for d in data["data"]], [d["value"] for d in data["data"]])}
    if kind == "pie":
        return {None: ([d["label"] for d in data["slices"]], [d["value"] for d in data["slices"]])}
    if kind == "histogram":
        bins = data["bins"]
        return {None: ([f"{b['start']:g}-{b['end']:g}" for b in bins], [b["count"] for b in bins])}
    if kind == "scatter":
        return {s["name"]: ([], [p["y"] for p in s["points"]]) for s in data["series"]}
    return {s["name"]: (data["categories"], s["values"]) for s in data["series"]}


def _expected_answer(question: str, kind: str, labels: list[str], values: list[float], d: int) -> str:
    """The answer worked out from the question text and the chart's JSON, not from chart_qa's code."""
    if kind == "value":
        label = re.search(r" for (.+)\?$", question).group(1)
        return f"{values[labels.index(label)]:.{d}f}"
    if kind == "extremum":
        return labels[values.index(max(values) if "highest" in question else min(values))]
    exact = [Fraction(str(v)) for v in values]  # the decimals the chart shows, without float error
    if kind == "difference":
        return f"{float(max(exact) - min(exact)):.{d}f}"
    if kind == "sum":
        return f"{float(sum(exact)):.{d}f}"
    if kind == "comparison":
        a, b = re.search(r" for (.+) greater than for (.+)\?$", question).groups()
        return "Yes" if values[labels.index(a)] > values[labels.index(b)] else "No"
    if kind == "counting":
        return str(sum(v > float(re.search(r"above (.+)\?$", question).group(1)) for v in values))
    steps = np.diff(values)  # trend
    return "increasing" if (steps > 0).all() else "decreasing" if (steps < 0).all() else "fluctuating"


@pytest.mark.parametrize("chart_type", CHART_TYPES)
def test_every_answer_is_right_for_the_charts_json(chart_type):
    kinds = set()
    for seed in range(3):
        for index in range(20):
            record = sample_chart_record(seed, index, chart_type)
            views = _json_views(chart_json(record))
            for q in chart_questions(record, np.random.default_rng(index), max_questions=8):
                named = [n for n in views if n is not None and f" of {n}" in q.question]
                labels, values = views[named[-1] if named else None]
                if q.kind == "average":  # a mean ending in 5 at the 3rd decimal may round either way
                    mean = sum(Fraction(str(v)) for v in values) / len(values)
                    assert abs(Fraction(q.answer) - mean) <= Fraction(1, 200), q
                else:
                    assert q.answer == _expected_answer(
                        q.question, q.kind, labels, values, record.decimals
                    ), q
                kinds.add(q.kind)
    # scatter: no value, extremum, comparison or trend questions; trend only on line-like charts
    assert len(kinds) == {"scatter": 4, "line": 8, "multi_line": 8, "area": 8}.get(chart_type, 7)


def test_pot_targets_run_in_the_eval_sandbox_print_the_qa_answer():
    """A model that writes the chart_qa_pot target exactly scores 1 under vlmoe eval's PoT scoring."""
    from vlmoe.data.chart_dataset import ChartSetConfig, chart_entry
    from vlmoe.eval.metrics import relaxed_accuracy
    from vlmoe.eval.pot import pot_answer

    wanted, programs = set(CHART_TYPES), 0
    for index in range(200):  # the first chart of every type, across two seeds
        seed = index % 2
        record, samples = chart_entry(ChartSetConfig(n=200, seed=seed), index)
        if record["chart_type"] not in wanted:
            continue
        wanted.discard(record["chart_type"])
        by_task = {s["task"]: s["conversations"] for s in samples}
        answers = [turn["value"] for turn in by_task["chart_qa"][1::2]]
        for target, answer in zip(by_task["chart_qa_pot"][1::2], answers, strict=True):
            run = pot_answer(target["value"])
            assert run.result.ok and run.answer == answer, (record["id"], target, run)
            assert relaxed_accuracy(run.answer, answer) == 1.0
            programs += 1
    assert not wanted and programs >= 30
