"""silu(gate) * up over a fused [rows, 2F] gate_up tensor, forward and backward in one pass each.

Reading the two halves of the fused projection in place avoids the strided elementwise kernels
and the gradient concatenation that `chunk` costs in eager torch (benchmarks/NOTES.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_forward_kernel(gate_up, out, size, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < size
        gate = tl.load(gate_up + row * 2 * size + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up + row * 2 * size + size + cols, mask=inside, other=0.0).to(tl.float32)
        result = gate * tl.sigmoid(gate) * up
        tl.store(out + row * size + cols, result.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_backward_kernel(gate_up, grad_out, grad_gate_up, size, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < size
        gate = tl.load(gate_up + row * 2 * size + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up + row * 2 * size + size + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.load(grad_out + row * size + cols, mask=inside, other=0.0).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        silu = gate * sigmoid
        grad_gate = grad * up * (sigmoid + silu * (1.0 - sigmoid))
        dtype = grad_gate_up.dtype.element_ty
        tl.store(grad_gate_up + row * 2 * size + cols, grad_gate.to(dtype), mask=inside)
        tl.store(grad_gate_up + row * 2 * size + size + cols, (grad * silu).to(dtype), mask=inside)


_BLOCK = 1024


def swiglu_reference(gate_up: Tensor) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu_forward_triton(gate_up: Tensor) -> Tensor:
    rows, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, size)
    if rows:
        _swiglu_forward_kernel[(rows, triton.cdiv(size, _BLOCK))](gate_up, out, size, BLOCK=_BLOCK)
    return out


def swiglu_backward_triton(gate_up: Tensor, grad_out: Tensor) -> Tensor:
    rows, size = grad_out.shape
    grad_gate_up = torch.empty_like(gate_up)
    if rows:
        grid = (rows, triton.cdiv(size, _BLOCK))
        _swiglu_backward_kernel[grid](gate_up, grad_out.contiguous(), grad_gate_up, size, BLOCK=_BLOCK)
    return grad_gate_up


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        ctx.save_for_backward(gate_up)
        return swiglu_forward_triton(gate_up)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        return swiglu_backward_triton(gate_up, grad_out)


def swiglu(gate_up: Tensor) -> Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:]. gate_up # [rows, 2F] -> [rows, F]."""
    if use_triton(gate_up) and gate_up.is_contiguous() and gate_up.dim() == 2:
        return _SwiGLU.apply(gate_up)
    return swiglu_reference(gate_up)
