"""The stage progress bar's text, from the Trainer's logs."""

from types import SimpleNamespace

from rich.console import Console

from vlmoe.train.progress import RichProgressCallback

ARGS = SimpleNamespace(per_device_train_batch_size=2, gradient_accumulation_steps=1, world_size=1)


def _callback(max_steps: int = 3) -> tuple[RichProgressCallback, SimpleNamespace]:
    callback = RichProgressCallback(Console(quiet=True), "sft")
    state = SimpleNamespace(max_steps=max_steps, global_step=0)
    callback.on_train_begin(ARGS, state, None)
    return callback, state


def _description(callback: RichProgressCallback) -> str:
    return callback.progress.tasks[0].description


def test_logged_loss_and_aux_loss_show_in_the_bar():
    callback, state = _callback()
    state.global_step = 2
    callback.on_log(ARGS, state, None, logs={"loss": 1.23456, "aux_loss": 0.01})
    assert _description(callback).startswith("sft loss 1.235 aux 0.0100 ")
    callback.on_train_end(ARGS, state, None)


def test_a_stage_shorter_than_logging_steps_shows_its_mean_train_loss():
    callback, state = _callback()
    state.global_step = 3
    callback.on_log(ARGS, state, None, logs={"train_runtime": 1.0})  # nothing to show
    assert _description(callback) == "sft"
    callback.on_log(ARGS, state, None, logs={"train_runtime": 1.0, "train_loss": 2.5})
    assert _description(callback).startswith("sft loss (mean) 2.500 ")
    callback.on_train_end(ARGS, state, None)
