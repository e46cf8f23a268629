"""The decode path (few token-slots, autograd off) against the per-expert reference.

The torch version runs in float64; the Triton kernels run here through TRITON_INTERPRET=1 in
float32 and are compared with the float64 reference.
"""

import copy

import pytest
import torch

from tests.moe.helpers import SwiGLU, relative_error
from vlmoe.moe import GLUExperts, MoEFeedForward, Routing, dispatch
from vlmoe.moe.dispatch import _auto_decodes
from vlmoe.moe.kernels import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(num_tokens, hidden, intermediate, num_experts, top_k, dtype, seed, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    experts = GLUExperts(num_experts, hidden, intermediate, torch.nn.SiLU()).to(dtype)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 0.3)
        experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * 0.3)
    # Repeated experts inside one token too (a forced expert fills every slot with it).
    indices = torch.randint(0, num_experts, (num_tokens, top_k), generator=generator)
    weights = torch.rand(num_tokens, top_k, generator=generator, dtype=torch.float32)
    probs = torch.full((num_tokens, num_experts), 1.0 / num_experts)
    routing = Routing(indices.to(device), weights.to(device), probs.to(device), probs.log().to(device))
    x = torch.randn(num_tokens, hidden, generator=generator).to(device, dtype)
    return experts.to(device), routing, x


@pytest.mark.parametrize(("tokens", "experts", "top_k"), [(1, 4, 2), (3, 8, 2), (2, 16, 6), (5, 1, 1)])
def test_decode_backend_equals_reference_in_float64(tokens, experts, top_k):
    moe, routing, x = _case(tokens, 12, 20, experts, top_k, torch.float64, seed=tokens * experts)
    with torch.no_grad():
        out = dispatch(x, routing, moe, backend="decode")
        expected = dispatch(x, routing, moe, backend="reference")
    assert out.shape == expected.shape == (tokens, 12)
    assert relative_error(out, expected) < 1e-12


def test_decode_backend_refuses_autograd_and_other_experts():
    moe, routing, x = _case(1, 8, 8, 4, 2, torch.float64, seed=0)
    with pytest.raises(ValueError, match="no backward"):
        dispatch(x, routing, moe, backend="decode")
    from vlmoe.moe import LoRAExperts

    with torch.no_grad(), pytest.raises(ValueError, match="GLUExperts"):
        dispatch(x, routing, LoRAExperts(4, 8, 8, rank=2, alpha=4.0).double(), backend="decode")


def test_auto_decodes_only_small_no_grad_dropless_steps():
    moe, routing, x = _case(8, 8, 8, 4, 2, torch.float64, seed=0)
    with torch.no_grad():
        assert _auto_decodes(x, routing, moe)  # 16 slots
        big, big_routing, big_x = _case(9, 8, 8, 4, 2, torch.float64, seed=0)
        assert not _auto_decodes(big_x, big_routing, big)  # 18 slots
        kept = torch.ones_like(routing.expert_indices, dtype=torch.bool)
        from dataclasses import replace

        assert not _auto_decodes(x, replace(routing, kept=kept), moe)
    assert not _auto_decodes(x, routing, moe)  # autograd on


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "experts", "top_k"),
    [(1, 40, 24, 4, 2), (3, 300, 530, 8, 2), (2, 24, 17, 3, 3), (1, 16, 16, 1, 1)],
)
def test_decode_kernels_equal_float64_reference(tokens, hidden, intermediate, experts, top_k):
    """Ragged sizes (not multiples of the blocks) exercise every mask; output poisoned first."""
    from vlmoe.moe.kernels.decode import glu_decode_reference, glu_decode_triton

    moe, routing, x = _case(
        tokens, hidden, intermediate, experts, top_k, torch.float32, seed=hidden, device=DEVICE
    )
    args = (
        moe.gate_up_proj.detach(),
        moe.down_proj.detach(),
        routing.expert_indices,
        routing.combine_weights,
    )
    out = glu_decode_triton(x, *args)
    assert out.shape == (tokens, hidden) and torch.isfinite(out).all()
    expected = glu_decode_reference(x.double(), *(a.double() if a.is_floating_point() else a for a in args))
    assert relative_error(out, expected) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "num_experts", "top_k"), [(1, 4, 2), (8, 8, 2), (2, 16, 6)])
