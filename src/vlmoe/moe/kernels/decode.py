"""A gated-FFN MoE layer for a handful of token-slots (decoding) in two kernel launches.

At one token per sequence and step the sorted grouped-GEMM path (`dispatch.grouped_dispatch`)
is bound by its ~25 launches (sort, plan, gathers, combine), not by bytes. Here, with S = T*K
token-slots, token t = s // K and e_s the expert of slot s:

1. `_gate_up_kernel`, one program per (slot, block of F): h[s] = silu(G[e_s] x_t) * (U[e_s] x_t),
   reading the chosen expert's rows of the fused [E, 2F, D] gate_up weight in place;
2. `_down_combine_kernel`, one program per (token, block of D): out[t] = sum_k w[t, k] * W[e] h,
   the down projection and the weighted K-way combine in one pass.

Each slot reads its expert's weights itself (a matrix-vector product per slot): right while S
is small, wasteful for prefill and training, which keep the grouped path. No backward: the
dispatcher uses this only with autograd off. `glu_decode_reference` is the same function in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    from vlmoe.moe.kernels.routing import route_token, routing_blocks, routing_outputs, store_routing

    @triton.jit
    def _slot_gate_up(x_row, weight, hidden_row, expert, D, F, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """hidden_row[rows] = silu(G[expert] x) * (U[expert] x) for this program's block of F."""
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < F
        gate_rows = weight + expert * 2 * F * D + rows.to(tl.int64)[:, None] * D
        up_rows = gate_rows + F * D
        acc_gate = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            values = tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            acc_gate += tl.load(gate_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * values
            acc_up += tl.load(up_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * values
        gate = tl.sum(acc_gate, axis=1)
        up = tl.sum(acc_up, axis=1)
        tl.store(hidden_row + rows, gate * tl.sigmoid(gate) * up, mask=row_ok)

    @triton.jit
    def _gate_up_kernel(
        x, experts, weight, hidden, D, F, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        slot = tl.program_id(0).to(tl.int64)
        expert = tl.load(experts + slot).to(tl.int64)
        _slot_gate_up(x + (slot // K) * D, weight, hidden + slot * F, expert, D, F, BLOCK_N, BLOCK_D)

    @triton.jit
    def _routed_gate_up_kernel(
        x,
        gate_weight,
        gate_bias,
        logits_out,
        probs_out,
        indices_out,
        weights_out,
        weight,
        hidden,
        D,
        F,
        E,
        temperature,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_E: tl.constexpr,
        ROUTE_BLOCK_D: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        """`_gate_up_kernel` that routes its token itself: every program recomputes the token's
        [E, D] gate product (a few KB from L2) instead of waiting for a routing launch, and the
        first program of each token writes the routing for the down kernel and the record."""
        slot = tl.program_id(0).to(tl.int64)
        token = slot // K
        choice = slot % K
        logits, probs, top_indices, top_probs = route_token(
            x + token * D,
            gate_weight,
            gate_bias,
            D,
            E,
            temperature,
            K,
            BLOCK_K,
            BLOCK_E,
            ROUTE_BLOCK_D,
            HAS_BIAS,
            NORMALIZE,
        )
        if (choice == 0) & (tl.program_id(1) == 0):
            store_routing(
                logits_out,
                probs_out,
                indices_out,
                weights_out,
                token,
                E,
                logits,
                probs,
                top_indices,
                top_probs,
                K,
                BLOCK_K,
                BLOCK_E,
            )
        expert = tl.sum(tl.where(tl.arange(0, BLOCK_K) == choice, top_indices, 0))
        _slot_gate_up(x + token * D, weight, hidden + slot * F, expert, D, F, BLOCK_N, BLOCK_D)

    @triton.jit
    def _down_combine_kernel(
        hidden,
        experts,
        combine,
        weight,
        out,
        D,
        F,
        K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < D
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for j in tl.static_range(K):
            slot = token * K + j
            expert = tl.load(experts + slot).to(tl.int64)
            scale = tl.load(combine + slot).to(tl.float32)
            down_rows = weight + expert * D * F + rows.to(tl.int64)[:, None] * F
            acc = tl.zeros([BLOCK_N, BLOCK_F], dtype=tl.float32)
            for start in range(0, F, BLOCK_F):
                cols = start + tl.arange(0, BLOCK_F)
                col_ok = cols < F
                h = tl.load(hidden + slot * F + cols, mask=col_ok, other=0.0)[None, :]
                mask = row_ok[:, None] & col_ok[None, :]
                acc += tl.load(down_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * h
            total += scale * tl.sum(acc, axis=1)
        tl.store(out + token * D + rows, total.to(out.dtype.element_ty), mask=row_ok)


# Blocks of 16 weight rows x 256 columns: ~700 programs for the gate_up of one slot at F = 5632,
# enough loads in flight to stream the weights; 8 rows per program for the narrower down pass.
_GATE_UP_BLOCKS = (16, 256)
_DOWN_BLOCKS = (8, 512)


def glu_decode_triton(
    x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, expert_indices: Tensor, combine_weights: Tensor
) -> Tensor:
    """sum_k w[t, k] * down[e](silu(gate[e] x_t) * up[e] x_t) with e = expert_indices[t, k].

    x # [T, D]; gate_up_proj # [E, 2F, D]; down_proj # [E, D, F]; expert_indices, combine_weights
    # [T, K] -> [T, D] in x's dtype. Accumulates in float32 (the hidden activations stay float32).
    """
    top_k = expert_indices.shape[-1]
    x, gate_up_proj = x.contiguous(), gate_up_proj.contiguous()
    experts, combine = expert_indices.contiguous(), combine_weights.contiguous()
    hidden = _hidden(x, gate_up_proj, top_k)
    if x.shape[0]:
        block_n, block_d = _GATE_UP_BLOCKS
        _gate_up_kernel[(hidden.shape[0], triton.cdiv(hidden.shape[1], block_n))](
            x,
            experts,
            gate_up_proj,
            hidden,
            x.shape[1],
            hidden.shape[1],
            K=top_k,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
        )
    return _down_combine(hidden, experts, combine, down_proj, x)


def glu_decode_routed_triton(
    x: Tensor,
    gate_weight: Tensor,
    gate_bias: Tensor | None,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    top_k: int,
    temperature: float,
    normalize: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Top-k routing (`route_triton`'s) and `glu_decode_triton` in two launches instead of three.

    gate_weight # [E, D] -> (out # [T, D], (logits, probs, expert_indices, combine_weights)).
    """
    num_tokens, hidden_size = x.shape
    num_experts = gate_weight.shape[0]
    x, gate_weight, gate_up_proj = x.contiguous(), gate_weight.contiguous(), gate_up_proj.contiguous()
    routing = routing_outputs(num_tokens, num_experts, top_k, x.device)
    hidden = _hidden(x, gate_up_proj, top_k)
    if num_tokens:
        block_n, block_d = _GATE_UP_BLOCKS
        blocks = routing_blocks(num_experts, top_k)
        _routed_gate_up_kernel[(hidden.shape[0], triton.cdiv(hidden.shape[1], block_n))](
            x,
            gate_weight,
            gate_weight if gate_bias is None else gate_bias,  # unused without a bias
            *routing,
            gate_up_proj,
            hidden,
            hidden_size,
            hidden.shape[1],
            num_experts,
            float(temperature),
            K=top_k,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_K=blocks["BLOCK_K"],
            BLOCK_E=blocks["BLOCK_E"],
            ROUTE_BLOCK_D=blocks["BLOCK_D"],
            HAS_BIAS=gate_bias is not None,
            NORMALIZE=normalize,
        )
    _, _, indices, weights = routing
    return _down_combine(hidden, indices, weights, down_proj, x), routing


def _hidden(x: Tensor, gate_up_proj: Tensor, top_k: int) -> Tensor:
    """The float32 [S, F] activations between the two kernels."""
    return torch.empty(x.shape[0] * top_k, gate_up_proj.shape[1] // 2, device=x.device, dtype=torch.float32)


def _down_combine(hidden: Tensor, experts: Tensor, combine: Tensor, down_proj: Tensor, x: Tensor) -> Tensor:
    out = torch.empty_like(x)
    num_tokens, hidden_size = x.shape
    if num_tokens:
        block_n, block_f = _DOWN_BLOCKS
        _down_combine_kernel[(num_tokens, triton.cdiv(hidden_size, block_n))](
            hidden,
            experts,
            combine,
            down_proj.contiguous(),
            out,
            hidden_size,
            hidden.shape[1],
            K=experts.shape[-1],
            BLOCK_N=block_n,
            BLOCK_F=block_f,
        )
    return out


def glu_decode_reference(
    x: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    expert_indices: Tensor,
    combine_weights: Tensor,
    activation=torch.nn.functional.silu,
) -> Tensor:
    """The same function in torch: each slot's expert weights gathered, then batched products.

    Example:
        >>> x, gate_up, down = torch.randn(2, 8), torch.randn(3, 10, 8), torch.randn(3, 8, 5)
        >>> experts, weights = torch.tensor([[0, 2], [1, 1]]), torch.rand(2, 2)
        >>> glu_decode_reference(x, gate_up, down, experts, weights).shape
        torch.Size([2, 8])
    """
    num_tokens, top_k = expert_indices.shape
    slot_experts = expert_indices.reshape(-1)  # [S]
    x_slots = x.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # [S, D, 1]
    gate, up = torch.bmm(gate_up_proj[slot_experts], x_slots).squeeze(-1).chunk(2, dim=-1)  # [S, F] each
    y = torch.bmm(down_proj[slot_experts], (activation(gate) * up).unsqueeze(-1)).squeeze(-1)  # [S, D]
    weights = combine_weights.to(y.dtype).view(num_tokens, top_k, 1)
    return (y.view(num_tokens, top_k, -1) * weights).sum(dim=1)
