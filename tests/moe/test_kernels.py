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


def test_swiglu_backward_can_overwrite_its_input_and_refuses_a_second_backward():
    from vlmoe.moe.kernels.swiglu import _SwiGLU, swiglu_reference

    torch.manual_seed(0)
    leaf = torch.randn(6, 2 * 40, device=DEVICE, requires_grad=True)
    grad = torch.randn(6, 40, device=DEVICE)
    (expected,) = torch.autograd.grad(swiglu_reference(leaf.double()), leaf, grad.double())
    gate_up = leaf * 1.0  # an intermediate, as the experts' gate_up is
    out = _SwiGLU.apply(gate_up, True)
    assert relative_error(out, swiglu_reference(leaf.double())) < 1e-6
    out.backward(grad, retain_graph=True)
    assert relative_error(leaf.grad, expected) < 1e-6
    # The gradient went into gate_up's own memory: gate_up now holds it (d/dx of x * 1 is 1).
    assert relative_error(gate_up.detach(), expected) < 1e-6
    with pytest.raises(RuntimeError, match="second backward"):
        out.backward(grad)


def test_swiglu_never_overwrites_a_leaf(monkeypatch):
    from vlmoe.moe.kernels import swiglu as kernels

    monkeypatch.setattr(kernels, "use_triton", lambda tensor: True)  # the kernel path, on any device
    leaf = torch.randn(3, 32, device=DEVICE, requires_grad=True)
    before = leaf.detach().clone()
    out = kernels.swiglu(leaf, overwrite_input=True)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_SwiGLUBackward"
    out.sum().backward(retain_graph=True)
    assert torch.equal(leaf.detach(), before)
    out.sum().backward()  # nothing was overwritten, so a second backward is fine
