"""The one-launch routing kernel against the torch router (on CPU through TRITON_INTERPRET=1)."""

import pytest
import torch

from tests.moe.helpers import relative_error
from vlmoe.moe import Router, RouterConfig
from vlmoe.moe.kernels import HAS_TRITON
from vlmoe.moe.kernels.routing import route_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("normalize", [False, True])
def test_route_reference_is_the_routers_function(normalize):
    torch.manual_seed(0)
    router = Router(12, RouterConfig(num_experts=5, top_k=2, normalize_top_k=normalize, temperature=0.7))
    router = router.double()
    x = torch.randn(9, 12, dtype=torch.float64)
    with torch.no_grad():
        routing = router(x)
        logits, probs, indices, weights = route_reference(x, router.gate.weight, None, 2, 0.7, normalize)
    assert torch.equal(indices, routing.expert_indices)
    for actual, expected in ((logits, routing.router_logits), (probs, routing.router_probs)):
        assert relative_error(actual, expected) < 1e-12
    assert relative_error(weights, routing.combine_weights) < 1e-12


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("tokens", "hidden", "experts", "top_k", "bias", "normalize", "temperature"),
    [
        (1, 64, 4, 2, False, True, 1.0),
        (5, 300, 6, 2, True, True, 0.5),  # ragged sizes, E not a power of two
        (3, 40, 64, 6, False, True, 1.0),
        (4, 17, 3, 1, False, False, 2.0),
        (2, 8, 3, 3, False, False, 1.0),  # k = E
    ],
)
def test_route_kernel_equals_reference(tokens, hidden, experts, top_k, bias, normalize, temperature):
    from vlmoe.moe.kernels.routing import route_triton

    generator = torch.Generator().manual_seed(tokens * hidden)
    x = torch.randn(tokens, hidden, generator=generator).to(DEVICE)
    weight = torch.randn(experts, hidden, generator=generator).to(DEVICE)
    gate_bias = torch.randn(experts, generator=generator).to(DEVICE) if bias else None
    args = (top_k, temperature, normalize)
    logits, probs, indices, weights = route_triton(x, weight, gate_bias, *args)
    expected = route_reference(
        x.double(), weight.double(), None if gate_bias is None else gate_bias.double(), *args
    )
    assert torch.equal(indices, expected[2])  # random logits: no ties
    for actual, wanted in zip((logits, probs, weights), (expected[0], expected[1], expected[3]), strict=True):
        assert actual.dtype == torch.float32
        assert relative_error(actual, wanted) < 1e-5


@pytest.mark.gpu
def test_router_takes_the_fused_kernel_on_cuda_without_autograd():
    torch.manual_seed(0)
    router = Router(256, RouterConfig(num_experts=8, top_k=2)).cuda().bfloat16()
    with torch.no_grad():
        router.gate.weight.normal_(std=0.1)
    x = torch.randn(16, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert router._fused_routing_applies(x)
        fused = router(x)
    torch_path = router(x)  # autograd on: the torch router
    assert relative_error(fused.router_logits, torch_path.router_logits.detach()) < 1e-2
    assert relative_error(fused.router_probs, torch_path.router_probs.detach()) < 1e-2
    same = (fused.expert_indices == torch_path.expert_indices).all(dim=-1)
    assert same.float().mean() > 0.9  # bf16 logits: only near-ties may differ
    assert relative_error(fused.combine_weights[same], torch_path.combine_weights.detach()[same]) < 1e-2


def test_which_routings_replay_and_which_take_the_one_kernel_routing(monkeypatch):
    """routing_replays: a function of x, the parameters (and cluster ids) only. The one-kernel routing also
    needs a small gate: past FUSED_ROUTING_MAX_GATE the gate's matmul and topk_softmax run."""
    from vlmoe.moe import router as router_module

    monkeypatch.setattr(router_module, "use_triton", lambda tensor: True)  # as on CUDA
    small = Router(2048, RouterConfig(num_experts=4, top_k=2))
    wide = Router(2048, RouterConfig(num_experts=64, top_k=6))
    x = torch.zeros(3, 2048)
    assert not small.routing_replays()  # autograd on
    with torch.no_grad():
        assert small.routing_replays() and wide.routing_replays()
        assert small._fused_routing_applies(x) and not wide._fused_routing_applies(x)
        assert not small._fused_routing_applies(torch.zeros(router_module.FUSED_ROUTING_MAX_TOKENS + 1, 2048))
        for change in ({"capacity_factor": 1.0, "top_k": 2}, {"straight_through": True, "top_k": 1}):
            router = Router(2048, RouterConfig(num_experts=4, **change))
            assert not router.routing_replays(), change
        small.forced_expert = 0
        assert not small.routing_replays()
        jittery = Router(2048, RouterConfig(num_experts=4, top_k=2, jitter_noise=0.1))
        assert jittery.eval().routing_replays() and not jittery.train().routing_replays()
        # Routing by cluster replays (the ids are a second input of the graph), never in one kernel.
        clustered = Router(2048, RouterConfig(num_experts=4, top_k=1, input="cluster", num_clusters=8))
        assert clustered.routing_replays() and not clustered._fused_routing_applies(x)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "normalize", "temperature"),
    [
        (70, 64, 6, True, 1.0),  # a ragged last block
        (9, 5, 2, True, 0.7),  # E not a power of two
        (33, 4, 1, False, 1.0),
        (6, 3, 3, True, 2.0),  # k = E
        (5, 256, 8, False, 1.0),
    ],
)
def test_topk_softmax_kernels_equal_the_float64_reference_with_gradients(
    tokens, experts, top_k, normalize, temperature
):
    from vlmoe.moe.kernels.routing import topk_softmax, topk_softmax_reference

    generator = torch.Generator().manual_seed(tokens * experts + top_k)
    logits = torch.randn(tokens, experts, generator=generator).to(DEVICE).requires_grad_()
    logits64 = logits.detach().double().requires_grad_()
    probs, weights, indices, counts = topk_softmax(logits, top_k, temperature, normalize)
    ref_probs, ref_weights, ref_indices, ref_counts = topk_softmax_reference(
        logits64, top_k, temperature, normalize
    )
    assert torch.equal(indices, ref_indices)  # random logits: no ties
    assert counts.dtype == torch.int64 and torch.equal(counts, ref_counts)
    assert counts.sum() == tokens * top_k
    assert probs.dtype == weights.dtype == torch.float32
    assert relative_error(probs, ref_probs) < 1e-6
    assert relative_error(weights, ref_weights) < 1e-6

    grad_probs = torch.randn(tokens, experts, generator=generator).to(DEVICE)
    grad_weights = torch.randn(tokens, top_k, generator=generator).to(DEVICE)
    # Both outputs carry a gradient (the combine and the balance loss), then each alone.
    for outputs, grads, ref_outputs in (
        ((probs, weights), (grad_probs, grad_weights), (ref_probs, ref_weights)),
        ((weights,), (grad_weights,), (ref_weights,)),
        ((probs,), (grad_probs,), (ref_probs,)),
    ):
        (grad,) = torch.autograd.grad(outputs, [logits], grads, retain_graph=True)
        (ref_grad,) = torch.autograd.grad(
            ref_outputs, [logits64], [g.double() for g in grads], retain_graph=True
        )
        assert grad.dtype == torch.float32
        assert relative_error(grad, ref_grad) < 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_topk_softmax_of_no_tokens_is_empty_with_zero_counts():
    from vlmoe.moe.kernels.routing import topk_softmax

    logits = torch.empty(0, 8, device=DEVICE, requires_grad=True)
    probs, weights, indices, counts = topk_softmax(logits, 2)
    assert probs.shape == (0, 8) and weights.shape == indices.shape == (0, 2)
    assert counts.tolist() == [0] * 8
    (probs.sum() + weights.sum()).backward()
    assert logits.grad.shape == (0, 8)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("straight_through", [False, True])