def test_auto_decode_on_cuda_bf16_matches_float64_and_grouped(batch, num_experts, top_k):
    from dataclasses import replace

    from vlmoe.moe import record_routing

    torch.manual_seed(batch)
    moe = MoEFeedForward.from_dense(SwiGLU(256, 512), num_experts, top_k)
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.1)
    experts64 = copy.deepcopy(moe.experts).double()
    moe = moe.cuda().bfloat16()
    x = torch.randn(batch, 1, 256).cuda().bfloat16()
    with torch.no_grad(), record_routing(moe):
        fast = moe(x)  # auto: the decode kernels
        routing = moe.last_routing
        moe.backend = "grouped"
        grouped = moe(x)
        # The float64 reference on the same routing (a near-tie could flip in another precision).
        cpu = {
            name: getattr(routing, name).cpu() for name in ("expert_indices", "router_probs", "router_logits")
        }
        routing64 = replace(routing, **cpu, combine_weights=routing.combine_weights.cpu().double())
        expected = dispatch(x.view(batch, 256).cpu().double(), routing64, experts64, backend="reference")
    assert relative_error(fast.view(batch, 256).cpu(), expected) < 1e-2
    assert relative_error(fast.float(), grouped.float()) < 1e-2


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "experts", "top_k", "bias", "normalize", "temperature"),
    [
        (1, 40, 24, 4, 2, False, True, 1.0),
        (3, 300, 530, 6, 2, True, True, 0.5),  # ragged sizes, E not a power of two
        (2, 24, 17, 3, 3, False, False, 1.0),  # k = E
        (1, 16, 16, 1, 1, False, False, 2.0),
    ],
)
def test_routed_decode_kernels_equal_route_then_decode_in_float64(
    tokens, hidden, intermediate, experts, top_k, bias, normalize, temperature
):
    """The fused first kernel routes each token itself: its routing must be route_reference's and
    its output the decode of that routing."""
    from vlmoe.moe.kernels.decode import glu_decode_reference, glu_decode_routed_triton
    from vlmoe.moe.kernels.routing import route_reference

    moe, _, x = _case(tokens, hidden, intermediate, experts, top_k, torch.float32, seed=hidden, device=DEVICE)
    generator = torch.Generator().manual_seed(tokens)
    gate = torch.randn(experts, hidden, generator=generator).to(DEVICE)
    gate_bias = torch.randn(experts, generator=generator).to(DEVICE) if bias else None
    weights = (moe.gate_up_proj.detach(), moe.down_proj.detach())
    out, routing = glu_decode_routed_triton(x, gate, gate_bias, *weights, top_k, temperature, normalize)
    expected_routing = route_reference(
        x.double(),
        gate.double(),
        None if gate_bias is None else gate_bias.double(),
        top_k,
        temperature,
        normalize,
    )
    assert torch.equal(routing[2], expected_routing[2])  # random logits: no ties
    for index in (0, 1, 3):
        assert relative_error(routing[index], expected_routing[index]) < 1e-5
    expected = glu_decode_reference(
        x.double(), *(w.double() for w in weights), expected_routing[2], expected_routing[3]
    )
    assert out.shape == (tokens, hidden) and relative_error(out, expected) < 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_layer_routes_inside_the_decode_kernel_when_decoding(monkeypatch):
    """With the kernels available (here: the interpreter on CPU), a decoding step of an MoE layer
    takes the fused path: no separate routing launch, the reference's output, a full record."""
    import vlmoe.moe.experts as experts_module
    import vlmoe.moe.router as router_module
    from vlmoe.moe import record_routing

    torch.manual_seed(0)
    moe = MoEFeedForward.from_dense(SwiGLU(32, 48), num_experts=4, top_k=2)
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_(std=0.3)
    reference = copy.deepcopy(moe)
    reference.backend = "reference"
    x = torch.randn(2, 1, 32)
    with torch.no_grad():  # before the kernels are switched on: the torch router and experts
        expected = reference(x)
        torch_routing = reference.router(x.view(2, 32))

    monkeypatch.setattr(experts_module, "use_triton", lambda tensor: True)
    monkeypatch.setattr(router_module, "use_triton", lambda tensor: True)

    def no_routing_launch(*args, **kwargs):
        raise AssertionError("the routing kernel was launched")

    monkeypatch.setattr(router_module, "route_triton", no_routing_launch)
    with torch.no_grad(), record_routing(moe):
        out = moe(x)
    assert relative_error(out, expected) < 1e-5
    assert torch.equal(moe.last_routing.expert_indices, torch_routing.expert_indices)
    assert relative_error(moe.last_routing.combine_weights, torch_routing.combine_weights) < 1e-5
    assert relative_error(moe.last_routing.router_probs, torch_routing.router_probs) < 1e-5
    assert moe.last_aux_losses == {}
    # More slots than the decode path takes (18 > 16): the router's own kernel, then dispatch.
    with torch.no_grad(), pytest.raises(AssertionError, match="routing kernel was launched"):
        moe(torch.randn(9, 1, 32))
