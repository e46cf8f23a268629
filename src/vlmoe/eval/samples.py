"""`EvalSample`, the one shape every benchmark reader yields, and the checked file access they share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class EvalSample:
    """One benchmark question, whatever its source format.

    `question` is the benchmark's own text (no prompt wording added); `answers` the reference
    answer(s): one for ChartQA/LLaVA/POPE, ten human answers for VQAv2/TextVQA, the option
    letter for ScienceQA, whose options are `choices` and hint `context`. `subset` groups scores
    in the summary (ChartQA human/augmented, POPE adversarial/popular/random, VQAv2 answer type).

    Example:
        >>> EvalSample("human-0", (Path("png/a.png"),), "Max value?", ("45",), "chartqa", subset="human").task
        'chartqa'
    """

    id: str
    images: tuple[Path, ...]
    question: str
    answers: tuple[str, ...]
    task: str
    choices: tuple[str, ...] = ()
    context: str = ""
    subset: str = ""


def load_json(path: Path, what: str) -> Any:
    """Parse a JSON file; errors name the file, what it should be, and where it broke."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist; check --data points at the right folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what}: {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None


def load_jsonl(path: Path, what: str) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); errors name the file and line."""
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist; check --data points at the right folder")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{what}: {path} line {number} is not valid JSON ({error.msg})") from None
    return records


def require(record: Any, name: str, where: str, expected_format: str) -> Any:
    """record[name], or a ValueError naming the file/record, the missing field, and the expected format."""
    if not isinstance(record, Mapping):
        raise ValueError(
            f"{where}: expected a JSON object, got {type(record).__name__}; format: {expected_format}"
        )
    if name not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise ValueError(
            f"{where}: missing field {name!r} (fields present: {present}); expected format: {expected_format}"
        )
    return record[name]


def existing_image(image_dir: Path, relative: str, where: str) -> Path:
    """image_dir / relative, which must exist; the error says how to point vlmoe at the images."""
    path = image_dir / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}: image {path} does not exist; put the images there or pass --image-dir "
            "(image_dir=...) pointing at the folder that holds them"
        )
    return path
