"""The vision tower of an imported model: its config and weights from a local CLIP/SigLIP directory.

MoE-LLaVA and LLaVA-MoLE load their tower by hub name at run time, so their checkpoints may
lack it; the user points at a local copy (`--vision-tower DIR`, a `save_pretrained` directory
of `CLIPVisionModel`, `SiglipVisionModel`, or the full `CLIPModel` / `SiglipModel`).
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, PretrainedConfig

from vlmoe.interop.tensors import CheckpointTensors, TargetState
from vlmoe.models.checkpoint import read_config

VISION_PREFIX = "vision_model."  # the tower's keys in CLIPVisionModel / SiglipVisionModel
# Buffers older transformers saved that are recomputed from the config (never learned).
DERIVED = ("rotary_emb.inv_freq", "embeddings.position_ids")
_TOWER_TYPES = ("clip_vision_model", "clip", "siglip_vision_model", "siglip")


def read_vision_tower(
    path: str | Path | None, hub_name: str | None
) -> tuple[PretrainedConfig, CheckpointTensors]:
    """(vision config, the directory's tensors) of a local CLIP/SigLIP vision tower."""
    if path is None:
        raise FileNotFoundError(
            f"the checkpoint's vision tower ({hub_name or 'unnamed'}) is loaded by hub name and its "
            "config is not in the checkpoint: download it once (e.g. `huggingface-cli download "
            f"{hub_name or 'openai/clip-vit-large-patch14-336'} --local-dir DIR`) and pass "
            "--vision-tower DIR (vision_tower=DIR in Python)"
        )
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path}: not a vision tower directory (no config.json); pass a save_pretrained folder"
        )
    model_type = read_config(path).get("model_type")  # damaged JSON: a ValueError naming the file
    if model_type not in _TOWER_TYPES:
        raise ValueError(
            f"{path}/config.json: model_type {model_type!r}; expected a CLIP or SigLIP vision tower "
            f"({', '.join(_TOWER_TYPES)}): pass the directory of the tower the checkpoint names"
        )
    config = AutoConfig.from_pretrained(path)
    config = getattr(config, "vision_config", config)  # a full CLIP/SigLIP model holds the tower's config
    return config, CheckpointTensors(path)


def tower_names(tensors: CheckpointTensors) -> dict[str, str]:
    """{name inside a stock vision tower module: name in the directory} for the tower's tensors.

    Hub copies (full CLIP/SigLIP, or vision models saved by transformers 4) prefix the tower with
    `vision_model.`, beside a text tower that is not needed; transformers 5 saves it bare.
    """
    names = tensors.names()
    if any(name.startswith(VISION_PREFIX) for name in names):
        return {name[len(VISION_PREFIX) :]: name for name in names if name.startswith(VISION_PREFIX)}
    return {
        name: name
        for name in names
        if name.startswith(("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head."))
    }


def map_tower(
    tensors: CheckpointTensors, their_prefix: str, tower: CheckpointTensors, target: TargetState
) -> None:
    """The tower's tensors into `model.vision_tower`: from the checkpoint when it has them (under
    `their_prefix`), else from the --vision-tower directory. Derived buffers are not weights."""
    inside = [name for name in tensors.names() if name.startswith(their_prefix)]
    source, names = (
        (tensors, {name[len(their_prefix) :]: name for name in inside})
        if inside
        else (tower, tower_names(tower))
    )
    if not names:
        raise ValueError(f"{tower.path}: no vision tower tensors found; is it a CLIP/SigLIP vision model?")
    for ours, theirs in names.items():
        if ours.endswith(DERIVED):
            source.take(theirs)
        else:
            target.set(
                f"model.vision_tower.{ours}", source.take(theirs), f"{source.path}:{source.describe(theirs)}"
            )
