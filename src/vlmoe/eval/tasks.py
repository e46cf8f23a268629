"""The benchmark tasks: how to read each, word its question, score one answer, and summarise a run."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlmoe.eval.metrics import (
    OPTION_LETTERS,
    exact_match,
    multiple_choice_accuracy,
    pope_answer,
    pope_metrics,
    relaxed_accuracy,
    textvqa_accuracy,
    vqa_accuracy,
)
from vlmoe.eval.readers import read_chartqa, read_llava, read_pope, read_scienceqa, read_textvqa, read_vqav2
from vlmoe.eval.samples import EvalSample

TASKS = ("chartqa", "pope", "scienceqa", "textvqa", "vqav2", "llava")
# LLaVA-1.5's evaluation prompts, which MoE-LLaVA and most follow-ups reuse.
SHORT_ANSWER = "Answer the question using a single word or phrase."
OPTION_ANSWER = "Answer with the option's letter from the given choices directly."
POT_ANSWER = "Answer with a Python program that prints the answer."


def read_task(
    task: str, data: Path, image_dir: Path | None = None, split: str | None = None
) -> list[EvalSample]:
    """The samples of `task` from the local copy at `data` (see each reader for the layout).

    Example:
        >>> read_task("pope", Path("data/pope"), Path("data/coco/val2014"))  # doctest: +SKIP
    """
    readers: dict[str, Callable[[], list[EvalSample]]] = {
        "chartqa": lambda: read_chartqa(data, split or "test", image_dir),
        "pope": lambda: read_pope(data, image_dir),
        "scienceqa": lambda: read_scienceqa(data, split or "test", image_dir),
        "textvqa": lambda: read_textvqa(data, image_dir),
        "vqav2": lambda: read_vqav2(data, split or "val2014", image_dir),
        "llava": lambda: read_llava(data, image_dir),
    }
    _check_task(task)
    if not data.exists():
        raise FileNotFoundError(f"--data {data} does not exist; pass the local copy of the {task} benchmark")
    samples = readers[task]()
    if not samples:  # a run would write a summary of nothing, scored as if it had passed
        raise ValueError(
            f"{task} data at {data} holds no samples; pass a copy of the benchmark with its questions"
        )
    ids = [sample.id for sample in samples]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(
            f"{task} data at {data}: sample id {duplicate!r} appears more than once; ids must be unique"
        )
    return samples


def question_text(sample: EvalSample, pot: bool = False) -> str:
    """The user turn for `sample`: the benchmark's question plus the answer-format instruction.

    Example:
        >>> s = EvalSample("1", (), "Which is a magnet?", ("A",), "scienceqa", choices=("iron", "wood"))
        >>> print(question_text(s))
        Which is a magnet?
        A. iron
        B. wood
        Answer with the option's letter from the given choices directly.
    """
    if sample.task == "scienceqa":
        options = "\n".join(f"{OPTION_LETTERS[i]}. {choice}" for i, choice in enumerate(sample.choices))
        context = f"Context: {sample.context}\n" if sample.context else ""
        return f"{context}{sample.question}\n{options}\n{OPTION_ANSWER}"
    if sample.task == "llava":
        return sample.question
    return f"{sample.question}\n{POT_ANSWER if pot else SHORT_ANSWER}"


def score_sample(sample: EvalSample, prediction: str) -> dict[str, float]:
    """The per-sample score(s) of `prediction` under the task's metric.

    Example:
        >>> score_sample(EvalSample("1", (), "Total?", ("1000",), "chartqa"), "1,020")
        {'relaxed_accuracy': 1.0}
    """
    task, answers = sample.task, sample.answers
    _check_task(task)
    if task == "chartqa":
        return {"relaxed_accuracy": relaxed_accuracy(prediction, answers[0])}
    if task == "pope":
        return {"accuracy": float(pope_answer(prediction) == answers[0])}
    if task == "scienceqa":
        return {"accuracy": multiple_choice_accuracy(prediction, answers[0], len(sample.choices))}
    if task == "textvqa":
        return {"vqa_accuracy": textvqa_accuracy(prediction, answers)}
    if task == "vqav2":
        return {"vqa_accuracy": vqa_accuracy(prediction, answers)}
    return {  # llava: free-form references; numbers (e.g. synthetic chart QA) get the 5% tolerance too
        "exact_match": exact_match(prediction, answers),
        "relaxed_accuracy": max(relaxed_accuracy(prediction, answer) for answer in answers),
    }


def summarize(task: str, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall and per-subset metrics of a run from its prediction records.

    Records carry "subset", "scores" and (for POPE) "prediction" and "answers". Means for every
    task; POPE gets its evaluator's accuracy/precision/recall/F1/yes-ratio instead.

    Example:
        >>> summarize("chartqa", [{"subset": "human", "scores": {"relaxed_accuracy": 1.0}},
        ...                       {"subset": "augmented", "scores": {"relaxed_accuracy": 0.0}}])["metrics"]
        {'relaxed_accuracy': 0.5}
    """
    by_subset: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for record in records:
        by_subset[record.get("subset") or ""].append(record)
    metrics = _metrics(task, records)
    subsets = {name: _metrics(task, group) for name, group in sorted(by_subset.items()) if name}
    return {"task": task, "num_samples": len(records), "metrics": metrics, "by_subset": subsets}


def _metrics(task: str, records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    if not records:
        return {}
    if task == "pope":
        return pope_metrics([r["prediction"] for r in records], [r["answers"][0] for r in records])
    names = records[0]["scores"].keys()
    return {name: sum(r["scores"][name] for r in records) / len(records) for name in names}


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
