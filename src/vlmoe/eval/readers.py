"""Readers for local copies of the benchmarks in their published formats, all yielding `EvalSample`.

Each reader checks every record and image up front, so a broken copy fails before any model
time is spent, with the file, the field and the fix in the message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vlmoe.eval.metrics import OPTION_LETTERS
from vlmoe.eval.samples import (
    EvalSample,
    existing_image,
    image_names_of,
    load_json,
    load_jsonl_lines,
    load_records,
    require,
    require_list,
    require_text,
    text_value,
)

CHARTQA_FORMAT = (
    '{split}/{split}_human.json and/or {split}_augmented.json: [{"imgname", "query", "label"}], '
    "images in {split}/png/"
)
POPE_FORMAT = (
    'JSON lines {"question_id", "image", "text", "label"} in coco_pope_{adversarial,popular,random}.json'
)
SCIENCEQA_FORMAT = (
    'problems.json {pid: {"question", "choices", "answer", "hint", "image"}} + pid_splits.json {split: [pid]}'
)
TEXTVQA_FORMAT = 'TextVQA_0.5.1_val.json {"data": [{"question_id", "image_id", "question", "answers"}]}'
VQAV2_FORMAT = (
    '*_{split}_questions.json {"questions": [...]} + *_{split}_annotations.json {"annotations": [...]}'
)
LLAVA_FORMAT = '[{"id", "image", "conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}]}]'


def read_chartqa(root: Path, split: str = "test", image_dir: Path | None = None) -> list[EvalSample]:
    """ChartQA: the human and augmented question files of `split`; ids are "human-0", "augmented-3".

    `root` is the ChartQA folder holding `{split}/` (or that split folder itself); images are
    looked up in `image_dir` (default: `{split}/png/`).

    Example:
        >>> samples = read_chartqa(Path("data/ChartQA"))  # doctest: +SKIP
    """
    split_dir = root / split if (root / split).is_dir() else root
    images = image_dir or split_dir / "png"
    expected = CHARTQA_FORMAT.replace("{split}", split)  # the format of this split, e.g. test/test_human.json
    samples = []
    for subset in ("human", "augmented"):
        path = split_dir / f"{split}_{subset}.json"
        if not path.is_file():
            continue
        records = load_json(path, "ChartQA")
        if not isinstance(records, list):
            raise ValueError(f"ChartQA: {path} must hold a JSON list; expected format: {expected}")
        for index, record in enumerate(records):
            where = f"ChartQA {path} record {index}"
            question = require_text(record, "query", where, expected)
            label = require_text(record, "label", where, expected)
            image = existing_image(images, require_text(record, "imgname", where, expected), where)
            samples.append(
                EvalSample(
                    id=f"{subset}-{index}",
                    images=(image,),
                    question=question,
                    answers=(label,),
                    task="chartqa",
                    subset=subset,
                )
            )
    if not samples:
        raise FileNotFoundError(
            f"ChartQA: no {split}_human.json or {split}_augmented.json in {split_dir}; "
            f"pass the ChartQA folder that contains {split}/ (expected format: {expected})"
        )
    return samples


def read_pope(path: Path, image_dir: Path | None = None) -> list[EvalSample]:
    """POPE: one question file, or a folder of coco_pope_{adversarial,popular,random}.json files.

    The category (the part after "pope_") becomes the subset; ids are "{category}-{question_id}".
    Images are looked up in `image_dir` (default: the question file's folder).

    Example:
        >>> samples = read_pope(Path("data/pope"), image_dir=Path("data/coco/val2014"))  # doctest: +SKIP
        >>> samples[0].subset, samples[0].answers  # doctest: +SKIP
        ('adversarial', ('yes',))
    """
    files = sorted(path.glob("*pope_*.json*")) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"POPE: no *pope_*.json files in {path}; expected format: {POPE_FORMAT}")
    samples = []
    for file in files:
        category = file.name.split(".")[0].rpartition("pope_")[2] or file.stem
        images = image_dir or file.parent
        for line, record in load_jsonl_lines(file, "POPE"):
            where = f"POPE {file} line {line}"
            label = str(require(record, "label", where, POPE_FORMAT)).strip().lower()
            if label not in ("yes", "no"):
                raise ValueError(f"{where}: label must be 'yes' or 'no', got {label!r}")
            question_id = require(record, "question_id", where, POPE_FORMAT)
            samples.append(
                EvalSample(
                    id=f"{category}-{question_id}",
                    images=(
                        existing_image(images, require_text(record, "image", where, POPE_FORMAT), where),
                    ),
                    question=require_text(record, "text", where, POPE_FORMAT),
                    answers=(label,),
                    task="pope",
                    subset=category,
                )
            )
    return samples


def read_scienceqa(root: Path, split: str = "test", image_dir: Path | None = None) -> list[EvalSample]:
    """ScienceQA-IMG: the problems of `split` that have an image; the answer is the option letter.

    Images are `{split}/{pid}/image.png` under `image_dir` (default: `root`, or `root/images`).

    Example:
        >>> samples = read_scienceqa(Path("data/scienceqa"))  # doctest: +SKIP
        >>> samples[0].choices, samples[0].answers  # doctest: +SKIP
        (('iron', 'wood'), ('A',))
    """
    problems = load_json(root / "problems.json", "ScienceQA")
    splits = load_json(root / "pid_splits.json", "ScienceQA")
    pids = require_list(splits, split, f"ScienceQA {root / 'pid_splits.json'}", SCIENCEQA_FORMAT)
    if image_dir is None:
        image_dir = root / "images" if (root / "images" / split).is_dir() else root
    samples = []
    for pid in pids:
        where = f"ScienceQA {root / 'problems.json'} problem {pid!r}"
        problem = require(problems, str(pid), f"ScienceQA {root / 'problems.json'}", SCIENCEQA_FORMAT)
        if not isinstance(problem, dict):
            raise ValueError(
                f"{where} is {json.dumps(problem)[:80]}; it must be an object, "
                f"expected format: {SCIENCEQA_FORMAT}"
            )
        if not problem.get("image"):
            continue  # the IMG subset: questions that come with a picture
        choices = [str(choice) for choice in require_list(problem, "choices", where, SCIENCEQA_FORMAT)]
        answer = require(problem, "answer", where, SCIENCEQA_FORMAT)
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ValueError(f"{where}: answer must be a choice index in [0, {len(choices)}), got {answer!r}")
        samples.append(
            EvalSample(
                id=str(pid),
                images=(existing_image(image_dir, f"{split}/{pid}/{problem['image']}", where),),
                question=require_text(problem, "question", where, SCIENCEQA_FORMAT),
                answers=(OPTION_LETTERS[answer],),
                task="scienceqa",
                choices=tuple(choices),
                context=str(problem.get("hint") or ""),
                subset=str(problem.get("subject", "")),
            )
        )
    return samples


def read_textvqa(path: Path, image_dir: Path | None = None) -> list[EvalSample]:
    """TextVQA val: `TextVQA_0.5.1_val.json` (or that file's folder); images `{image_id}.jpg`.

    Images are looked up in `image_dir` (default: `train_images/` beside the file, where the
    official release keeps the val images too).

    Example:
        >>> samples = read_textvqa(Path("data/textvqa/TextVQA_0.5.1_val.json"))  # doctest: +SKIP
        >>> len(samples[0].answers)  # doctest: +SKIP
        10
    """
    file = path / "TextVQA_0.5.1_val.json" if path.is_dir() else path
    data = require_list(load_json(file, "TextVQA"), "data", f"TextVQA {file}", TEXTVQA_FORMAT)
    images = image_dir or file.parent / "train_images"
    samples = []
    for index, record in enumerate(data):
        where = f"TextVQA {file} data[{index}]"
        image_id = require(record, "image_id", where, TEXTVQA_FORMAT)
        samples.append(
            EvalSample(
                id=str(require(record, "question_id", where, TEXTVQA_FORMAT)),
                images=(existing_image(images, f"{image_id}.jpg", where),),
                question=require_text(record, "question", where, TEXTVQA_FORMAT),
                answers=tuple(
                    text_value(answer, f"answers[{i}]", where, TEXTVQA_FORMAT)
                    for i, answer in enumerate(_human_answers(record, where, TEXTVQA_FORMAT))
                ),
                task="textvqa",
            )
        )
    return samples


def read_vqav2(root: Path, split: str = "val2014", image_dir: Path | None = None) -> list[EvalSample]:
    """VQAv2: the questions and annotations JSONs of `split`, joined on question_id.

    Images are `COCO_{split}_{image_id:012d}.jpg` in `image_dir` (default: `root/{split}`).
    The subset is the answer type (yes/no, number, other), as the official breakdown.

    Example:
        >>> samples = read_vqav2(Path("data/vqav2"), split="val2014")  # doctest: +SKIP
        >>> samples[0].subset  # doctest: +SKIP
        'yes/no'
    """
    expected = VQAV2_FORMAT.replace("{split}", split)  # e.g. *_val2014_questions.json
    questions_file = _one_file(root, f"*{split}_questions.json", "VQAv2 questions", expected)
    annotations_file = _one_file(root, f"*{split}_annotations.json", "VQAv2 annotations", expected)
    questions = require_list(
        load_json(questions_file, "VQAv2"), "questions", f"VQAv2 {questions_file}", expected
    )
    annotations = require_list(
        load_json(annotations_file, "VQAv2"), "annotations", f"VQAv2 {annotations_file}", expected
    )
    by_question = {}
    for index, annotation in enumerate(annotations):
        where = f"VQAv2 {annotations_file} annotations[{index}]"
        answers = _human_answers(annotation, where, expected)
        by_question[require(annotation, "question_id", where, expected)] = (
            tuple(require_text(answer, "answer", where, expected) for answer in answers),
            str(annotation.get("answer_type", "")),
        )
    images = image_dir or root / split
    samples = []
    for index, record in enumerate(questions):
        where = f"VQAv2 {questions_file} questions[{index}]"
        question_id = require(record, "question_id", where, expected)
        if question_id not in by_question:
            raise ValueError(f"{where}: question_id {question_id} has no entry in {annotations_file}")
        answers, answer_type = by_question[question_id]
        image_id = require(record, "image_id", where, expected)
        if isinstance(image_id, bool) or not isinstance(image_id, int | str) or not str(image_id).isdigit():
            raise ValueError(
                f"{where}: 'image_id' is {json.dumps(image_id)[:80]}; it must be the COCO image number "
                f"(e.g. 42 for COCO_{split}_000000000042.jpg), expected format: {expected}"
            )
        samples.append(
            EvalSample(
                id=str(question_id),
                images=(existing_image(images, f"COCO_{split}_{int(image_id):012d}.jpg", where),),
                question=require_text(record, "question", where, expected),
                answers=answers,
                task="vqav2",
                subset=answer_type,
            )
        )
    return samples


def read_llava(path: Path, image_dir: Path | None = None) -> list[EvalSample]:
    """LLaVA-format JSON or JSONL: the first human turn is the question, the gpt turn after it the answer.

    `<image>` placeholders are removed from the question (the prompt builder puts the image in).
    `image` may be a string, a list, or absent (a text-only sample). Images are relative to
    `image_dir` (default: the file's folder).

    Example:
        >>> samples = read_llava(Path("data/charts/eval.json"))  # doctest: +SKIP
        >>> samples[0].question, samples[0].answers  # doctest: +SKIP
        ('What is the total?', ('128',))
    """
    places = load_records(
        path, "LLaVA", f"must hold a JSON list of conversations; expected format: {LLAVA_FORMAT}"
    )
    images_root = image_dir or path.parent
    samples = []
    for place, record in places:
        where = f"LLaVA {path} {place}"
        turns = require_list(record, "conversations", where, LLAVA_FORMAT)
        speakers = [str(require(turn, "from", where, LLAVA_FORMAT)) for turn in turns]
        if "human" not in speakers or "gpt" not in speakers[speakers.index("human") :]:
            raise ValueError(
                f"{where}: needs a 'human' turn followed by a 'gpt' turn; expected format: {LLAVA_FORMAT}"
            )
        human = speakers.index("human")
        gpt = speakers.index("gpt", human)
        image_names = image_names_of(record, "image", where=where, expected_format=LLAVA_FORMAT)
        samples.append(
            EvalSample(
                id=str(require(record, "id", where, LLAVA_FORMAT)),
                images=tuple(existing_image(images_root, name, where) for name in image_names),
                question=require_text(turns[human], "value", where, LLAVA_FORMAT)
                .replace("<image>", "")
                .strip(),
                answers=(require_text(turns[gpt], "value", where, LLAVA_FORMAT),),
                task="llava",
            )
        )
    return samples


def _human_answers(record: Any, where: str, expected: str) -> list:
    """record["answers"], checked now: a string would be scored as its letters, an empty list only
    fail at scoring time, after the model has answered."""
    answers = require(record, "answers", where, expected)
    if not isinstance(answers, list) or not answers:
        raise ValueError(
            f"{where}: 'answers' must be a non-empty list of the human answers, got {str(answers)[:80]!r}; "
            f"expected format: {expected}"
        )
    return answers


def _one_file(root: Path, pattern: str, what: str, expected: str) -> Path:
    matches = sorted(root.glob(pattern))
    if len(matches) != 1:
        found = ", ".join(match.name for match in matches) or "none"
        raise FileNotFoundError(
            f"{what}: expected exactly one file matching {pattern!r} in {root}, found {found}; "
            f"keep one questions and one annotations file per split there (format: {expected})"
        )
    return matches[0]
