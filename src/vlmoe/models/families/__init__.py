"""Family adapters: one small declarative file per supported family, registered here.

To add a family, write `vlmoe/models/families/<name>.py` with an `ADAPTER = FamilyAdapter(...)`
(copy `llava.py`) and add it to `ADAPTERS` below.
"""

from __future__ import annotations

from torch import nn

from vlmoe.models.families import idefics3, llava, llava_next, qwen2_5_vl, qwen2_vl
from vlmoe.models.families.base import FamilyAdapter

ADAPTERS: tuple[FamilyAdapter, ...] = (
    llava.ADAPTER,
    llava_next.ADAPTER,
    qwen2_vl.ADAPTER,
    qwen2_5_vl.ADAPTER,
    idefics3.ADAPTER,
)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter of `model`'s family, found from its config class.

    Example:
        >>> from vlmoe.models import tiny
        >>> adapter_for(tiny("llava")[0]).projector
        'model.multi_modal_projector'
    """
    config = getattr(model, "config", None)
    for adapter in ADAPTERS:
        if config is not None and adapter.matches(config):
            return adapter
    supported = ", ".join(f"{a.name} ({a.config_class.__name__})" for a in ADAPTERS)
    found = type(config).__name__ if config is not None else f"{type(model).__name__} without a .config"
    raise ValueError(
        f"unsupported model: its config is {found}; vlmoe supports {supported}. "
        "To add a family, write one small file vlmoe/models/families/<name>.py declaring a "
        "FamilyAdapter (where the projector, decoder layers, MLP and attention linears are; copy "
        "llava.py) and register it in vlmoe/models/families/__init__.py."
    )


__all__ = ["ADAPTERS", "FamilyAdapter", "adapter_for"]
