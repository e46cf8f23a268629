"""Small recipes for training tests: tiny models, a handful of charts, a few steps."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmoe.train.recipe import Recipe, load_recipe


def shrink(recipe: Recipe, out: Path, steps: int = 2) -> Recipe:
    """The recipe at the size of a unit test: `steps` steps per stage, 6 charts, no TensorBoard."""
    recipe.output_dir = str(out)
    for stage in recipe.stages:
        stage.max_steps, stage.batch_size, stage.save_steps = steps, 2, 100
        stage.logging_steps, stage.report_to = 1, []
        stage.data.max_length = 192  # long enough to keep every answer: no step without labels
        for source in stage.data.sources:
            if source.charts is not None:
                source.charts.n, source.charts.size_px = 6, 112
                source.charts.questions_per_chart, source.charts.held_out = 1, min(source.charts.held_out, 2)
                source.charts.chart_types = None
    return recipe


def tiny_recipe(out: Path, steps: int = 6, save_steps: int = 2, **stage_changes) -> Recipe:
    """One stage on tiny LLaVA: upcycle every layer into 4 experts (top-2), train experts + router."""
    recipe = shrink(load_recipe("moe-llava", scale="tiny"), out, steps)
    recipe.stages = recipe.stages[2:]  # the MoE stage, starting from the base model
    stage = recipe.stages[0]
    stage.save_steps, stage.schedule.warmup_ratio = save_steps, 0.0
    stage.surgery[0].upcycle.layers = "all"
    stage.surgery[0].upcycle.capacity_factor = None
    for key, value in stage_changes.items():
        setattr(stage, key, value)
    return recipe


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
