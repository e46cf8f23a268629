"""vlmoe: turn a dense vision-language model into a sparse Mixture-of-Experts one, and train it."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# Everything loads on first use, so `import vlmoe` (and the CLI's start) does not import torch
# or transformers until a command needs them.
_LAZY = {
    "aux_loss": "vlmoe.moe",
    "upcycle_ffn": "vlmoe.models.surgery",
    "add_mole": "vlmoe.models.surgery",
    "install_moe_connector": "vlmoe.models.surgery",
    "merge_lora": "vlmoe.models.surgery",
    "save": "vlmoe.models.checkpoint",
    "load": "vlmoe.models.checkpoint",
    "export_hf": "vlmoe.models.export",
    "models": "vlmoe.models",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'vlmoe' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name])
    return module if name == "models" else getattr(module, name)


__all__ = [
    "__version__",
    "add_mole",
    "aux_loss",
    "export_hf",
    "install_moe_connector",
    "load",
    "merge_lora",
    "models",
    "save",
    "upcycle_ffn",
]