def test_router_in_training_takes_the_fused_topk_and_matches_the_torch_router(monkeypatch, straight_through):
    """On CUDA (here the interpreter stands in) the training router's softmax, top-k and counts
    come from topk_softmax: the same routing, balance and z losses and gradients as the torch
    chain, and dispatch's plan reuses the counts."""
    from vlmoe.moe import router as router_module
    from vlmoe.moe.dispatch import plan_dispatch

    top_k = 1 if straight_through else 2
    config = RouterConfig(
        num_experts=6, top_k=top_k, temperature=0.8, load_balance_coef=0.01, z_loss_coef=0.001,
        straight_through=straight_through,
    )  # fmt: skip
    torch.manual_seed(3)
    router = Router(16, config).to(DEVICE)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)
    x = torch.randn(40, 16, device=DEVICE, requires_grad=True)
    monkeypatch.setattr(router_module, "FUSED_TOPK", False)
    plain = router(x)
    assert plain.expert_counts is None  # the torch chain
    monkeypatch.setattr(router_module, "FUSED_TOPK", True)
    monkeypatch.setattr(router_module, "use_triton", lambda tensor: True)  # CPU: the interpreter
    fused = router(x)
    assert fused.expert_counts is not None
    assert torch.equal(fused.expert_indices, plain.expert_indices)
    assert torch.equal(fused.tokens_per_expert(), plain.tokens_per_expert())
    for name in ("combine_weights", "router_probs"):
        assert relative_error(getattr(fused, name), getattr(plain, name)) < 1e-6
    assert set(fused.aux_losses) == set(plain.aux_losses) == {"load_balance", "z_loss"}
    for name, loss in plain.aux_losses.items():
        assert relative_error(fused.aux_losses[name], loss) < 1e-6

    def total(routing):
        weights = torch.linspace(-1, 1, routing.combine_weights.numel(), device=DEVICE)
        return (routing.combine_weights.reshape(-1) * weights).sum() + sum(routing.aux_losses.values())

    grads = torch.autograd.grad(total(fused), [x, router.gate.weight])
    plain_grads = torch.autograd.grad(total(plain), [x, router.gate.weight])
    for actual, wanted in zip(grads, plain_grads, strict=True):
        assert relative_error(actual, wanted) < 1e-5

    fused_plan, plain_plan = plan_dispatch(fused), plan_dispatch(plain)
    for name in ("sorted_slots", "slot_rows", "tokens_per_expert", "offsets", "segment_bounds"):
        assert torch.equal(getattr(fused_plan, name), getattr(plain_plan, name)), name
