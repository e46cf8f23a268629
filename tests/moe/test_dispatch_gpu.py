"""The CUDA fast paths (grouped_mm and per-expert cuBLAS in bf16, dense LoRA) against the float64
reference."""

import pytest
import torch
from torch import nn

from tests.moe.helpers import SwiGLU, randomize_, relative_error
from vlmoe.moe import MoEFeedForward, MoLELinear, record_routing

pytestmark = pytest.mark.gpu


def _grads(module, x, grad_out):
    out = module(x)
    return out, torch.autograd.grad(out, [x, *module.experts.parameters()], grad_out)


@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "num_experts", "top_k", "capacity"),
    [
        (512, 64, 96, 4, 2, None),
        (300, 128, 64, 8, 2, None),
        (257, 64, 128, 16, 6, None),
        (64, 64, 64, 1, 1, None),
        (3, 64, 64, 8, 2, None),  # most experts get no token
        (256, 64, 96, 4, 2, 1.0),  # token dropping
    ],
)
@pytest.mark.parametrize("backend", ["grouped", "segments"])
def test_grouped_bf16_matches_float64_reference(
    tokens, hidden, intermediate, num_experts, top_k, capacity, backend
):
    torch.manual_seed(tokens)
    dense = SwiGLU(hidden, intermediate)
    moe = MoEFeedForward.from_dense(dense, num_experts, top_k, capacity_factor=capacity, backend=backend)
    randomize_(moe, seed=tokens, std=0.1)
    reference = MoEFeedForward.from_dense(
        dense, num_experts, top_k, capacity_factor=capacity, backend="reference"
    )
    reference.load_state_dict(moe.state_dict())
    moe = moe.cuda().bfloat16()
    reference = reference.double()

    x = torch.randn(tokens, hidden)
    grad_out = torch.randn(tokens, hidden)
    # Route once in float64 and give both paths that fixed decision: the comparison is of the
    # dispatch and experts, and the input gradient then excludes the router's path.
    with record_routing(reference), torch.no_grad():
        reference(x.double())
    routing = reference.last_routing
    reference.router.forward = lambda *args, **kwargs: routing
    moe.router.forward = lambda *args, **kwargs: _to_cuda(routing)
    ref_out, ref_grads = _grads(reference, x.double().requires_grad_(), grad_out.double())
    out, grads = _grads(moe, x.cuda().bfloat16().requires_grad_(), grad_out.cuda().bfloat16())
    assert not out.float().isnan().any()
    assert relative_error(out.cpu(), ref_out) < 2e-2
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad.cpu(), ref_grad) < 2e-2


@pytest.mark.parametrize(("fold", "gather_inside"), [(True, True), (False, False), (True, False)])
def test_grouped_bf16_combine_weight_gradients_with_and_without_v14(fold, gather_inside, monkeypatch):
    """The combine weights applied in the SwiGLU kernel and the rows gathered inside the first
    matmul (NOTES.md v14), each against the float64 reference, gradients of the weights included."""
    from vlmoe.moe import GLUExperts, Routing, dispatch

    torch.manual_seed(0)
    tokens, hidden, num_experts, top_k = 384, 64, 8, 2
    experts = GLUExperts(num_experts, hidden, 96, nn.SiLU())
    randomize_(experts, seed=1, std=0.1)
    reference = GLUExperts(num_experts, hidden, 96, nn.SiLU()).double()
    reference.load_state_dict(experts.state_dict())
    experts = experts.cuda().bfloat16()
    if not fold:
        monkeypatch.setattr(experts, "folds_row_weights", lambda: False)
    monkeypatch.setattr(experts, "gathers_token_rows", gather_inside)
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    grad_out = torch.randn(tokens, hidden, dtype=torch.float64)

    def run(module, dtype, device, backend):
        inputs = x.to(device, dtype).requires_grad_()
        w = (
            weights.to(device).float().requires_grad_()
            if dtype != torch.float64
            else weights.clone().requires_grad_()
        )
        routing = Routing(indices.to(device), w, probs.to(device), logits.to(device))
        out = dispatch(inputs, routing, module, backend=backend)
        grads = torch.autograd.grad(out, [inputs, w, *module.parameters()], grad_out.to(device, dtype))
        return [out, *grads]

    for actual, wanted in zip(
        run(experts, torch.bfloat16, "cuda", "grouped"),
        run(reference, torch.float64, "cpu", "reference"),
        strict=True,
    ):
        assert relative_error(actual.cpu(), wanted) < 2e-2


def _to_cuda(routing):
    from dataclasses import replace

    moved = {
        name: getattr(routing, name).cuda()
        for name in ("expert_indices", "combine_weights", "router_probs", "router_logits")
    }
    kept = None if routing.kept is None else routing.kept.cuda()
    return replace(routing, **moved, kept=kept, aux_losses={})


@pytest.mark.parametrize("backend", ["grouped", "dense"])
def test_mole_cuda_backends_match_reference(backend):
    torch.manual_seed(0)
    base = nn.Linear(128, 192)
    mole = MoLELinear(base, num_experts=4, rank=16, alpha=32, top_k=1, backend=backend)
    randomize_(mole.experts, seed=1, std=0.1)
    reference = MoLELinear(
        nn.Linear(128, 192), num_experts=4, rank=16, alpha=32, top_k=1, backend="reference"
    )
    reference.load_state_dict(mole.state_dict())
    x = torch.randn(1000, 128)
    expected = reference.double()(x.double())
    actual = mole.cuda().bfloat16()(x.cuda().bfloat16())
    assert relative_error(actual.cpu(), expected) < 2e-2
