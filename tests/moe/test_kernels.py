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


@pytest.mark.parametrize(
    ("tokens", "top_k", "width", "dtype"),
    [
        (7, 2, 40, torch.float32),
        (5, 6, 1100, torch.bfloat16),
        (4, 1, 16, torch.float32),
        (3, 3, 2048, torch.float16),
    ],
)
def test_spread_rows_kernel_equals_the_sorted_gather(tokens, top_k, width, dtype):
    from vlmoe.moe.kernels.combine import spread_rows_triton

    torch.manual_seed(tokens + top_k)
    sorted_slots = torch.randperm(tokens * top_k, device=DEVICE)
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(tokens * top_k, device=DEVICE)
    src = torch.randn(tokens, width, device=DEVICE).to(dtype)
    out = spread_rows_triton(src, slot_rows, top_k)
    # A copy: bit for bit the rows index_select gives in sorted order.
    assert out.dtype == dtype
    assert torch.equal(out, src.index_select(0, sorted_slots // top_k))
    # A strided (transposed) input is read as its values, not its memory.
    src_t = torch.randn(width, tokens, device=DEVICE).to(dtype).t()
    assert torch.equal(
        spread_rows_triton(src_t, slot_rows, top_k), src_t.index_select(0, sorted_slots // top_k)
    )


def test_spread_rows_refuses_a_slot_count_that_is_not_tokens_times_k():
    from vlmoe.moe.kernels.combine import spread_rows_triton

    with pytest.raises(ValueError, match="expected 4 tokens x 2"):
        spread_rows_triton(torch.zeros(4, 8, device=DEVICE), torch.arange(6, device=DEVICE), 2)


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


@pytest.mark.parametrize(("rows", "size", "overwrite"), [(5, 1500, False), (4, 48, True), (0, 16, False)])
def test_swiglu_kernel_with_row_scale_forward_and_backward(rows, size, overwrite):
    from vlmoe.moe.kernels.swiglu import _SwiGLU, swiglu_reference

    torch.manual_seed(rows + size)
    leaf = torch.randn(rows, 2 * size, device=DEVICE, requires_grad=True)
    scale = torch.rand(rows, device=DEVICE, requires_grad=True)
    grad = torch.randn(rows, size, device=DEVICE)
    out = _SwiGLU.apply(leaf * 1.0, overwrite, scale)
    expected = swiglu_reference(leaf.double(), scale.double())
    assert out.shape == (rows, size)
    grads = torch.autograd.grad(out, [leaf, scale], grad)
    expected_grads = torch.autograd.grad(expected, [leaf, scale], grad.double())
    if rows:
        assert relative_error(out, expected) < 1e-6
        for actual, wanted in zip(grads, expected_grads, strict=True):
            assert actual.dtype == torch.float32
            assert relative_error(actual, wanted) < 1e-5  # the scale's gradient sums 1500 products


@pytest.mark.parametrize(
    ("rows", "size", "in_place", "launch"),
    [
        (5, 1500, False, None),  # a last column block part-filled, a last row block part-filled
        (4, 48, True, None),
        (11, 384, True, (2, 256, 4)),  # two column steps of 256 for 384 columns
        (9, 128, True, (1, 128, 4)),
        (0, 16, True, None),
    ],
)
@pytest.mark.parametrize("triton_kernel", [True, False])
def test_swiglu_pairs_backward_matches_autograd(monkeypatch, rows, size, in_place, launch, triton_kernel):
    # Gate and up paired in adjacent columns (QuACK's gated epilogue): preact's gradient (paired
    # too, possibly over preact), the weights' gradient at each row's slot and scale * hidden in
    # grad_hidden's place. The rows hold the slots in a shuffled order, as the expert sort leaves them.
    from vlmoe.moe.kernels import swiglu

    monkeypatch.setattr(swiglu, "use_triton", lambda tensor: triton_kernel)
    torch.manual_seed(rows + size)
    # bf16, the kernel's word layout: gate and up rounded first, so the float64 reference sees
    # the same inputs; the kernel computes in float32 and rounds its outputs to bf16.
    preact = torch.randn(rows, 2 * size, device=DEVICE).bfloat16()
    slot_weights = torch.rand(rows, device=DEVICE)
    sorted_slots = torch.randperm(rows, device=DEVICE)
    grad_hidden = torch.randn(rows, size, device=DEVICE).bfloat16()
    preact64 = preact.double().requires_grad_()
    weights64 = slot_weights.double().requires_grad_()
    scale64 = weights64[sorted_slots].unsqueeze(-1)
    hidden64 = torch.nn.functional.silu(preact64[:, 0::2]) * preact64[:, 1::2]
    expected = torch.autograd.grad(hidden64 * scale64, [preact64, weights64], grad_hidden.double())
    scaled_hidden = (hidden64 * scale64).detach()

    grad_preact, grad_weights = swiglu.swiglu_pairs_backward(
        preact, grad_hidden, slot_weights, sorted_slots, out=preact if in_place else None, launch=launch
    )
    assert grad_preact.shape == preact.shape and grad_weights.shape == (rows,)
    assert (grad_preact.data_ptr() == preact.data_ptr()) is in_place
    if rows:
        assert grad_preact.dtype == torch.bfloat16 and relative_error(grad_preact, expected[0]) < 1e-2
        assert grad_weights.dtype == torch.float32 and relative_error(grad_weights, expected[1]) < 1e-5
        assert relative_error(grad_hidden, scaled_hidden) < 1e-2
        # gate and up land in their own columns (a swapped pair would still be close in norm)
        assert relative_error(grad_preact[:, 1::2], expected[0][:, 1::2]) < 1e-2
        # each slot's own gradient, not a neighbour's (a permutation keeps the norm)
        assert torch.allclose(grad_weights.double(), expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("triton_kernel", [True, False])
def test_swiglu_pairs_backward_leaves_unheld_slots_at_zero(monkeypatch, triton_kernel):
    # Fewer rows than slots: a slot no row holds gets no gradient, 0 rather than memory's garbage.
    from vlmoe.moe.kernels import swiglu

    monkeypatch.setattr(swiglu, "use_triton", lambda tensor: triton_kernel)
    torch.manual_seed(3)
    preact = torch.randn(3, 64, device=DEVICE).bfloat16()
    grad_hidden = torch.randn(3, 32, device=DEVICE).bfloat16()
    slot_weights = torch.rand(7, device=DEVICE)
    sorted_slots = torch.tensor([5, 0, 2], device=DEVICE)
    _, grad_weights = swiglu.swiglu_pairs_backward(preact, grad_hidden.clone(), slot_weights, sorted_slots)
    hidden = torch.nn.functional.silu(preact[:, 0::2].double()) * preact[:, 1::2].double()
    expected = torch.zeros(7, dtype=torch.float64, device=DEVICE)
    expected[sorted_slots] = (grad_hidden.double() * hidden).sum(-1)
    assert torch.allclose(grad_weights.double(), expected, rtol=1e-5, atol=1e-6)
    assert (grad_weights[[1, 3, 4, 6]] == 0).all()


def test_plain_sum_combine_saves_nothing_and_copies_gradients_back():
    from vlmoe.moe.kernels.combine import _SumSorted, gather_sum_reference

    tokens, top_k, width = 6, 3, 1100
    torch.manual_seed(1)
    sorted_slots = torch.randperm(tokens * top_k, device=DEVICE)
    slot_rows = torch.empty_like(sorted_slots)
    slot_rows[sorted_slots] = torch.arange(tokens * top_k, device=DEVICE)
    y_sorted = torch.randn(tokens * top_k, width, device=DEVICE, requires_grad=True)
    grad = torch.randn(tokens, width, device=DEVICE)
    out = _SumSorted.apply(y_sorted, slot_rows, sorted_slots // top_k, top_k)
    expected = gather_sum_reference(y_sorted.double(), slot_rows, None, top_k)
    assert relative_error(out, expected) < 1e-6
    # Two index vectors, not y_sorted.
    assert [t.shape for t in out.grad_fn.saved_tensors] == [sorted_slots.shape] * 2
    (grad_y,) = torch.autograd.grad(out, y_sorted, grad)
    (expected_grad,) = torch.autograd.grad(expected, y_sorted, grad.double())
    assert torch.equal(grad_y.double(), expected_grad)


@pytest.mark.parametrize("top_k", [1, 2])
def test_grouped_dispatch_on_the_kernels_folds_the_weights_and_matches_the_reference(monkeypatch, top_k):
    """The CUDA path's kernels (SwiGLU with the combine weights folded in, the plain-sum combine,
    the gather's backward) run through dispatch against the float64 per-expert reference."""
    from vlmoe.moe import GLUExperts, Routing, dispatch
    from vlmoe.moe.kernels import combine, swiglu

    # The gather's backward runs combine's kernel too (combine.gather_sum).
    for module in (swiglu, combine):
        monkeypatch.setattr(module, "use_triton", lambda tensor: True)
    torch.manual_seed(top_k)
    tokens, hidden, num_experts = 11, 16, 4
    experts = GLUExperts(num_experts, hidden, 24, torch.nn.SiLU()).to(DEVICE)
    x = torch.randn(tokens, hidden, device=DEVICE, requires_grad=True)
    logits = torch.randn(tokens, num_experts, device=DEVICE, requires_grad=True)
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    routing = Routing(indices, weights, probs, logits)
    out = dispatch(x, routing, experts, backend="grouped")
    assert type(out.grad_fn).__name__ == "_SumSortedBackward"  # the folded path ran

    reference_experts = GLUExperts(num_experts, hidden, 24, torch.nn.SiLU()).double().to(DEVICE)
    reference_experts.load_state_dict(experts.state_dict())
    x64, logits64 = x.detach().double().requires_grad_(), logits.detach().double().requires_grad_()
    probs64 = logits64.softmax(-1)
    weights64 = probs64.gather(-1, indices)
    expected = dispatch(x64, Routing(indices, weights64, probs64, logits64), reference_experts, "reference")
    assert relative_error(out, expected) < 1e-5
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, logits, *experts.parameters()], grad)
    expected_grads = torch.autograd.grad(
        expected, [x64, logits64, *reference_experts.parameters()], grad.double()
    )
    for actual, wanted in zip(grads, expected_grads, strict=True):
        assert relative_error(actual, wanted) < 1e-5


@pytest.mark.parametrize(
    ("tokens", "num_experts", "top_k", "dropped"),
    [
        (70, 64, 6, False),
        (33, 5, 2, True),
        (1, 4, 1, False),
        (300, 8, 2, True),
        (20, 256, 8, False),
        (0, 4, 2, False),
    ],
)
def test_counting_sort_equals_torchs_stable_sort(tokens, num_experts, top_k, dropped):
    from vlmoe.moe.kernels.plan import sort_slots_reference, sort_slots_triton

    generator = torch.Generator().manual_seed(tokens + num_experts)
    # Skewed keys (many ties per expert, some experts empty), the sentinel where slots drop.
    keys = torch.randint(0, max(1, num_experts // 2), (tokens * top_k,), generator=generator)
    if dropped:
        keys[torch.rand(keys.shape, generator=generator) < 0.3] = num_experts
    keys = keys.to(DEVICE)
    got = sort_slots_triton(keys, num_experts, top_k, dropped)
    wanted = sort_slots_reference(keys, num_experts, top_k, dropped)
    assert got.keys() == wanted.keys()
    for name, tensor in wanted.items():
        assert got[name].dtype == tensor.dtype, name
        assert torch.equal(got[name], tensor), name


def test_counting_sort_refuses_too_many_experts():
    from vlmoe.moe.kernels.plan import sort_slots_triton

    with pytest.raises(ValueError, match="at most 256 experts"):
        sort_slots_triton(torch.zeros(4, dtype=torch.int64, device=DEVICE), 300, 1)
