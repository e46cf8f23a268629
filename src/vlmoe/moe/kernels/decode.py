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

    @triton.jit
    def _gate_up_kernel(
        x, experts, weight, hidden, D, F, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr
    ):
        slot = tl.program_id(0).to(tl.int64)
        token = slot // K
        expert = tl.load(experts + slot).to(tl.int64)
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < F
        gate_rows = weight + expert * 2 * F * D + rows.to(tl.int64)[:, None] * D
        up_rows = gate_rows + F * D
        acc_gate = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            values = tl.load(x + token * D + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            mask = row_ok[:, None] & col_ok[None, :]
            acc_gate += tl.load(gate_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * values
            acc_up += tl.load(up_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * values
        gate = tl.sum(acc_gate, axis=1)
        up = tl.sum(acc_up, axis=1)
        tl.store(hidden + slot * F + rows, gate * tl.sigmoid(gate) * up, mask=row_ok)

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
    num_tokens, hidden_size = x.shape
    intermediate = gate_up_proj.shape[1] // 2
    top_k = expert_indices.shape[-1]
    x, gate_up_proj, down_proj = x.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous()
    experts = expert_indices.contiguous()
    combine = combine_weights.contiguous()
    hidden = torch.empty(num_tokens * top_k, intermediate, device=x.device, dtype=torch.float32)
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    block_n, block_d = _GATE_UP_BLOCKS
    _gate_up_kernel[(num_tokens * top_k, triton.cdiv(intermediate, block_n))](
        x, experts, gate_up_proj, hidden, hidden_size, intermediate, K=top_k, BLOCK_N=block_n, BLOCK_D=block_d
    )
    block_n, block_f = _DOWN_BLOCKS
    _down_combine_kernel[(num_tokens, triton.cdiv(hidden_size, block_n))](
        hidden,
        experts,
        combine,
        down_proj,
        out,
        hidden_size,
        intermediate,
        K=top_k,
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
