"""LLaVA-format training samples for one chart: table, JSON, code, QA and PoT, tagged by task.

Instructions are drawn from small pools of phrasings so a model (and MoCLE's instruction
clustering) sees varied wording for one task.
"""

from __future__ import annotations

import numpy as np

from vlmoe.data.chart_qa import ChartQuestion

CHART_TASKS = ("chart_to_table", "chart_to_json", "chart_to_code", "chart_qa", "chart_qa_pot")

PROMPTS: dict[str, tuple[str, ...]] = {
    "chart_to_table": (
        "Convert the chart into a table.",
        "Extract the underlying data table of this chart.",
        "Write the data shown in the chart as a markdown table.",
        "What data is plotted? Answer with a table.",
    ),
    "chart_to_json": (
        "Describe this chart as JSON.",
        "Convert the chart into a JSON object with its type, title, axes, style and data.",
        "Give the JSON representation of the chart.",
    ),
    "chart_to_code": (
        "Write matplotlib code that reproduces this chart.",
        "Generate the Python code that draws this chart.",
        "Redraw the chart: give the plotting code.",
    ),
    "chart_qa_pot": (
        "Answer with a Python program that prints the answer.",
        "Write Python code that computes and prints the answer.",
    ),
}


def _human(text: str) -> dict[str, str]:
    return {"from": "human", "value": text}


def _gpt(text: str) -> dict[str, str]:
    return {"from": "gpt", "value": text}


def chart_samples(
    chart_id: str,
    image: str,
    table: str,
    json_text: str,
    code: str,
    questions: list[ChartQuestion],
    rng: np.random.Generator,
) -> list[dict]:
    """One sample per task for a chart (QA as a multi-turn conversation); `image` is its path.

    >>> samples = chart_samples("c0", "images/0.png", "| a |", "{}", "print()", [], np.random.default_rng(0))
    >>> [s["task"] for s in samples]
    ['chart_to_table', 'chart_to_json', 'chart_to_code']
    """

    def prompt(task: str) -> str:
        pool = PROMPTS[task]
        return pool[int(rng.integers(len(pool)))]

    def sample(task: str, turns: list[dict[str, str]]) -> dict:
        turns[0] = _human("<image>\n" + turns[0]["value"])
        return {
            "id": f"{chart_id}-{task}",
            "image": image,
            "conversations": turns,
            "task": task,
            "domain": "chart",
        }

    samples = [
        sample("chart_to_table", [_human(prompt("chart_to_table")), _gpt(table)]),
        sample("chart_to_json", [_human(prompt("chart_to_json")), _gpt(json_text)]),
        sample("chart_to_code", [_human(prompt("chart_to_code")), _gpt(f"```python\n{code}```")]),
    ]
    if questions:
        direct: list[dict[str, str]] = []
        for q in questions:
            direct += [_human(q.question + "\nAnswer with a single word or number."), _gpt(q.answer)]
        samples.append(sample("chart_qa", direct))
        pot: list[dict[str, str]] = []
        for q in questions:
            pot += [_human(f"{q.question}\n{prompt('chart_qa_pot')}"), _gpt(f"```python\n{q.program}```")]
        samples.append(sample("chart_qa_pot", pot))
    return samples
