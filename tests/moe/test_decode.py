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
    moe, routing, _ = _case(8, 8, 8, 4, 2, torch.float64, seed=0)
    with torch.no_grad():
        assert _auto_decodes(moe, routing.expert_indices.numel(), dropping=False)  # 16 slots
        big, big_routing, _ = _case(9, 8, 8, 4, 2, torch.float64, seed=0)
        assert not _auto_decodes(big, big_routing.expert_indices.numel(), dropping=False)  # 18 slots
        assert not _auto_decodes(moe, routing.expert_indices.numel(), dropping=True)  # capacity
    assert not _auto_decodes(moe, routing.expert_indices.numel(), dropping=False)  # autograd on


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
