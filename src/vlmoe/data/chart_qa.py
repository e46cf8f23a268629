"""ChartQA-style questions about a chart record, each with its answer and a Program-of-Thought.

The program is plain, deterministic Python that prints exactly the answer; answers are computed
here independently (same operations, same order, so the same floats) and tests run every program
to check they agree. Numbers are written with the chart's own number of decimals.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from vlmoe.data.chart_record import ChartRecord

QA_KINDS = ("value", "extremum", "difference", "sum", "average", "comparison", "counting", "trend")


@dataclass(frozen=True)
class ChartQuestion:
    kind: str  # one of QA_KINDS
    question: str
    answer: str
    program: str  # Python source; its stdout (stripped) equals `answer`


@dataclass(frozen=True)
class _View:
    """One list of labelled numbers from a chart: what a question is about."""

    name: str  # series name, or the y label for single-series charts
    labels: list[str]
    values: list[float]


def _identifier(name: str) -> str:
    word = re.sub(r"\W+", "_", name.lower()).strip("_") or "values"
    return f"values_{word}" if word[0].isdigit() else word


def _views(record: ChartRecord) -> list[_View]:
    if record.chart_type == "scatter":
        return [_View(s.name, [str(x) for x in s.x or []], list(s.values)) for s in record.series]
    if len(record.series) == 1:
        measure = record.y_label.split(" (")[0]  # "Rainfall (mm)" -> "Rainfall"
        return [_View(measure, record.categories, list(record.series[0].values))]
    return [_View(s.name, record.categories, list(s.values)) for s in record.series]


def _mapping_line(view: _View) -> str:
    pairs = ", ".join(f"{label!r}: {value!r}" for label, value in zip(view.labels, view.values, strict=True))
    return f"{_identifier(view.name)} = {{{pairs}}}"


class _Asker:
    def __init__(self, record: ChartRecord, rng: np.random.Generator) -> None:
        self.record = record
        self.rng = rng
        self.d = record.decimals
        noun = record.x_label.split(" (")[0].lower()  # "Revenue band ($M)" -> "revenue band"
        self.item = {"pie": "slice", "histogram": "bin", "scatter": "point"}.get(record.chart_type, noun)
        plural_ies = self.item.endswith("y") and self.item[-2] not in "aeiou"
        self.items = self.item[:-1] + "ies" if plural_ies else self.item + "s"

    def of(self, view: _View) -> str:
        return f" of {view.name}"

    def value(self, view: _View) -> ChartQuestion | None:
        if self.record.chart_type == "scatter":
            return None
        i = int(self.rng.integers(len(view.labels)))
        name = _identifier(view.name)
        return ChartQuestion(
            "value",
            f"What is the value{self.of(view)} for {view.labels[i]}?",
            f"{view.values[i]:.{self.d}f}",
            f'{_mapping_line(view)}\nprint(f"{{{name}[{view.labels[i]!r}]:.{self.d}f}}")\n',
        )

    def extremum(self, view: _View) -> ChartQuestion | None:
        highest = bool(self.rng.random() < 0.5)
        target = max(view.values) if highest else min(view.values)
        if view.values.count(target) > 1 or self.record.chart_type == "scatter":
            return None  # a tie has no single right answer
        word, fn = ("highest", "max") if highest else ("lowest", "min")
        name = _identifier(view.name)
        return ChartQuestion(
            "extremum",
            f"Which {self.item} has the {word} value{self.of(view)}?",
            view.labels[view.values.index(target)],
            f"{_mapping_line(view)}\nprint({fn}({name}, key={name}.get))\n",
        )

    def difference(self, view: _View) -> ChartQuestion | None:
        name = _identifier(view.name)
        return ChartQuestion(
            "difference",
            f"What is the difference between the highest and the lowest value{self.of(view)}?",
            f"{max(view.values) - min(view.values):.{self.d}f}",
            f'{name} = {view.values!r}\nprint(f"{{max({name}) - min({name}):.{self.d}f}}")\n',
        )

    def sum(self, view: _View) -> ChartQuestion | None:
        name = _identifier(view.name)
        return ChartQuestion(
            "sum",
            f"What is the sum of all values{self.of(view)}?",
            f"{sum(view.values):.{self.d}f}",
            f'{name} = {view.values!r}\nprint(f"{{sum({name}):.{self.d}f}}")\n',
        )

    def average(self, view: _View) -> ChartQuestion | None:
        name = _identifier(view.name)
        return ChartQuestion(
            "average",
            f"What is the average value{self.of(view)}? Round to 2 decimals.",
            f"{sum(view.values) / len(view.values):.2f}",
            f'{name} = {view.values!r}\nprint(f"{{sum({name}) / len({name}):.2f}}")\n',
        )

    def comparison(self, view: _View) -> ChartQuestion | None:
        if self.record.chart_type == "scatter" or len(view.labels) < 2:
            return None
        i, j = (int(k) for k in self.rng.choice(len(view.labels), size=2, replace=False))
        if view.values[i] == view.values[j]:
            return None
        name, a, b = _identifier(view.name), view.labels[i], view.labels[j]
        return ChartQuestion(
            "comparison",
            f"Is the value{self.of(view)} for {a} greater than for {b}?",
            "Yes" if view.values[i] > view.values[j] else "No",
            f'{_mapping_line(view)}\nprint("Yes" if {name}[{a!r}] > {name}[{b!r}] else "No")\n',
        )

    def counting(self, view: _View) -> ChartQuestion | None:
        ordered = sorted(set(view.values))
        if len(ordered) < 2:
            return None
        k = int(self.rng.integers(len(ordered) - 1))
        threshold = round((ordered[k] + ordered[k + 1]) / 2, self.d + 1)  # strictly between two values
        name = _identifier(view.name)
        return ChartQuestion(
            "counting",
            f"How many {self.items}{self.of(view)} have a value above {threshold}?",
            str(sum(1 for v in view.values if v > threshold)),
            f"{name} = {view.values!r}\nprint(sum(1 for v in {name} if v > {threshold!r}))\n",
        )

    def trend(self, view: _View) -> ChartQuestion | None:
        if self.record.chart_type not in ("line", "multi_line", "area"):
            return None
        pairs = list(zip(view.values[:-1], view.values[1:], strict=True))
        if all(b > a for a, b in pairs):
            answer = "increasing"
        elif all(b < a for a, b in pairs):
            answer = "decreasing"
        else:
            answer = "fluctuating"
        name = _identifier(view.name)
        program = (
            f"{name} = {view.values!r}\n"
            f"steps = list(zip({name}, {name}[1:]))\n"
            "if all(b > a for a, b in steps):\n"
            '    print("increasing")\n'
            "elif all(b < a for a, b in steps):\n"
            '    print("decreasing")\n'
            "else:\n"
            '    print("fluctuating")\n'
        )
        question = f"What is the trend{self.of(view)} from {view.labels[0]} to {view.labels[-1]}?"
        return ChartQuestion(
            "trend", question + " Answer increasing, decreasing or fluctuating.", answer, program
        )


def chart_questions(
    record: ChartRecord, rng: np.random.Generator, max_questions: int = 4
) -> list[ChartQuestion]:
    """Up to `max_questions` questions of different kinds about one chart.

    >>> from vlmoe.data.chart_record import sample_chart_record
    >>> qa = chart_questions(sample_chart_record(0, 0, "line"), np.random.default_rng(0))
    >>> len(qa) > 0 and all(q.kind in QA_KINDS for q in qa)
    True
    """
    asker = _Asker(record, rng)
    kinds = list(QA_KINDS)
    rng.shuffle(kinds)
    views = _views(record)
    questions: list[ChartQuestion] = []
    for kind in kinds:
        ask: Callable[[_View], ChartQuestion | None] = getattr(asker, kind)
        question = ask(views[int(rng.integers(len(views)))])
        if question is not None:
            questions.append(question)
        if len(questions) == max_questions:
            break
    return questions
