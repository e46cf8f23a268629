"""Every dispatch backend against a per-token reference, forward and backward, in float64."""

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from tests.moe.helpers import relative_error
from vlmoe.moe import GLUExperts, LoRAExperts, MLPExperts, Routing, dispatch, plan_dispatch
from vlmoe.moe.dispatch import grouped_linear, segment_linear
from vlmoe.moe.experts import _LoopGatedForward
from vlmoe.moe.kernels import HAS_TRITON


def _experts(kind: str, num_experts: int, size: int = 6, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "glu":
        experts = GLUExperts(num_experts, size, 5, torch.nn.SiLU())
    elif kind == "mlp":
        experts = MLPExperts(num_experts, size, 5, 7, torch.nn.GELU())
    else:
        experts = LoRAExperts(num_experts, size, 7, rank=3, alpha=6.0)
    experts = experts.double()
    with torch.no_grad():
        for parameter in experts.parameters():
            parameter.normal_()
    return experts


def _routing(indices: torch.Tensor, weights: torch.Tensor, num_experts: int, kept=None) -> Routing:
    probs = torch.full((indices.shape[0], num_experts), 1.0 / num_experts, dtype=torch.float64)
    return Routing(indices, weights, probs, probs.log(), kept=kept)


def _per_token_reference(x, indices, weights, experts, kept=None):
    """The definition: each token, each of its chosen experts, one at a time."""
    rows = []
    for t in range(x.shape[0]):
        total = 0
        for j in range(indices.shape[1]):
            if kept is not None and not kept[t, j]:
                continue
            total = total + weights[t, j] * experts.expert_forward(int(indices[t, j]), x[t : t + 1])[0]
        rows.append(
            total if torch.is_tensor(total) else x.new_zeros(experts.expert_forward(0, x[:1]).shape[-1])
        )
    return torch.stack(rows)


def _random_routing(num_tokens, num_experts, top_k, seed):
    generator = torch.Generator().manual_seed(seed)
    indices = torch.stack(
        [torch.randperm(num_experts, generator=generator)[:top_k] for _ in range(num_tokens)]
    )
    weights = torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float64)
    return indices.reshape(num_tokens, top_k), weights


CASES = [
    # (tokens, experts, top_k)
    (13, 4, 2),
    (9, 5, 1),
    (7, 3, 3),  # k = E
    (8, 1, 1),  # E = 1
    (1, 4, 2),
]


@pytest.mark.parametrize("kind", ["glu", "mlp", "lora"])
@pytest.mark.parametrize(("num_tokens", "num_experts", "top_k"), CASES)
@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_backends_equal_per_token_reference_forward_and_backward(
    kind, num_tokens, num_experts, top_k, backend
):
    experts = _experts(kind, num_experts)
    indices, weights = _random_routing(num_tokens, num_experts, top_k, seed=num_tokens)
    x = torch.randn(num_tokens, 6, dtype=torch.float64, requires_grad=True)
    weights.requires_grad_(True)

    out = dispatch(x, _routing(indices, weights, num_experts), experts, backend=backend)
    expected = _per_token_reference(x, indices, weights, experts)
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-12

    grad_out = torch.randn_like(out)
    params = [x, weights, *experts.parameters()]
    grads = torch.autograd.grad(out, params, grad_out, allow_unused=True)
    expected_grads = torch.autograd.grad(expected, params, grad_out, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        if expected_grad is None:
            assert grad is None or torch.all(grad == 0)
        else:
            assert relative_error(grad, expected_grad) < 1e-12


@pytest.mark.parametrize("folds", [False, True])
@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_gradcheck(backend, folds):
    experts = _experts("glu", 3, size=4)
    indices, weights = _random_routing(5, 3, 2, seed=1)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    weights.requires_grad_(True)
    functional = _FoldingFunctional if folds else _Functional

    def fn(x, weights, gate_up, down):
        return dispatch(x, _routing(indices, weights, 3), functional(experts, gate_up, down), backend=backend)

    gate_up = experts.gate_up_proj.detach().clone().requires_grad_(True)
    down = experts.down_proj.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (x, weights, gate_up, down))


class _Functional(_LoopGatedForward):
    """GLU experts over given weight tensors, so gradcheck can perturb them."""

    def __init__(self, experts, gate_up, down):
        self.num_experts = experts.num_experts
        self.gate_up, self.down = gate_up, down

    def __call__(self, x_sorted, plan):
        gate, up = grouped_linear(x_sorted, self.gate_up, plan).chunk(2, -1)
        return grouped_linear(F.silu(gate) * up, self.down, plan)

    def expert_forward(self, e, x):
        gate, up = (x @ self.gate_up[e].t()).chunk(2, -1)
        return (F.silu(gate) * up) @ self.down[e].t()


