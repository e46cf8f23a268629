"""The Triton kernels against their torch references (on CPU through TRITON_INTERPRET=1)."""

import pytest
import torch

from tests.moe.helpers import relative_error
from vlmoe.moe.kernels import HAS_TRITON

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("rows", "size"), [(5, 48), (3, 1500), (0, 16)])
def test_swiglu_kernel_forward_and_backward(rows, size):
    from vlmoe.moe.kernels.swiglu import _SwiGLU, swiglu_reference

    torch.manual_seed(rows + size)
    gate_up = torch.randn(rows, 2 * size, device=DEVICE, requires_grad=True)
    grad = torch.randn(rows, size, device=DEVICE)
    out = _SwiGLU.apply(gate_up)
    expected = swiglu_reference(gate_up.double())
    assert out.shape == (rows, size)
    if rows:
        assert relative_error(out, expected) < 1e-6
    (grad_in,) = torch.autograd.grad(out, gate_up, grad)
    (expected_grad,) = torch.autograd.grad(expected, gate_up, grad.double())
    if rows:
        assert relative_error(grad_in, expected_grad) < 1e-6


@pytest.mark.parametrize(("tokens", "top_k", "width"), [(7, 2, 40), (5, 6, 1100), (4, 1, 16)])
def test_combine_kernel_forward_and_backward(tokens, top_k, width):
    from vlmoe.moe.kernels.combine import _CombineSorted, gather_sum_reference, gather_sum_triton

    torch.manual_seed(tokens * top_k)
    sorted_slots = torch.randperm(tokens * top_k, device=DEVICE)
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(tokens * top_k, device=DEVICE)
    y_sorted = torch.randn(tokens * top_k, width, device=DEVICE, requires_grad=True)
    weights = torch.rand(tokens, top_k, device=DEVICE, requires_grad=True)
    grad = torch.randn(tokens, width, device=DEVICE)

    out = _CombineSorted.apply(y_sorted, weights, slot_rows, sorted_slots, top_k)
    expected = gather_sum_reference(y_sorted.double(), slot_rows, weights.double(), top_k)
    assert relative_error(out, expected) < 1e-6
    grads = torch.autograd.grad(out, [y_sorted, weights], grad)
    expected_grads = torch.autograd.grad(expected, [y_sorted, weights], grad.double())
    for actual, wanted in zip(grads, expected_grads, strict=True):
        assert relative_error(actual, wanted) < 1e-6
    # Unit weights: the backward of the token gather.
    summed = gather_sum_triton(y_sorted.detach(), slot_rows, None, top_k)
    assert (
        relative_error(summed, gather_sum_reference(y_sorted.detach().double(), slot_rows, None, top_k))
        < 1e-6
    )
