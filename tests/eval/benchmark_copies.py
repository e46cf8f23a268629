"""Tiny local copies of each benchmark in its published layout (a plain module, shared by tests)."""

import json
from pathlib import Path

from PIL import Image


def image(path: Path, color=(255, 0, 0)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (28, 28), color).save(path)
    return path


def write_json(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def chartqa(root: Path) -> Path:
    image(root / "test/png/a.png")
    image(root / "test/png/b.png", (0, 0, 255))
    write_json(root / "test/test_human.json", [{"imgname": "a.png", "query": "Max value?", "label": "45"}])
    augmented = [
        {"imgname": "b.png", "query": "Min value?", "label": "1.5"},
        {"imgname": "a.png", "query": "Which is red?", "label": "Yes"},
    ]
    write_json(root / "test/test_augmented.json", augmented)
    return root


def pope(root: Path) -> Path:
    image(root / "COCO_val2014_000000000001.jpg")
    for category, label in [("adversarial", "yes"), ("random", "no")]:
        line = {
            "question_id": 1,
            "image": "COCO_val2014_000000000001.jpg",
            "text": "Is there a dog?",
            "label": label,
        }
        (root / f"coco_pope_{category}.json").write_text(json.dumps(line) + "\n\n")
    return root


def scienceqa(root: Path) -> Path:
    problems = {
        "1": {"question": "Which is a magnet?", "choices": ["iron", "wood", "glass"], "answer": 0,
              "hint": "Look closely.", "image": "image.png", "subject": "natural science"},
        "2": {"question": "No picture here", "choices": ["a", "b"], "answer": 1, "hint": "", "image": None},
        "3": {"question": "Train", "choices": ["a", "b"], "answer": 1, "hint": "", "image": "image.png"},
    }  # fmt: skip
    write_json(root / "problems.json", problems)
    write_json(root / "pid_splits.json", {"test": ["1", "2"], "train": ["3"]})
    image(root / "test/1/image.png")
    return root


def textvqa(root: Path) -> Path:
    image(root / "train_images/abc.jpg")
    answers = ["nokia"] * 8 + ["nokia phone"] * 2
    data = {
        "data": [{"question_id": 34602, "image_id": "abc", "question": "What brand?", "answers": answers}]
    }
    write_json(root / "TextVQA_0.5.1_val.json", data)
    return root


def vqav2(root: Path) -> Path:
    image(root / "val2014/COCO_val2014_000000000042.jpg")
    questions = {"questions": [{"image_id": 42, "question": "How many?", "question_id": 420}]}
    answers = [{"answer": "2", "answer_confidence": "yes", "answer_id": i + 1} for i in range(10)]
    annotations = {
        "annotations": [{"question_id": 420, "image_id": 42, "answers": answers, "answer_type": "number"}]
    }
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", questions)
    write_json(root / "v2_mscoco_val2014_annotations.json", annotations)
    return root


def llava(root: Path) -> Path:
    image(root / "c.png")
    record = {
        "id": "chart-7",
        "image": "c.png",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the total?"},
            {"from": "gpt", "value": "128"},
        ],
    }
    text_only = {
        "id": "t",
        "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}],
    }
    return write_json(root / "eval.json", [record, text_only])


BUILDERS = {
    "chartqa": chartqa,
    "pope": pope,
    "scienceqa": scienceqa,
    "textvqa": textvqa,
    "vqav2": vqav2,
    "llava": llava,
}
