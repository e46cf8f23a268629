"""Triton kernels for the CUDA hot path, each beside the torch reference it must equal.

Triton is optional: without it (or off CUDA) the torch references run. On a CPU machine the
kernels still get tested through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib.util

import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    return HAS_TRITON and tensor.is_cuda
