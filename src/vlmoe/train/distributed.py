"""What a recipe needs to run unchanged on several processes (`torchrun`, `accelerate launch`).

- One process writes the run directory (recipe.json, generated data, clusters, final models);
  the others wait for it (`TrainingArguments.main_process_first`, the accelerator's barrier)
  and then read what it wrote.
- Full (unsharded) weights in and out of a model that DDP wraps or FSDP2 shards, in the
  module's own parameter names, so a checkpoint written under sharding loads on one device and
  one written on one device loads under sharding.

The process rank comes from the launcher's RANK variable before the process group exists, and
from torch.distributed once it does.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)

from vlmoe.models.checkpoint import tied_names


def _initialised() -> bool:
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's global rank (0 on a single process)."""
    return dist.get_rank() if _initialised() else int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on the process that writes shared files (rank 0, or the only process)."""
    return process_rank() == 0


def is_sharded(model: nn.Module) -> bool:
    """Whether some parameter is a DTensor shard (FSDP2's `fully_shard`)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Every weight of `model` whole, on CPU, under the module's own names, on every rank.

    A collective when the model is sharded: every rank must call it. Works for plain, DDP-wrapped
    (pass the inner module) and FSDP2-sharded modules.

    Example:
        >>> sorted(full_state_dict(nn.Linear(2, 3)))
        ['bias', 'weight']
    """
    if not is_sharded(model):
        return {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    options = StateDictOptions(full_state_dict=True, cpu_offload=False)
    return {
        name: tensor.detach().cpu() for name, tensor in get_model_state_dict(model, options=options).items()
    }


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Load whole weights (from `full_state_dict` or a one-device save) into `model`, sharded or not.

    Every rank passes the full dictionary; under FSDP2 each keeps its own shard. Tied weights may be
    given under one name only (as `safetensors` writes them).
    """
    if not is_sharded(model):
        missing, unexpected = model.load_state_dict(state, strict=False)
        _check_names(model, missing, unexpected)
        return
    options = StateDictOptions(full_state_dict=True, strict=False)
    missing, unexpected = set_model_state_dict(model, state, options=options)
    _check_names(model, missing, unexpected)


def _check_names(model: nn.Module, missing: list[str], unexpected: list[str]) -> None:
    # A tied weight saved once is "missing" under its other name; anything else is a real mismatch.
    tied = tied_names(model)
    missing = [name for name in missing if name not in tied]
    if missing or unexpected:
        raise ValueError(
            f"the weights do not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
            "load a checkpoint written for this model (same recipe and surgery)"
        )


def seed_per_rank(seed: int) -> None:
    """Seed torch with `seed + rank`: dropout and router jitter differ between ranks, while the
    model (initialised before this, from the shared seed) is the same everywhere."""
    torch.manual_seed(seed + process_rank())
