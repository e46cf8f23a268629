"""Rich progress for a stage (steps, loss, aux loss, throughput), and a stop switch for tests."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from transformers import TrainerCallback


class RichProgressCallback(TrainerCallback):
    """One progress bar per stage; its text shows the last logged loss, aux loss and samples/s."""

    def __init__(self, console: Console, stage: str) -> None:
        self.console, self.stage = console, stage
        self.progress: Progress | None = None
        self.task: Any = None
        self.start = 0.0
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
        self.progress = Progress(*columns, console=self.console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.stage, total=state.max_steps, completed=state.global_step)
        self.start, self.first_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The Trainer's last log carries the stage's mean train_loss: a stage shorter than
        # logging_steps logs no "loss" at all, and its bar would end without one.
        loss = None if not logs else logs.get("loss", logs.get("train_loss"))
        if self.progress is None or loss is None:
            return
        steps = state.global_step - self.first_step
        seconds = max(time.perf_counter() - self.start, 1e-9)
        per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        mean = "" if "loss" in logs else " (mean)"
        text = f"{self.stage} loss{mean} {loss:.3f}"
        if "aux_loss" in logs:
            text += f" aux {logs['aux_loss']:.4f}"
        text += f" {steps * per_step / seconds:.1f} samples/s"
        self.progress.update(self.task, description=text)

    def on_train_end(self, args, state, control, **kwargs):
        self.stop()

    def stop(self) -> None:
        """End the bar; also where training raised, which skips on_train_end: a bar left live keeps
        the terminal's cursor hidden and sys.stdout/stderr redirected after the run."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StopAfter(TrainerCallback):
    """Save a checkpoint and stop after `steps` optimiser steps, like a kill right after a save."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_save = True
            control.should_training_stop = True
        return control
