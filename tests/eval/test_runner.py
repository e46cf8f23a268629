"""The eval runner and the `vlmoe eval` command on tiny saved models and tiny local benchmarks."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from benchmark_copies import BUILDERS
from PIL import Image
from typer.testing import CliRunner

import vlmoe
from vlmoe.cli import app
from vlmoe.eval import pot, runner
from vlmoe.eval.generate import GenerationSettings
from vlmoe.eval.runner import EvalConfig, load_model_for_eval, run_eval
from vlmoe.models import tiny

LABELS = ["45", "12", "yes", "7", "100"]


@pytest.fixture(scope="module")
def chartqa(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ChartQA")
    (root / "test/png").mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (30, 30), (40 * i, 0, 0)).save(root / f"test/png/{i}.png")
    human = [{"imgname": f"{i}.png", "query": f"Value of bar {i}?", "label": LABELS[i]} for i in range(3)]
    augmented = [
        {"imgname": f"{i}.png", "query": f"Value of bar {i}?", "label": LABELS[i]} for i in range(3, 5)
    ]
    (root / "test/test_human.json").write_text(json.dumps(human))
    (root / "test/test_augmented.json").write_text(json.dumps(augmented))
    return root


@pytest.fixture(scope="module")
def sparse_model_dir(tmp_path_factory) -> Path:
    model, processor = tiny("llava")
    vlmoe.install_moe_connector(model, init="random", num_experts=4, top_k=2)
    return vlmoe.save(model, tmp_path_factory.mktemp("models") / "chartmoe-tiny", processor=processor)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _scripted(answers: dict[str, str], calls: list[int]):
    """A stand-in for generate_batch answering by question text; counts the prompts it was given."""

    def fake_generate_batch(model, processor, prompts, images, settings, batch_index=0, cluster_ids=None):
        calls.append(len(prompts))
        return [next(a for q, a in answers.items() if q in prompt) for prompt in prompts]

    return fake_generate_batch


def test_run_scores_writes_and_resumes(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    calls: list[int] = []
    answers = {f"bar {i}?": answer for i, answer in enumerate(["45%", "13", "Yes.", "8", "1,000"])}
    monkeypatch.setattr(runner, "generate_batch", _scripted(answers, calls))
    config = EvalConfig(
        task="chartqa", data=chartqa, out_dir=tmp_path, limit=2, generation=GenerationSettings(batch_size=2)
    )
    run_eval(model, processor, config, progress=False)
    assert calls == [2]
    summary = run_eval(model, processor, EvalConfig(**{**config.__dict__, "limit": None}), progress=False)
    assert calls == [2, 2, 1]  # only the 3 new samples were generated
    records = _lines(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in records] == ["human-0", "human-1", "human-2", "augmented-0", "augmented-1"]
    # 45% vs 45 right, 13 vs 12 (8% off) wrong, Yes. vs yes right, 8 vs 7 wrong, 1,000 vs 100 wrong
    assert [r["scores"]["relaxed_accuracy"] for r in records] == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert summary["metrics"]["relaxed_accuracy"] == pytest.approx(2 / 5)
    assert summary["by_subset"]["human"]["relaxed_accuracy"] == pytest.approx(2 / 3)
    assert json.loads((tmp_path / "summary.json").read_text())["num_samples"] == 5
    run_eval(model, processor, EvalConfig(**{**config.__dict__, "limit": None}), progress=False)
    assert calls == [2, 2, 1]  # everything done: nothing generated


def test_half_written_line_is_redone(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    calls: list[int] = []
    monkeypatch.setattr(runner, "generate_batch", _scripted({"bar": "45"}, calls))
    config = EvalConfig(task="chartqa", data=chartqa, out_dir=tmp_path, limit=2)
    run_eval(model, processor, config, progress=False)
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text(predictions.read_text()[:-20])  # killed mid-write
    run_eval(model, processor, config, progress=False)
    assert calls == [2, 1]
    assert [r["id"] for r in _lines(predictions)] == ["human-0", "human-1"]


def test_dropping_a_half_written_line_never_truncates_the_answers_before_it(tmp_path, monkeypatch):
    path = tmp_path / "predictions.jsonl"
    lines = [json.dumps({"id": name, "task": "chartqa"}) for name in ("a", "b")]
    text = "\n".join(lines) + "\n" + '{"id": "c", "ta'  # the last line cut by a kill
    path.write_text(text)
    real_write_text = Path.write_text

    def disk_full_halfway(self, data, *args, **kwargs):
        real_write_text(self, data[:10], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full_halfway)
    with pytest.raises(OSError, match="No space left"):
        runner.read_predictions(path, "chartqa")
    monkeypatch.undo()
    assert path.read_text() == text  # was: the first 10 characters, answers a and b gone
    assert list(runner.read_predictions(path, "chartqa")) == ["a", "b"]
    assert path.read_text() == "\n".join(lines) + "\n"


def test_a_kill_inside_a_non_ascii_character_of_the_last_line_still_resumes(tmp_path):
    path = tmp_path / "predictions.jsonl"
    first = json.dumps({"id": "a", "task": "chartqa", "prediction": "12 °C"}, ensure_ascii=False) + "\n"
    last = json.dumps({"id": "b", "task": "chartqa", "prediction": "15 °C"}, ensure_ascii=False).encode()
    path.write_bytes(first.encode() + last[: last.index("°".encode()) + 1])  # cut inside the 2-byte °
    done = runner.read_predictions(path, "chartqa")  # was: UnicodeDecodeError, the run could not resume
    assert list(done) == ["a"] and done["a"]["prediction"] == "12 °C"
    assert path.read_text(encoding="utf-8") == first


@pytest.mark.parametrize(
    ("line", "found"),
    [
        ('{"task": "chartqa", "prediction": "4"}', "fields present: prediction, task"),
        ("[1]", "a JSON list, not an object"),
    ],
)
def test_a_prediction_record_without_an_id_names_its_file_line_and_field(tmp_path, line, found):
    path = tmp_path / "predictions.jsonl"
    path.write_text(json.dumps({"id": "a", "task": "chartqa"}) + "\n\n" + line + "\n")
    with pytest.raises(ValueError) as error:
        runner.read_predictions(path, "chartqa")
    assert str(error.value) == (
        f"{path} line 3: a prediction record needs its sample's 'id' field ({found}); "
        "delete that line to redo its sample"
    )


def test_resume_with_other_settings_is_refused(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    monkeypatch.setattr(runner, "generate_batch", _scripted({"bar": "45"}, []))
    run_eval(
        model, processor, EvalConfig(task="chartqa", data=chartqa, out_dir=tmp_path, limit=1), progress=False
    )
    other = EvalConfig(task="chartqa", data=chartqa, out_dir=tmp_path, limit=1, pot=True)
    with pytest.raises(ValueError, match="other settings \\(differs in: pot"):
        run_eval(model, processor, other, progress=False)


def test_resume_with_another_batch_size_names_the_setting_and_both_values(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    monkeypatch.setattr(runner, "generate_batch", _scripted({"bar": "45"}, []))
    first = EvalConfig(task="chartqa", data=chartqa, out_dir=tmp_path, limit=1)
    run_eval(model, processor, first, progress=False)
    other = EvalConfig(**{**first.__dict__, "generation": GenerationSettings(batch_size=2)})
    with pytest.raises(ValueError) as error:
        run_eval(model, processor, other, progress=False)
    assert (
        f"{tmp_path} holds predictions made with other settings (differs in: generation.batch_size 8 -> 2; "
        in (str(error.value))
    )


def test_a_run_that_failed_before_its_first_answer_does_not_pin_its_settings(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    vlmoe.install_moe_connector(model, init="random", num_experts=4, top_k=2)
    monkeypatch.setattr(runner, "generate_batch", _scripted({"bar": "45"}, []))
    typo = EvalConfig(task="chartqa", data=chartqa, out_dir=tmp_path, limit=1, force_expert=9)
    with pytest.raises(ValueError, match=r"expert must be in \[0, 4\) for this model, got 9"):
        run_eval(model, processor, typo, progress=False)
    # The folder holds no prediction, so the corrected run starts there instead of being refused.
    summary = run_eval(model, processor, EvalConfig(**{**typo.__dict__, "force_expert": 3}), progress=False)
    assert summary["num_samples"] == 1 and summary["force_expert"] == 3
    assert json.loads((tmp_path / runner.RUN_NAME).read_text())["force_expert"] == 3
    # Once it has answered, other settings are refused as before.
    with pytest.raises(ValueError, match="other settings \\(differs in: force_expert"):
        run_eval(model, processor, EvalConfig(**{**typo.__dict__, "force_expert": 2}), progress=False)


def test_pot_runs_programs_and_contains_hostile_ones(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    answers = {
        "bar 0?": "```python\nprint(40 + 5)\n```",
        "bar 1?": "```python\nimport os\nos.system('echo pwned')\n```",
        "bar 2?": "yes",
        "bar 3?": "```python\nwhile True:\n    pass\n```",
        "bar 4?": "print(10 ** 2)",
    }
    monkeypatch.setattr(runner, "generate_batch", _scripted(answers, []))
    config = EvalConfig(task="chartqa", data=chartqa, out_dir=tmp_path, pot=True, pot_timeout_s=0.5)
    summary = run_eval(model, processor, config, progress=False)
    records = _lines(tmp_path / "predictions.jsonl")
    assert [r["prediction"] for r in records] == ["45", "", "yes", "", "100"]
    assert [r.get("program_status") for r in records] == ["ok", "forbidden", None, "timeout", "ok"]
    assert summary["metrics"]["relaxed_accuracy"] == pytest.approx(3 / 5)
    assert summary["programs"] == {"run": 4, "ok": 2}


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs a python3 on PATH")
def test_pot_programs_run_under_the_chosen_interpreter(chartqa, tmp_path, monkeypatch):
    model, processor = tiny("llava")
    program = "```python\nprint(3 * 15)\n```"
    monkeypatch.setattr(runner, "generate_batch", _scripted({"bar": program}, []))
    seen: list[str | None] = []
    real_run_program = pot.run_program

    def spy(code, timeout_s=5.0, **options):
        seen.append(options.get("interpreter"))
        return real_run_program(code, timeout_s=timeout_s, **options)

    monkeypatch.setattr(pot, "run_program", spy)
    interpreter = shutil.which("python3")
    config = EvalConfig(
        task="chartqa", data=chartqa, out_dir=tmp_path, limit=1, pot=True, pot_interpreter=interpreter
    )
    summary = run_eval(model, processor, config, progress=False)
    assert seen == [interpreter]
    assert _lines(tmp_path / "predictions.jsonl")[0]["prediction"] == "45"
    assert summary["metrics"]["relaxed_accuracy"] == 1.0
    bogus = EvalConfig(**{**config.__dict__, "pot_interpreter": "/no/such/python", "out_dir": tmp_path / "b"})
    with pytest.raises(FileNotFoundError, match="--pot-interpreter '/no/such/python' is not an executable"):
        run_eval(model, processor, bogus, progress=False)


def test_load_model_for_eval_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local model directory"):
        load_model_for_eval(tmp_path)
    model, _ = tiny("llava")
    model.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"processor.save_pretrained\(path\)"):
        load_model_for_eval(tmp_path)


def test_cli_eval_on_a_saved_sparse_model(chartqa, sparse_model_dir, tmp_path):
    out = tmp_path / "out"
    args = ["eval", str(sparse_model_dir), "--task", "chartqa", "--data", str(chartqa), "--out", str(out)]
    args += [
        "--batch-size",
        "2",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
        "--force-expert",
        "1",
        "--limit",
        "3",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "relaxed_accuracy" in result.output and "expert 1" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert (
        summary["num_samples"] == 3 and summary["force_expert"] == 1 and summary["force_where"] == "connector"
    )
    assert len(_lines(out / "predictions.jsonl")) == 3
    # The same forced run again resumes (nothing new); a different expert is refused, not mixed in.
    assert CliRunner().invoke(app, args).exit_code == 0
    refused = CliRunner().invoke(app, [*args[:-4], "--force-expert", "2", "--limit", "3"])
    assert refused.exit_code == 1 and "other settings (differs in: force_expert" in refused.output


def test_cli_eval_reports_bad_data_without_a_traceback(sparse_model_dir, tmp_path):
    args = [
        "eval",
        str(sparse_model_dir),
        "--task",
        "chartqa",
        "--data",
        str(tmp_path),
        "--out",
        str(tmp_path),
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "vlmoe eval: ChartQA: no test_human.json or test_augmented.json" in result.output
    assert "Traceback" not in result.output
    result = CliRunner().invoke(app, [*args, "--dtype", "float64"])
    assert result.exit_code == 1 and "--dtype must be auto, float32, bfloat16 or float16" in result.output


def test_cli_eval_names_a_model_directory_that_cannot_be_loaded(chartqa, tmp_path):
    base = ["--task", "chartqa", "--data", str(chartqa), "--device", "cpu", "--out", str(tmp_path / "out")]
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text('{"model_type": ')
    for model, message in [
        ("bert", "bert/config.json: model_type 'bert' is not a vision-language model"),
        ("cut", "cut/config.json is not valid JSON (line 1, column 16: Expecting value); copy or save"),
    ]:
        result = CliRunner().invoke(app, ["eval", str(tmp_path / model), *base])
        assert result.exit_code == 1 and len(result.output.splitlines()) == 1, result.output
        assert result.output.startswith(f"vlmoe eval: {tmp_path / model}") and message in result.output


def test_load_model_for_eval_dense_and_sparse(sparse_model_dir, tmp_path):
    model, _ = load_model_for_eval(sparse_model_dir, dtype=torch.bfloat16)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert {parameter.dtype for parameter in model.parameters()} == {torch.bfloat16}
    assert type(model.get_submodule("model.multi_modal_projector")).__name__ == "MoEConnector"
    dense, dense_processor = tiny("llava")
    dense.save_pretrained(tmp_path)
    dense_processor.save_pretrained(tmp_path)
    loaded, _ = load_model_for_eval(tmp_path)
    assert type(loaded.get_submodule("model.multi_modal_projector")).__name__ == "LlavaMultiModalProjector"


EXPECTED_METRICS = {
    "chartqa": ["relaxed_accuracy"],
    "pope": ["accuracy", "precision", "recall", "f1", "yes_ratio"],
    "scienceqa": ["accuracy"],
    "textvqa": ["vqa_accuracy"],
    "vqav2": ["vqa_accuracy"],
    "llava": ["exact_match", "relaxed_accuracy"],
}


@pytest.mark.parametrize("task", sorted(BUILDERS))
def test_every_task_end_to_end_with_a_real_tiny_model(task, tmp_path):
    model, processor = tiny("llava")
    data = BUILDERS[task](tmp_path / "data")
    config = EvalConfig(
        task=task, data=data, out_dir=tmp_path / "out", generation=GenerationSettings(max_new_tokens=3)
    )
    summary = run_eval(model, processor, config, progress=False)
    records = _lines(tmp_path / "out/predictions.jsonl")
    assert summary["num_samples"] == len(records) > 0
    assert list(summary["metrics"]) == EXPECTED_METRICS[task]
    assert all(0.0 <= value <= 1.0 for value in summary["metrics"].values())
    assert all(isinstance(record["raw_answer"], str) for record in records)


def test_cli_eval_merge_lora_merges_records_and_refuses_a_mixed_resume(chartqa, tmp_path):
    model, processor = tiny("llava")
    vlmoe.add_mole(model, num_experts=0, rank=4, alpha=8)  # plain LoRA on attention and MLP
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model_dir = vlmoe.save(model, tmp_path / "lora-tiny", processor=processor)
    merged, _ = load_model_for_eval(model_dir, merge_lora=True)
    assert vlmoe.models.read_record(merged).kinds() == ["add_mole", "merge_lora"]
    assert not any("universal" in key for key in merged.state_dict())
    out = tmp_path / "out"
    args = ["eval", str(model_dir), "--task", "chartqa", "--data", str(chartqa), "--out", str(out)]
    args += ["--batch-size", "2", "--max-new-tokens", "3", "--device", "cpu", "--limit", "2"]
    result = CliRunner().invoke(app, [*args, "--merge-lora"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / runner.RUN_NAME).read_text())["merge_lora"] is True
    assert len(_lines(out / "predictions.jsonl")) == 2
    refused = CliRunner().invoke(app, args)  # the same run without the merge: other predictions
    assert refused.exit_code == 1 and "differs in: merge_lora" in refused.output


def test_load_model_for_eval_merge_lora_errors(sparse_model_dir, tmp_path):
    with pytest.raises(ValueError, match="--merge-lora: the model has no plain or universal LoRA"):
        load_model_for_eval(sparse_model_dir, merge_lora=True)
    dense, dense_processor = tiny("llava")
    dense.save_pretrained(tmp_path)
    dense_processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no 'vlmoe' section"):
        load_model_for_eval(tmp_path, merge_lora=True)


def test_cli_eval_refuses_options_it_cannot_use(chartqa, sparse_model_dir, tmp_path):
    base = ["eval", str(sparse_model_dir), "--task", "chartqa", "--data", str(chartqa), "--device", "cpu"]

    def refused(*extra: str) -> str:
        result = CliRunner().invoke(app, [*base, "--out", str(tmp_path / "out"), *extra])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        return result.output

    assert "give --force-expert I too" in refused("--force-where", "all")
    assert "--limit 0: give a number of samples >= 1" in refused("--limit", "0")
    assert "--batch-size 0: give a number >= 1" in refused("--batch-size", "0")
    assert "--max-new-tokens -1: give a number >= 1" in refused("--max-new-tokens", "-1")
    assert "for a model routed by instruction cluster (MoCLE)" in refused("--clusters", str(tmp_path))
    assert "--device 'gpu': not a torch device" in refused("--device", "gpu")
    if not torch.cuda.is_available():
        assert "no usable CUDA GPU" in refused("--device", "cuda")
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    result = CliRunner().invoke(app, [*base, "--out", str(a_file), "--limit", "1", "--max-new-tokens", "2"])
    assert result.exit_code == 1 and f"--out {a_file} is a file" in result.output
    assert not (tmp_path / "out").exists()  # nothing written by a refused run


def test_default_eval_folder_names_a_recipe_stage_by_run_and_stage(tmp_path):
    from vlmoe.cli import _eval_name

    assert _eval_name(tmp_path / "runs" / "chartmoe" / "sft" / "final") == "chartmoe-sft-final"
    assert _eval_name(tmp_path / "runs" / "x" / "align" / "checkpoint-40") == "x-align-checkpoint-40"
    assert _eval_name(tmp_path / "my-model") == "my-model"


def test_default_eval_folder_names_the_model_given_as_a_relative_path(tmp_path, monkeypatch):
    from vlmoe.cli import _eval_name

    (tmp_path / "my-model" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "my-model")
    assert _eval_name(Path(".")) == "my-model"  # was "": results went to eval/<task>
    monkeypatch.chdir(tmp_path / "my-model" / "sub")
    assert _eval_name(Path("..")) == "my-model"  # was ".."


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("limit", -1, "limit is -1; give a whole number >= 1"),  # samples[:-1] would drop the last one
        ("limit", 0, "limit is 0; give a whole number >= 1"),
        ("limit", 2.5, "limit is 2.5; give a whole number >= 1"),
        ("pot_timeout_s", 0, "pot_timeout_s is 0; give a number of seconds > 0"),
    ],
)
def test_a_config_that_would_drop_or_time_out_every_sample_is_refused(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        EvalConfig(task="chartqa", data=tmp_path, out_dir=tmp_path, **{field: value})
