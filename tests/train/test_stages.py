"""Stages end to end on tiny models: every built-in recipe, resume, frozen parts, stage outputs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from train_helpers import shrink, state, tiny_recipe
from typer.testing import CliRunner

import vlmoe
from vlmoe.cli import app
from vlmoe.models import parameter_parts
from vlmoe.train import builtin_recipes, load_recipe, run_recipe
from vlmoe.train.recipe import recipe_path
from vlmoe.train.stages import base_model, training_arguments, training_device
from vlmoe.train.trainer import COMPLETE, complete_checkpoints


@pytest.mark.slow
@pytest.mark.parametrize("name", builtin_recipes())
def test_every_builtin_recipe_runs_at_tiny_scale(name, tmp_path):
    recipe = load_recipe(name, scale="tiny", output_dir=tmp_path)
    if name == "demo":  # its tiny scale is the 80-second demo: the same stages, shorter here
        recipe = shrink(recipe, tmp_path)
    for stage in recipe.stages:
        stage.report_to = []
    results = run_recipe(recipe, device="cpu")
    assert [r.name for r in results] == [s.name for s in recipe.stages]
    for result in results:
        assert (tmp_path / result.name / "stage_done.json").is_file()
        losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
        stage = recipe.stage(result.name)
        assert len(losses) == stage.max_steps // stage.logging_steps
        assert all(torch.isfinite(torch.tensor(losses)))
    final = vlmoe.load(results[-1].model_dir)  # the last stage's model reloads with its surgery
    kinds = {step.kind for step in vlmoe.models.read_record(final).steps}
    expected = {
        "moe-llava": {"upcycle_ffn"},
        "chartmoe": {"install_moe_connector", "add_mole"},
        "demo": {"install_moe_connector", "add_mole"},
        "llava-mole": {"add_mole"},
        "mocle": {"add_mole"},
    }
    assert kinds == expected[name]
    if name == "mocle":  # the centroids travel with the model, for new instructions at inference
        assert (results[-1].model_dir / "clusters" / "centroids.safetensors").is_file()


@pytest.mark.slow
def test_resume_after_an_interruption_reproduces_the_uninterrupted_weights(tmp_path):
    whole = run_recipe(tiny_recipe(tmp_path / "whole"), device="cpu")
    expected = state(vlmoe.load(whole[-1].model_dir))

    recipe = tiny_recipe(tmp_path / "cut")
    assert run_recipe(recipe, device="cpu", stop_after_steps=3) == []  # "killed" after step 3
    checkpoints = tmp_path / "cut" / "moe" / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-2", "checkpoint-3"]
    (checkpoints / "checkpoint-4").mkdir()  # a kill in the middle of writing the next one
    resumed = run_recipe(tiny_recipe(tmp_path / "cut"), resume=True, device="cpu")
    assert not (checkpoints / "checkpoint-4" / "half-written").exists()
    got = state(vlmoe.load(resumed[-1].model_dir))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert all((p / COMPLETE).is_file() for p in checkpoints.glob("checkpoint-*"))


@pytest.mark.slow
def test_finished_stage_is_not_rerun_and_a_new_run_refuses_a_used_directory(tmp_path):
    run_recipe(tiny_recipe(tmp_path, steps=2), device="cpu")
    done = (tmp_path / "moe" / "stage_done.json").read_text()
    again = run_recipe(tiny_recipe(tmp_path, steps=2), resume=True, device="cpu")
    assert again[0].skipped and (tmp_path / "moe" / "stage_done.json").read_text() == done
    with pytest.raises(ValueError, match="already holds a run; continue it with --resume"):
        run_recipe(tiny_recipe(tmp_path, steps=2), device="cpu")
    with pytest.raises(ValueError, match="different stages"):
        run_recipe(tiny_recipe(tmp_path, steps=3), resume=True, device="cpu")


@pytest.mark.slow
def test_frozen_parts_stay_bit_identical(tmp_path):
    recipe = tiny_recipe(tmp_path, steps=3, trainable=["router"])
    before = state(vlmoe.upcycle_ffn(base_model(recipe), num_experts=4, top_k=2, layers="all"))
    result = run_recipe(recipe, device="cpu")
    model = vlmoe.load(result[-1].model_dir)
    after, parts = state(model), parameter_parts(model)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and {parts[name] for name in changed} == {"router"}
    history = json.loads((tmp_path / "moe" / "stage_done.json").read_text())["log_history"]
    assert any(key.startswith("aux/") for key in history[0])  # per-layer router losses are logged


@pytest.mark.slow
def test_killed_process_resumes_to_the_uninterrupted_weights(tmp_path):
    """A real SIGKILL of `vlmoe train` mid-run; --resume then ends with the uninterrupted weights."""
    recipe = yaml.safe_load(recipe_path("moe-llava").read_text())
    stage = recipe["stages"][2]
    stage.update(start="base", max_steps=30, batch_size=2, save_steps=3, logging_steps=5, report_to=[])
    stage["surgery"][0]["upcycle"].update(layers="all", capacity_factor=None)
    stage["data"] = {"sources": [{"name": "c", "charts": {"n": 6, "tasks": ["chart_qa"]}}], "max_length": 192}
    recipe.update(base={"family": "llava"}, stages=[stage], scales={})
    path = tmp_path / "kill.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def train(out, resume=False):
        command = [
            sys.executable,
            "-m",
            "vlmoe.cli",
            "train",
            str(path),
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
        return subprocess.Popen([*command, *(["--resume"] if resume else [])], stdout=subprocess.DEVNULL)

    assert train(tmp_path / "whole").wait(timeout=300) == 0
    process = train(tmp_path / "cut")
    checkpoints = tmp_path / "cut" / "moe" / "checkpoints"
    deadline = time.monotonic() + 240
    while not complete_checkpoints(checkpoints) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "cut" / "moe" / "stage_done.json").exists()  # killed before the end
    assert train(tmp_path / "cut", resume=True).wait(timeout=300) == 0
    expected = state(vlmoe.load(tmp_path / "whole" / "moe" / "final"))
    got = state(vlmoe.load(tmp_path / "cut" / "moe" / "final"))
    assert all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{"gradient_checkpointing": True}, {"precision": "bf16"}])
def test_gradient_checkpointing_and_bf16_train(tmp_path, changes):
    plain = run_recipe(tiny_recipe(tmp_path / "plain", steps=2), device="cpu")[0].log_history
    other = run_recipe(tiny_recipe(tmp_path / "other", steps=2, **changes), device="cpu")[0].log_history
    first = [entry["loss"] for entry in (plain[0], other[0])]
    # Checkpointing recomputes the same forward; bf16 autocast changes the loss only a little.
    assert first[1] == pytest.approx(first[0], abs=0 if "gradient_checkpointing" in changes else 0.05)


def test_aligned_connector_takes_an_expert_from_a_saved_model_directory(tmp_path):
    from vlmoe.eval import forced_expert
    from vlmoe.train.recipe import SurgeryConfig, check_recipe
    from vlmoe.train.stages import apply_surgery
    from vlmoe.train.validate import from_mapping

    donor = vlmoe.models.tiny("llava", seed=5)[0]
    vlmoe.save(donor, tmp_path / "donor")
    recipe = load_recipe(recipe_path("chartmoe"), scale="tiny", output_dir=tmp_path / "run")
    projectors = ["base", str(tmp_path / "donor")]
    connector = {"connector": {"init": "aligned", "projectors": projectors}}
    surgery = from_mapping(SurgeryConfig, connector, "", "")
    recipe.stages[-1].surgery = [surgery]
    check_recipe(recipe, "test")  # a directory with config.json is a valid projector source
    model = base_model(recipe)
    apply_surgery(model, surgery, recipe, [], recipe.stages[-1])
    connector = model.model.multi_modal_projector
    x = torch.randn(3, donor.config.vision_config.hidden_size)
    with forced_expert(model, 1, where="connector"), torch.no_grad():
        assert torch.allclose(connector(x), donor.model.multi_modal_projector(x), atol=1e-6)


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "--device 'gpu': not a torch device; use cpu, cuda, cuda:N or auto"),
        ("cuda:1", "CUDA_VISIBLE_DEVICES=1" if torch.cuda.device_count() > 1 else "--device 'cuda:1'"),
        pytest.param(
            "cuda",
            "no usable CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU"),
        ),
    ],
)
def test_a_device_the_machine_cannot_train_on_is_refused_before_any_write(tmp_path, device, message):
    result = CliRunner().invoke(
        app, ["train", "chartmoe", "--scale", "tiny", "--device", device, "--out", str(tmp_path / "run")]
    )
    assert result.exit_code == 1
    assert result.output.startswith("vlmoe train: ") and message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_training_arguments_follow_the_resolved_device(tmp_path):
    recipe = tiny_recipe(tmp_path)
    stage = recipe.stages[0]
    args = training_arguments(recipe, stage, tmp_path / stage.name, training_device("cpu"))
    assert args.use_cpu and args.device.type == "cpu"
    assert training_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_a_run_shares_its_console_with_the_kernels_progress_bars(tmp_path, monkeypatch):
    # The first step on QuACK draws its tuning bars on vlmoe.console's shared console: inside a
    # run that is the run's own, the one its stage bars are on (one terminal, one live stack).
    import importlib

    from rich.console import Console

    from vlmoe.console import shared_console

    stages = importlib.import_module("vlmoe.train.stages")
    seen = []
    monkeypatch.setattr(stages, "run_stage", lambda *args, **kwargs: seen.append(shared_console()) or [])
    console = Console(quiet=True)
    before = shared_console()
    results = run_recipe(tiny_recipe(tmp_path, steps=1), device="cpu", console=console)
    assert seen and all(shared is console for shared in seen)
    assert [result.skipped for result in results] == [False] * len(seen)
    assert shared_console() is before  # the stderr console again once the run is over


@pytest.mark.parametrize(
    ("change", "changed"),
    [
        (lambda r: setattr(r.base, "family", "qwen2_vl"), 'base (base.family: "llava" -> "qwen2_vl")'),
        (lambda r: setattr(r.base, "seed", 1), "base (base.seed: 0 -> 1)"),
        (lambda r: setattr(r, "seed", 1), "seed (seed: 0 -> 1)"),
        (
            lambda r: (setattr(r, "seed", 1), setattr(r.stages[0], "max_steps", 9)),
            "seed and stages (seed: 0 -> 1; stages[0] (moe).max_steps: 6 -> 9)",
        ),
        (
            lambda r: (
                setattr(r.stages[0], "learning_rate", {"default": 1e-3}),
                r.stages.append(r.stages[0]),
            ),
            'stages (stages: ["moe"] -> ["moe", "moe"])',
        ),
        (
            lambda r: [
                setattr(r.stages[0], key, 7)
                for key in ("max_steps", "save_steps", "logging_steps", "epochs", "batch_size", "seed")
                if hasattr(r.stages[0], key)
            ],
            "stages (stages[0] (moe).batch_size: 2 -> 7; stages[0] (moe).max_steps: 6 -> 7; "
            "stages[0] (moe).epochs: 1.0 -> 7)",  # save_steps and logging_steps may change
        ),
    ],
)
def test_resume_refuses_a_recipe_whose_base_or_seed_changed(tmp_path, change, changed):
    # A checkpoint of one tiny family does not load into another (it failed deep in safetensors),
    # and another seed would continue with a different data order and surgery init.
    from vlmoe.train.stages import _check_run_directory

    out = tmp_path / "run"
    _check_run_directory(tiny_recipe(out), out, resume=False)
    (out / "moe" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    moved = tiny_recipe(tmp_path / "moved")
    moved.name, moved.description = "renamed", "another description"
    _check_run_directory(moved, out, resume=True)  # name, description and output_dir may differ
    recipe = tiny_recipe(out)
    change(recipe)
    with pytest.raises(ValueError) as error:
        _check_run_directory(recipe, out, resume=True)
    assert str(error.value) == (
        f"{out / 'recipe.json'}: the run was started with different {changed}; resume with the same "
        f"recipe and --scale (or {out / 'recipe.json'} itself), or start a new output dir"
    )


def test_resume_may_change_how_a_run_logs_saves_and_checkpoints_activations(tmp_path):
    from vlmoe.train.stages import _check_run_directory

    out = tmp_path / "run"
    _check_run_directory(tiny_recipe(out), out, resume=False)
    (out / "moe" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    recipe = tiny_recipe(out)
    stage = recipe.stages[0]
    stage.logging_steps, stage.save_steps, stage.save_total_limit = 5, 50, 1
    stage.report_to, stage.dataloader_workers, stage.gradient_checkpointing = [], 2, True
    _check_run_directory(recipe, out, resume=True)  # none of these changes the weights
    saved = json.loads((out / "recipe.json").read_text())["stages"][0]
    assert (saved["logging_steps"], saved["report_to"], saved["gradient_checkpointing"]) == (5, [], True)


def test_a_stage_that_fails_mid_training_leaves_the_terminal_as_it_was(tmp_path):
    # The collator refuses the first batch (max_length below the image tokens) inside
    # trainer.train: the stage's bar must still end, showing the cursor again and giving
    # sys.stderr back, or the error line and everything after it go through rich's proxy.
    import io

    from rich.console import Console

    recipe = tiny_recipe(tmp_path, steps=2)
    recipe.stages[0].data.max_length = 8
    terminal = io.StringIO()
    stderr = sys.stderr
    with pytest.raises(ValueError, match="raise max_length to at least"):
        run_recipe(recipe, device="cpu", console=Console(file=terminal, force_terminal=True))
    assert sys.stderr is stderr
    text = terminal.getvalue()
    assert "\x1b[?25l" in text and text.rfind("\x1b[?25h") > text.rfind("\x1b[?25l")