class _FoldingFunctional(_Functional):
    """The same experts taking the combine weights inside (what GLUExperts does on its SwiGLU)."""

    def folds_row_weights(self):
        return True

    def __call__(self, x_sorted, plan, row_weights):
        gate, up = grouped_linear(x_sorted, self.gate_up, plan).chunk(2, -1)
        return grouped_linear(F.silu(gate) * up * row_weights.unsqueeze(-1), self.down, plan)


@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_edge_cases(backend):
    experts = _experts("glu", 4)
    # An expert with no tokens, and every token to one expert.
    for indices in (torch.tensor([[0, 1], [1, 0], [0, 1]]), torch.tensor([[2, 2], [2, 2]])):
        weights = torch.rand(indices.shape, dtype=torch.float64)
        x = torch.randn(indices.shape[0], 6, dtype=torch.float64)
        out = dispatch(x, _routing(indices, weights, 4), experts, backend=backend)
        assert relative_error(out, _per_token_reference(x, indices, weights, experts)) < 1e-12
    # Zero tokens.
    empty = torch.zeros(0, 2, dtype=torch.long)
    out = dispatch(
        torch.zeros(0, 6, dtype=torch.float64), _routing(empty, empty.double(), 4), experts, backend
    )
    assert out.shape == (0, 6)


@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_dropped_slots_contribute_nothing(backend):
    experts = _experts("mlp", 3)
    indices, weights = _random_routing(10, 3, 2, seed=3)
    kept = torch.rand(10, 2, generator=torch.Generator().manual_seed(0)) > 0.4
    x = torch.randn(10, 6, dtype=torch.float64, requires_grad=True)
    out = dispatch(x, _routing(indices, weights, 3, kept=kept), experts, backend=backend)
    expected = _per_token_reference(x, indices, weights, experts, kept=kept)
    assert relative_error(out, expected) < 1e-12
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    assert relative_error(grad, expected_grad) < 1e-12
    fully_dropped = ~kept.any(-1)
    assert torch.all(out[fully_dropped] == 0) and torch.all(grad[fully_dropped] == 0)


def test_plan_is_a_stable_sort_with_inverse():
    indices = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = plan_dispatch(_routing(indices, torch.ones(3, 2, dtype=torch.float64), 3))
    assert plan.tokens_per_expert.tolist() == [2, 2, 2]
    assert plan.offsets.tolist() == [2, 4, 6]
    assert plan.sorted_slots.tolist() == [1, 2, 3, 5, 0, 4]  # slot = token * K + choice
    assert torch.equal(plan.sorted_slots[plan.slot_rows], torch.arange(6))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="CPU tensors via Triton's interpreter; on a GPU the CUDA dispatch tests plan with these kernels",
)
@pytest.mark.parametrize("with_drops", [False, True])
def test_plan_from_the_counting_sort_kernels_equals_the_torch_plan(monkeypatch, with_drops):
    # On CUDA plan_dispatch sorts with two Triton kernels (here the interpreter stands in).
    dispatch_module = importlib.import_module("vlmoe.moe.dispatch")

    indices, weights = _random_routing(50, 6, 2, seed=7)
    kept = torch.rand(50, 2, generator=torch.Generator().manual_seed(1)) > 0.25 if with_drops else None
    routing = _routing(indices, weights, 6, kept=kept)
    wanted = plan_dispatch(routing)
    monkeypatch.setattr(dispatch_module, "use_triton", lambda tensor: True)
    got = plan_dispatch(routing)
    for name in ("sorted_slots", "slot_rows", "row_experts", "tokens_per_expert", "offsets", "sorted_tokens",
                 "segment_bounds"):  # fmt: skip
        assert torch.equal(getattr(got, name), getattr(wanted, name)), name
    assert (got.row_valid is None) == (not with_drops)
    if with_drops:
        assert torch.equal(got.row_valid, wanted.row_valid)
        assert int(got.tokens_per_expert.sum()) == int(kept.sum())


def test_cpu_grouped_mm_agrees_with_the_segment_loop():
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None:
        pytest.skip("this torch has no torch.nn.functional.grouped_mm")
    indices, weights = _random_routing(40, 4, 2, seed=5)
    plan = plan_dispatch(_routing(indices, weights, 4))
    x = torch.randn(80, 16)
    weight = torch.randn(4, 24, 16)
    expected = grouped_linear(x, weight, plan)  # segment loop on CPU
    actual = grouped_mm(x, weight.transpose(-2, -1), offs=plan.offsets)
    assert relative_error(actual, expected) < 1e-5


