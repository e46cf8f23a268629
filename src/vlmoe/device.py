"""The torch device a command runs on, checked once where the option is read.

A device string the machine cannot run ("gpu", or "cuda" without a GPU) is refused here with the
fix, instead of training silently on another device or failing deep inside torch on first use."""

from __future__ import annotations

import torch


def resolve_device(name: str | torch.device | None, option: str = "--device") -> torch.device:
    """`name` as a torch device the machine has; None or "auto" is the GPU when there is one.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
        >>> resolve_device("gpu")
        Traceback (most recent call last):
        ...
        ValueError: --device 'gpu': not a torch device; use cpu, cuda, cuda:N or auto
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {name!r}: not a torch device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"{option} {name!r}: this machine has no usable CUDA GPU (torch {torch.__version__}, "
                f"CUDA build {torch.version.cuda}); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"{option} {name!r}: there are {torch.cuda.device_count()} CUDA devices (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    elif device.type != "cpu":
        raise ValueError(f"{option} {name!r}: vlmoe runs on cpu or cuda")
    return device
