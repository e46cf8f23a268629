"""What `run_recipe` checks before it writes anything into the run directory.

The local directories and files a recipe names (base.path, data files, image roots, a MoCLE
sentence-encoder, a DeepSpeed config) are looked up first, so a typo fails in a second with the
field and the fix, leaves no half-started run behind, and never turns into a Hub download: a path
that is not a local directory would otherwise reach `from_pretrained` as a repository name.
"""

from __future__ import annotations

from pathlib import Path

from vlmoe.data.folders import output_folder
from vlmoe.train.recipe import Recipe


def recipe_label(recipe: Recipe) -> str:
    """How messages name the recipe: its file when it was read from one.

    >>> recipe_label(Recipe(name="mine", base=None, output_dir="runs/x", stages=[], source="my.yaml"))
    'recipe my.yaml'
    """
    return f"recipe {recipe.source}" if recipe.source else f"recipe {recipe.name!r}"


def check_local_files(recipe: Recipe) -> None:
    """Every local path the recipe names exists (FileNotFoundError naming the field and the fix).

    >>> from vlmoe.train import load_recipe
    >>> check_local_files(load_recipe("chartmoe", scale="tiny"))  # a tiny family: nothing to look up
    >>> check_local_files(load_recipe("moe-llava"))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: recipe .../moe-llava.yaml: base.path 'checkpoints/llava-v1.5-7b' is not a local ...
    """
    check_base_path(recipe)
    label = recipe_label(recipe)
    output_folder(recipe.output_dir, f"{label}: output_dir")  # a file there would fail after the base loads
    for i, stage in enumerate(recipe.stages):
        where = f"stages[{i}] ({stage.name})"
        for j, source in enumerate(stage.data.sources):
            key = f"{where}.data.sources[{j}] ({source.name})"
            if source.path is not None and not Path(source.path).exists():
                raise FileNotFoundError(
                    f"{label}: {key}.path {source.path!r} does not exist{_relative(source.path)}; put the "
                    f"LLaVA-format JSON/JSONL there or edit the path"
                )
            if source.image_root is not None:
                _local_directory(source.image_root, f"{key}.image_root", label)
        if stage.data.cluster is not None and stage.data.cluster.model is not None:
            _local_directory(stage.data.cluster.model, f"{where}.data.cluster.model", label)
        if stage.deepspeed is not None and not Path(stage.deepspeed).is_file():
            raise FileNotFoundError(
                f"{label}: {where}.deepspeed {stage.deepspeed!r} is not a file{_relative(stage.deepspeed)}; "
                f"give a DeepSpeed JSON config or leave deepspeed out"
            )


def check_base_path(recipe: Recipe) -> None:
    """base.path, when given, is a local model directory (one with config.json)."""
    if recipe.base.path is None:
        return
    label = recipe_label(recipe)
    base = _local_directory(recipe.base.path, "base.path", label)
    if not (base / "config.json").is_file():
        raise FileNotFoundError(
            f"{label}: base.path {recipe.base.path!r} has no config.json; give the directory of a "
            f"saved model (save_pretrained, vlmoe.save or vlmoe import) or edit base.path"
        )


def _local_directory(path: str, field: str, label: str) -> Path:
    if not Path(path).is_dir():
        raise FileNotFoundError(
            f"{label}: {field} {path!r} is not a local directory (vlmoe never downloads"
            f"{'' if Path(path).is_absolute() else f'; read from {Path.cwd()}'}); put a local copy there "
            f"or edit {field}"
        )
    return Path(path)


def _relative(path: str) -> str:
    return "" if Path(path).is_absolute() else f" (relative to {Path.cwd()})"