def test_segment_linear_gradcheck_with_empty_segments_and_dropped_tail():
    # Expert 1 gets no rows and the last two rows are dropped slots: both must read as zeros.
    counts = [3, 0, 2]
    x = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: segment_linear(a, w, counts), (x, weight))
    out = segment_linear(x, weight, counts)
    assert torch.equal(out[5:], torch.zeros(2, 5, dtype=torch.float64))
    expected = torch.cat([x[:3] @ weight[0].t(), x[3:5] @ weight[2].t()])
    assert relative_error(out[:5], expected) < 1e-14
    out.sum().backward()
    assert torch.equal(weight.grad[1], torch.zeros(5, 4, dtype=torch.float64))


def test_segment_linear_follows_autocast_and_checks_counts():
    x, weight = torch.randn(6, 8), torch.randn(2, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = segment_linear(x, weight, [4, 2])
    assert out.dtype == torch.bfloat16
    expected = torch.cat([x[:4] @ weight[0].t(), x[4:] @ weight[1].t()])
    assert relative_error(out.float(), expected) < 2e-2
    with pytest.raises(ValueError, match="3 counts for 2 experts"):
        segment_linear(x, weight, [2, 2, 2])


@pytest.mark.parametrize("capacity", [False, True])
@pytest.mark.parametrize("kind", ["glu", "mlp"])
@pytest.mark.parametrize("backend", ["grouped", "segments"])
def test_gathered_rows_are_not_kept_but_gathered_again_in_backward(monkeypatch, kind, backend, capacity):
    import gc
    import weakref

    dispatch_module = importlib.import_module("vlmoe.moe.dispatch")
    experts = _experts(kind, 4)
    indices, weights = _random_routing(9, 4, 2, seed=3)
    kept = torch.rand(9, 2, generator=torch.Generator().manual_seed(0)) > 0.3 if capacity else None
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(9, 7 if kind != "glu" else 6, dtype=torch.float64)
    gathered = []
    gather_rows = dispatch_module._gather_rows

    def remember(*args):
        rows = gather_rows(*args)
        gathered.append(weakref.ref(rows))
        return rows

    monkeypatch.setattr(dispatch_module, "_gather_rows", remember)
    out = dispatch(x, _routing(indices, weights, 4, kept=kept), experts, backend=backend)
    gc.collect()
    assert len(gathered) == 1 and gathered[0]() is None  # nothing holds the gathered rows
    grads = torch.autograd.grad(out, [x, *experts.parameters()], grad_out)
    assert len(gathered) == 2  # gathered again for the weight gradient

    monkeypatch.setattr(experts, "gathers_token_rows", False)  # gather first, as other containers do
    out_before = dispatch(x, _routing(indices, weights, 4, kept=kept), experts, backend=backend)
    assert torch.equal(out, out_before)
    expected = torch.autograd.grad(out_before, [x, *experts.parameters()], grad_out)
    for grad, wanted in zip(grads, expected, strict=True):
        assert relative_error(grad, wanted) < 1e-14


def test_gathered_linear_under_checkpointing_and_with_a_modified_input():
    experts = _experts("glu", 4)
    indices, weights = _random_routing(9, 4, 2, seed=4)
    routing = _routing(indices, weights, 4)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)

    def layer(inputs):
        return dispatch(inputs, routing, experts, backend="grouped")

    checkpointed = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
    grad = torch.autograd.grad(checkpointed.sum(), x)[0]
    assert torch.equal(grad, torch.autograd.grad(layer(x).sum(), x)[0])

    hidden = x * 1.0
    out = layer(hidden)
    with torch.no_grad():
        hidden.add_(1.0)  # the backward would gather the changed rows: autograd refuses
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_gathered_linear_gradcheck_with_bias_empty_experts_and_dropped_rows():
    from vlmoe.moe.dispatch import gathered_linear

    indices = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 2]])
    kept = torch.tensor([[True, True], [True, False], [False, True], [True, True]])
    plan = plan_dispatch(_routing(indices, torch.rand(4, 2, dtype=torch.float64), 3, kept=kept))
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 6, 5, dtype=torch.float64, requires_grad=True)  # expert 1 gets no rows
    bias = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: gathered_linear(*t[:2], plan, t[2]), (x, weight, bias))
    expected = grouped_linear(plan.gather(x), weight, plan, bias)
    assert torch.equal(gathered_linear(x, weight, plan, bias), expected)
