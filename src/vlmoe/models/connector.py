"""Building an `MoEConnector` from a family's projector and the projectors given for aligned init."""

from __future__ import annotations

import copy
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from vlmoe.moe import MoEConnector


def build_connector(
    projector: nn.Module,
    projector_path: str,
    init: str,
    num_experts: int,
    top_k: int,
    projectors: Sequence[object] | None,
    load_balance_coef: float,
    z_loss_coef: float,
) -> tuple[MoEConnector, int]:
    """The connector and its number of experts (for "aligned", the number of projectors given)."""
    losses = {"load_balance_coef": load_balance_coef, "z_loss_coef": z_loss_coef}
    if init == "aligned":
        if not projectors:
            raise ValueError(
                "init='aligned' needs projectors=[...]: one trained projector per expert (modules, "
                "state dicts or checkpoint files), e.g. general, table, JSON and code"
            )
        experts = [_as_projector(item, projector, projector_path, i) for i, item in enumerate(projectors)]
        return MoEConnector.from_projectors(experts, top_k, **losses), len(experts)
    if projectors:
        raise ValueError(f"projectors=... is only used by init='aligned', got init={init!r}")
    if init == "upcycle":
        return MoEConnector.upcycle(projector, num_experts, top_k, **losses), num_experts
    if init == "random":
        return MoEConnector.random(projector, num_experts, top_k, **losses), num_experts
    raise ValueError(f"init must be 'aligned', 'upcycle' or 'random', got {init!r}")


def _as_projector(item: object, template: nn.Module, projector_path: str, index: int) -> nn.Module:
    """A copy of `template` holding `item`'s weights (a module, state dict or file)."""
    where = f"projectors[{index}]"
    if isinstance(item, nn.Module):
        # Taken by its weights, in order (a Sequential(Linear, GELU, Linear) fits LLaVA's projector
        # class), into a copy of the model's projector below: every expert then has the projector's
        # activation, dtype and device, the layout vlmoe.load rebuilds. Another shape would fail
        # deep in the forward.
        shapes = [tuple(t.shape) for t in item.state_dict().values()]
        needed = [tuple(t.shape) for t in template.state_dict().values()]
        if shapes != needed:
            raise ValueError(
                f"{where}: {type(item).__name__} has tensors of shapes {shapes}, the projector "
                f"{projector_path} ({type(template).__name__}) has {needed}; pass projectors of the model's "
                "own shape (one trained for another model size does not fit)"
            )
        item = dict(zip(template.state_dict(), item.state_dict().values(), strict=True))
    if isinstance(item, (str, Path)):
        where = f"{where} ({item})"
        item = _read_state_dict(Path(item))
    if not isinstance(item, dict):
        raise ValueError(
            f"{where}: expected a module, a state dict or a checkpoint path, got {type(item).__name__}"
        )
    # A whole-model checkpoint works too: keep the projector's own keys, without their prefix.
    prefix = f"{projector_path}."
    if any(key.startswith(prefix) for key in item):
        item = {key[len(prefix) :]: value for key, value in item.items() if key.startswith(prefix)}
    expected = template.state_dict()
    missing = sorted(set(expected) - set(item))
    unexpected = sorted(set(item) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{where}: does not match the projector {projector_path} ({type(template).__name__}): "
            f"missing {missing}, unexpected {unexpected}; pass that projector's state dict "
            f"(keys {sorted(expected)})"
        )
    for key, value in expected.items():
        if item[key].shape != value.shape:
            raise ValueError(
                f"{where}: tensor {key!r} has shape {tuple(item[key].shape)}, the projector needs "
                f"{tuple(value.shape)}; the projector was trained for another model size"
            )
    expert = copy.deepcopy(template)
    expert.load_state_dict(item)
    return expert


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"projector checkpoint {path} does not exist; pass a .safetensors or .pt file"
        )
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise  # its own message names the file and the cause
    # torch.load reports a cut-short zip as OSError(EINVAL), junk as struct.error, an empty file as EOFError.
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, struct.error, OSError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"projector checkpoint {path} cannot be read ({reason}); it is damaged, cut short or not a "
            "state dict: save the projector's state_dict() again (safetensors save_file or torch.save)"
        ) from None
