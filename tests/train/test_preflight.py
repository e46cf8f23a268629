"""Start-up checks: local paths and the processor fail before the run directory is written, never
reach the Hub, and a run that failed at start-up can be rerun into the same directory."""

from __future__ import annotations

import json

import pytest
import transformers
import yaml
from PIL import Image
from typer.testing import CliRunner

import vlmoe
from vlmoe.cli import app
from vlmoe.train import load_recipe, run_recipe
from vlmoe.train.preflight import check_local_files
from vlmoe.train.stages import _check_run_directory, base_processor


def _chat_file(folder):
    """Two LLaVA-format samples with one image each."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), "red").save(folder / "red.png")
    turns = [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "red"}]
    samples = [{"id": f"s{i}", "image": "red.png", "conversations": turns} for i in range(2)]
    (folder / "chat.json").write_text(json.dumps(samples))
    return folder / "chat.json"


def _recipe_file(tmp_path, data_path, base=None):
    recipe = {
        "name": "pre",
        "base": base or {"family": "llava"},
        "output_dir": str(tmp_path / "run"),
        "stages": [
            {
                "name": "sft",
                "data": {"sources": [{"name": "chat", "path": str(data_path)}], "max_length": 192},
                "trainable": ["connector"],
                "max_steps": 1,
                "batch_size": 2,
                "logging_steps": 1,
                "report_to": [],
            }
        ],
    }
    path = tmp_path / "pre.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _train(*args):
    return CliRunner().invoke(app, ["train", *map(str, args), "--device", "cpu"])


@pytest.mark.parametrize("absolute", [False, True])
def test_a_missing_base_path_is_refused_before_anything_is_written(tmp_path, monkeypatch, absolute):
    monkeypatch.chdir(tmp_path)
    base = str(tmp_path / "no-such-model") if absolute else "checkpoints/no-such-model"
    path = _recipe_file(tmp_path, _chat_file(tmp_path / "data"), base={"path": base})
    result = _train(path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert (
        f"recipe {path}: base.path {base!r} is not a local directory (vlmoe never downloads" in result.output
    )
    assert "put a local copy there or edit base.path" in result.output
    assert not (tmp_path / "run").exists()


def test_the_builtin_full_scale_recipes_name_their_missing_base_at_once(tmp_path):
    result = _train("moe-llava", "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert "moe-llava.yaml: base.path 'checkpoints/llava-v1.5-7b' is not a local directory" in result.output
    assert not (tmp_path / "run").exists()


def test_a_base_directory_without_a_model_or_a_processor_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = load_recipe(
        _recipe_file(tmp_path, _chat_file(tmp_path / "data"), base={"path": str(tmp_path / "empty")})
    )
    with pytest.raises(FileNotFoundError, match="base.path '.*empty' has no config.json"):
        check_local_files(recipe)
    model, _ = vlmoe.models.tiny("llava")
    vlmoe.save(model, tmp_path / "no-processor")  # weights and config, no processor files
    recipe.base.path = str(tmp_path / "no-processor")
    with pytest.raises(FileNotFoundError, match="holds no usable processor .*processor.save_pretrained"):
        base_processor(recipe)


def test_the_base_processor_is_read_from_local_files_only(tmp_path, monkeypatch):
    model, processor = vlmoe.models.tiny("llava")
    vlmoe.save(model, tmp_path / "base", processor=processor)
    calls = []
    real = transformers.AutoProcessor.from_pretrained

    def spy(path, **kwargs):
        calls.append(kwargs)
        return real(path, **kwargs)

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", spy)
    recipe = load_recipe(
        _recipe_file(tmp_path, _chat_file(tmp_path / "data"), base={"path": str(tmp_path / "base")})
    )
    loaded = base_processor(recipe)
    assert calls == [{"local_files_only": True}]
    assert loaded.tokenizer.get_vocab() == processor.tokenizer.get_vocab()


def test_missing_data_files_are_named_with_their_stage_and_source(tmp_path):
    path = _recipe_file(tmp_path, tmp_path / "data" / "chat.json")
    result = _train(path)
    assert result.exit_code == 1
    assert f"recipe {path}: stages[0] (sft).data.sources[0] (chat).path" in result.output
    assert "does not exist; put the LLaVA-format JSON/JSONL there or edit the path" in result.output
    assert not (tmp_path / "run").exists()


def test_an_output_directory_that_is_a_file_is_refused_before_the_base_loads(tmp_path):
    path = _recipe_file(tmp_path, _chat_file(tmp_path / "data"))
    (tmp_path / "run").write_text("notes")  # the recipe's output_dir
    result = _train(path)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"recipe {path}: output_dir {tmp_path / 'run'} is a file; pass a folder" in result.output
    result = _train(path, "--out", tmp_path / "run" / "sub")
    assert (
        result.exit_code == 1
        and f"--out {tmp_path / 'run' / 'sub'} is inside {tmp_path / 'run'}" in result.output
    )
    assert (tmp_path / "run").read_text() == "notes"


def test_after_a_failed_start_the_corrected_recipe_runs_into_the_same_directory(tmp_path):
    path = _recipe_file(tmp_path, tmp_path / "data" / "chat.json")  # not written yet
    assert _train(path).exit_code == 1
    _chat_file(tmp_path / "data")
    result = _train(path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "sft" / "stage_done.json").is_file()


def test_a_run_directory_where_no_stage_started_is_started_again(tmp_path):
    """recipe.json written, then a failure before any checkpoint: a rerun (with or without
    --resume, with a changed recipe) starts the run again instead of refusing it."""
    recipe = load_recipe(_recipe_file(tmp_path, _chat_file(tmp_path / "data")))
    out = tmp_path / "run"
    _check_run_directory(recipe, out, resume=False)
    recipe.stages[0].max_steps = 5
    _check_run_directory(recipe, out, resume=False)
    assert json.loads((out / "recipe.json").read_text())["stages"][0]["max_steps"] == 5
    recipe.stages[0].max_steps = 7
    _check_run_directory(recipe, out, resume=True)
    assert json.loads((out / "recipe.json").read_text())["stages"][0]["max_steps"] == 7
    (out / "sft" / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # now there is work to keep
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        _check_run_directory(recipe, out, resume=False)
    recipe.stages[0].max_steps = 9
    with pytest.raises(ValueError, match="different stages"):
        _check_run_directory(recipe, out, resume=True)


def test_a_run_whose_first_stage_failed_on_its_data_reruns_without_resume(tmp_path):
    data = _chat_file(tmp_path / "data")
    data.write_text(json.dumps([{"id": "bad", "conversations": []}]))  # found only when the stage reads it
    path = _recipe_file(tmp_path, data)
    first = _train(path)
    assert first.exit_code == 1 and "bad" in first.output
    assert (tmp_path / "run" / "recipe.json").is_file()
    _chat_file(tmp_path / "data")
    again = _train(path)
    assert again.exit_code == 0, again.output
    assert (tmp_path / "run" / "sft" / "stage_done.json").is_file()
    assert run_recipe(load_recipe(path), resume=True, device="cpu")[0].skipped
