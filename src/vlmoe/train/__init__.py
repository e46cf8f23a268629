"""Training: recipes (YAML → typed stages) run on HF `Trainer` with router losses, per-part
learning rates, atomic checkpoints and resume."""

from vlmoe.train.recipe import Recipe, RecipeError, StageConfig, builtin_recipes, load_recipe
from vlmoe.train.stages import StageResult, run_recipe
from vlmoe.train.trainer import MoETrainer

__all__ = [
    "MoETrainer",
    "Recipe",
    "RecipeError",
    "StageConfig",
    "StageResult",
    "builtin_recipes",
    "load_recipe",
    "run_recipe",
]
