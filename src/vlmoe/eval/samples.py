"""`EvalSample`, the one shape every benchmark reader yields, and the checked file access they share."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmoe.data.conversations import read_text


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
    _check_file(path, what)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what}: {path} is not valid JSON (line {error.lineno}, column {error.colno}: {error.msg})"
        ) from None


def load_jsonl(path: Path, what: str) -> list[Any]:
    """Parse a JSON-lines file (blank lines skipped); errors name the file and line."""
    return [record for _, record in load_jsonl_lines(path, what)]


def load_jsonl_lines(path: Path, what: str) -> list[tuple[int, Any]]:
    """(1-based line number, record) of each non-blank line, so later errors can name the line."""
    _check_file(path, what)
    records = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise ValueError(f"{what}: {path} line {number} is not valid JSON ({error.msg})") from None
    return records


def load_records(path: Path, what: str, not_a_list: str) -> list[tuple[str, Any]]:
    """(place, record) of each sample of a .jsonl file ("line N", blank lines skipped) or of a .json
    list ("record N", by index), so errors name where the record is; `not_a_list`: what a .json
    file that is not a list is told (the format it should hold)."""
    if path.suffix == ".jsonl":
        return [(f"line {line}", record) for line, record in load_jsonl_lines(path, what)]
    records = load_json(path, what)
    if not isinstance(records, list):
        raise ValueError(f"{what}: {path} {not_a_list}")
    return [(f"record {index}", record) for index, record in enumerate(records)]


def _check_file(path: Path, what: str) -> None:
    if path.is_dir():
        raise FileNotFoundError(f"{what}: {path} is a folder; pass the data file in it with --data")
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {path} does not exist; check --data points at the right folder")


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


def require_list(record: Any, name: str, where: str, expected_format: str) -> list:
    """record[name], which must be a JSON list (a string or an object would be iterated silently)."""
    value = require(record, name, where, expected_format)
    if not isinstance(value, list):
        raise ValueError(
            f"{where}: {name!r} is {json.dumps(value)[:80]}; it must be a list, expected format: "
            f"{expected_format}"
        )
    return value


def require_text(record: Any, name: str, where: str, expected_format: str) -> str:
    """record[name] as text: a string, or a number written as one; null, true/false, a list or an
    object is refused (as text it would be "None" or "['a']", scored or looked up as such)."""
    return text_value(require(record, name, where, expected_format), repr(name), where, expected_format)


def text_value(value: Any, field: str, where: str, expected_format: str) -> str:
    """`value` (the field `field` of the record at `where`) as text, refused as `require_text` says."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(
            f"{where}: {field} is {json.dumps(value)[:80]}; it must be a string, expected format: "
            f"{expected_format}"
        )
    return str(value)


def image_names_of(record: Mapping, *fields: str, where: str, expected_format: str) -> list[str]:
    """The image file names in the first of `fields` the record has: a name, a list of names, or none.

    Example:
        >>> image_names_of({"images": ["a.png"]}, "image", "images", where="record 0", expected_format="")
        ['a.png']
    """
    value = next((record[name] for name in fields if record.get(name)), [])
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise ValueError(
            f"{where}: {' / '.join(repr(f) for f in fields)} must be an image file name or a list of them, "
            f"got {str(value)[:80]}; expected format: {expected_format}"
        )
    return names


def existing_image(image_dir: Path, relative: str, where: str) -> Path:
    """image_dir / relative, which must exist; the error says how to point vlmoe at the images."""
    path = image_dir / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{where}: image {path} does not exist; put the images there or pass --image-dir "
            "(image_dir=...) pointing at the folder that holds them"
        )
    return path
