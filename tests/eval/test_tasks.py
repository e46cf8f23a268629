from pathlib import Path

import pytest

from vlmoe.eval.samples import EvalSample
from vlmoe.eval.tasks import question_text, read_task, score_sample, summarize


def _sample(task, answers, **kwargs):
    return EvalSample(id="1", images=(), question="Q?", answers=tuple(answers), task=task, **kwargs)


def test_question_wording_per_task():
    assert (
        question_text(_sample("chartqa", ["1"])) == "Q?\nAnswer the question using a single word or phrase."
    )
    assert question_text(_sample("chartqa", ["1"]), pot=True).endswith(
        "a Python program that prints the answer."
    )
    science = _sample("scienceqa", ["B"], choices=("x", "y"), context="Some hint")
    assert question_text(science) == (
        "Context: Some hint\nQ?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )
    assert question_text(_sample("llava", ["a"])) == "Q?"


def test_scores_per_task():
    assert score_sample(_sample("chartqa", ["45"]), "45%") == {"relaxed_accuracy": 1.0}
    assert score_sample(_sample("pope", ["no"]), "No, there is not.") == {"accuracy": 1.0}
    assert score_sample(_sample("scienceqa", ["B"], choices=("x", "y")), "B. y") == {"accuracy": 1.0}
    assert score_sample(_sample("vqav2", ["2"] * 3 + ["3"] * 7), "two") == {
        "vqa_accuracy": pytest.approx(0.9)
    }
    assert score_sample(_sample("textvqa", ["nokia"] * 10), "Nokia.") == {"vqa_accuracy": 1.0}
    assert score_sample(_sample("llava", ["1,000"]), "1000") == {"exact_match": 0.0, "relaxed_accuracy": 1.0}


def test_summary_means_and_pope_metrics():
    records = [
        {"subset": "human", "scores": {"relaxed_accuracy": 1.0}},
        {"subset": "human", "scores": {"relaxed_accuracy": 0.0}},
        {"subset": "augmented", "scores": {"relaxed_accuracy": 1.0}},
    ]
    summary = summarize("chartqa", records)
    assert summary["metrics"]["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert summary["by_subset"] == {
        "augmented": {"relaxed_accuracy": 1.0},
        "human": {"relaxed_accuracy": 0.5},
    }
    pope = [
        {"subset": "random", "prediction": "Yes", "answers": ["yes"], "scores": {}},
        {"subset": "random", "prediction": "yes", "answers": ["no"], "scores": {}},
        {"subset": "popular", "prediction": "no", "answers": ["no"], "scores": {}},
    ]
    metrics = summarize("pope", pope)["metrics"]
    assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["precision"] == 0.5
    assert metrics["recall"] == 1.0 and metrics["yes_ratio"] == pytest.approx(2 / 3)


def test_read_task_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'gqa'; choose one of chartqa"):
        read_task("gqa", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"--data .* does not exist"):
        read_task("pope", tmp_path / "missing")
    (tmp_path / "d.json").write_text(
        '[{"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]},'
        ' {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}]'
    )
    with pytest.raises(ValueError, match="sample id 'a' appears more than once"):
        read_task("llava", Path(tmp_path / "d.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"llava data at .*empty\.jsonl holds no samples; pass a copy"):
        read_task("llava", tmp_path / "empty.jsonl")
