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
