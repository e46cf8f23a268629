"""Every QA answer is exactly what its Program-of-Thought prints."""

from __future__ import annotations

import contextlib
import io
from collections import Counter

import numpy as np

from vlmoe.data.chart_qa import QA_KINDS, chart_questions
from vlmoe.data.chart_record import sample_chart_record


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
