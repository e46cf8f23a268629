"""The decode path (few token-slots, autograd off) against the per-expert reference.

The torch version runs in float64; the Triton kernels run here through TRITON_INTERPRET=1 in
float32 and are compared with the float64 reference.
"""

import copy
from unittest.mock import patch

import pytest
import torch

from tests.moe.helpers import SwiGLU, relative_error
from vlmoe.moe import GLUExperts, MoEFeedForward, Routing, dispatch
from vlmoe.moe.dispatch import DECODE_MAX_TOKENS, _auto_decodes, chosen_backend
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
    moe = _case(1, 8, 8, 4, 2, torch.float64, seed=0)[0]
    with torch.no_grad():
        assert _auto_decodes(moe, DECODE_MAX_TOKENS, dropping=False)
        assert not _auto_decodes(moe, DECODE_MAX_TOKENS + 1, dropping=False)
        assert not _auto_decodes(moe, 1, dropping=True)  # capacity
    assert not _auto_decodes(moe, 1, dropping=False)  # autograd on


def test_chosen_backend_counts_tokens_of_any_shape():
    moe = _case(1, 8, 8, 4, 2, torch.float64, seed=0)[0]
    with torch.no_grad(), patch("vlmoe.moe.dispatch.resolve_backend", return_value="grouped"):
        assert chosen_backend("auto", torch.zeros(DECODE_MAX_TOKENS, 1, 8), moe) == "decode"
        assert chosen_backend("auto", torch.zeros(2, DECODE_MAX_TOKENS, 8), moe) == "grouped"
        assert chosen_backend("grouped", torch.zeros(1, 8), moe) == "grouped"  # asked for


def _kernel_args(moe, routing):
    """glu_decode_triton's arguments after x."""
    return moe.gate_up_proj.detach(), moe.down_proj.detach(), routing.expert_indices, routing.combine_weights


def _float64_reference(x, args):
    from vlmoe.moe.kernels.decode import glu_decode_reference

    return glu_decode_reference(x.double(), *(a.double() if a.is_floating_point() else a for a in args))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "experts", "top_k"),
    # 70 tokens: two token blocks; 5 experts over 20 tokens: every expert chosen, several
    # twice by one token.
    [
        (1, 40, 24, 4, 2),
        (3, 300, 530, 8, 2),
        (2, 24, 17, 3, 3),
        (1, 16, 16, 1, 1),
        (20, 33, 70, 5, 2),
        (70, 20, 30, 4, 2),
    ],
)
def test_decode_kernels_equal_float64_reference(tokens, hidden, intermediate, experts, top_k):
    """Ragged sizes (not multiples of the blocks) exercise every mask."""
    from vlmoe.moe.kernels.decode import glu_decode_triton

    moe, routing, x = _case(
        tokens, hidden, intermediate, experts, top_k, torch.float32, seed=hidden, device=DEVICE
    )
    args = _kernel_args(moe, routing)
    out = glu_decode_triton(x, *args)
    assert out.shape == (tokens, hidden) and torch.isfinite(out).all()
    expected = _float64_reference(x, args)
    assert relative_error(out, expected) < 1e-5


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_decode_kernels_in_half_precision_round_the_hidden_as_prefill_does():
    """fp16 weights: the hidden rows are rounded to fp16 before the down projection, as the
    grouped path rounds them. (fp16, not bf16, on the CPU: Triton 3.9's interpreter returns
    garbage from tl.dot on bf16 operands; the GPU tests cover bf16.)"""
    from vlmoe.moe.kernels.decode import glu_decode_triton

    moe, routing, x = _case(6, 40, 24, 4, 2, torch.float16, seed=5, device=DEVICE)
    args = _kernel_args(moe, routing)
    out = glu_decode_triton(x, *args)
    assert out.dtype == torch.float16
    expected = _float64_reference(x, args)
    assert relative_error(out, expected) < 1e-3
    # The float64 function with the hidden rounded to fp16 in between, then the output: the
    # kernels give it to within a few last-bit flips of the fp32 sums (here none).
    slot_experts = routing.expert_indices.reshape(-1)
    x_slots = x.double().repeat_interleave(2, dim=0)[:, :, None]
    gate, up = torch.bmm(args[0][slot_experts].double(), x_slots).squeeze(-1).chunk(2, dim=-1)
    hidden = (torch.nn.functional.silu(gate) * up).half().double()[:, :, None]
    y = torch.bmm(args[1][slot_experts].double(), hidden).view(6, 2, -1)
    rounded = (y * routing.combine_weights.double().view(6, 2, 1)).sum(dim=1).half()
    assert relative_error(out.double(), rounded.double()) < 1e-4


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_decode_kernels_with_a_forced_expert_and_one_nobody_chose():
    """Every token picks expert 2 in both slots; expert 0's weights are NaN and must not leak."""
    from vlmoe.moe.kernels.decode import glu_decode_reference, glu_decode_triton

    moe, routing, x = _case(5, 24, 40, 3, 2, torch.float32, seed=3, device=DEVICE)
    gate_up, down = moe.gate_up_proj.detach().clone(), moe.down_proj.detach().clone()
    gate_up[0], down[0] = float("nan"), float("nan")
    forced = torch.full((5, 2), 2, device=DEVICE)
    out = glu_decode_triton(x, gate_up, down, forced, routing.combine_weights)
    expected = glu_decode_reference(
        x.double(), gate_up[1:].double(), down[1:].double(), forced - 1, routing.combine_weights.double()
    )
    assert torch.isfinite(out).all()
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
