"""A gated-FFN MoE layer for a few dozen tokens (decoding) in three kernel launches.

At a handful of tokens per step the sorted grouped-GEMM path (`dispatch.grouped_dispatch`) is
bound by its ~25 launches (sort, plan, gathers, combine) and by grouped GEMMs of a few rows, not
by bytes. Here, expert-major with token t's K chosen experts in slots t * K + j:

1. `_gate_up_by_expert_kernel`, one program per (expert, block of F, block of 64 tokens):
   h[slot] = silu(G[e] x_t) * (U[e] x_t) for the tokens that chose e, reading e's rows of the
   fused [E, 2F, D] gate_up weight once for all of them; a program whose expert nobody chose
   returns before reading anything;
2. `_down_by_expert_kernel`, one program per (expert, block of D, block of tokens):
   y[slot] = w[slot] * W[e] h[slot];
3. the combine kernel (`combine.gather_sum_triton`, rows already in slot order):
   out[t] = sum_j y[t * K + j], in slot order (deterministic).

So a step reads each chosen expert's weights once per 64 tokens, where a kernel per slot would
read them once per slot: 79 against 201 us at 8 tokens of a 4-expert layer on an H200, and
55 against 59 us at one token (NOTES.md v21). Past 64 tokens the grouped path is the better
one, and prefill and training keep it. No backward: the dispatcher uses this only with autograd
off. `glu_decode_reference` is the same function in torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON
from vlmoe.moe.kernels.combine import gather_sum_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _expert_tokens(experts, T, K: tl.constexpr, BLOCK_T: tl.constexpr):
        """This program's expert and block of tokens: (expert, tokens, which exist, the slot
        t * K + j through which each token chose the expert, the last one if it chose it twice
        (a forced expert; both slots hold the same hidden) or -1, which tokens chose it)."""
        expert = tl.program_id(0).to(tl.int64)
        tokens = tl.program_id(2).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
        token_ok = tokens < T
        slot = tl.full(tokens.shape, -1, dtype=tl.int64)
        for j in tl.static_range(K):
            ids = tl.load(experts + tokens * K + j, mask=token_ok, other=-1)
            slot = tl.where(ids == expert, tokens * K + j, slot)
        return expert, tokens, token_ok, slot, slot >= 0

    @triton.jit
    def _gate_up_by_expert_kernel(
        x,
        experts,
        weight,
        hidden,
        T,
        D,
        F,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_D: tl.constexpr,
    ):
        expert, tokens, _, slot, uses = _expert_tokens(experts, T, K, BLOCK_T)
        if tl.max(uses.to(tl.int32), axis=0) == 0:
            return  # no token chose this expert: its weights are not read
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < F
        gate_rows = weight + expert * 2 * F * D + rows.to(tl.int64)[:, None] * D
        up_rows = gate_rows + F * D
        x_rows = x + tokens[:, None] * D
        acc_gate = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            x_tile = tl.load(x_rows + cols[None, :], mask=uses[:, None] & col_ok[None, :], other=0.0)
            mask = row_ok[:, None] & col_ok[None, :]
            gate_tile = tl.load(gate_rows + cols[None, :], mask=mask, other=0.0)
            up_tile = tl.load(up_rows + cols[None, :], mask=mask, other=0.0)
            acc_gate = tl.dot(x_tile, tl.trans(gate_tile), acc_gate, input_precision="ieee")
            acc_up = tl.dot(x_tile, tl.trans(up_tile), acc_up, input_precision="ieee")
        h = (acc_gate * tl.sigmoid(acc_gate) * acc_up).to(hidden.dtype.element_ty)
        tl.store(hidden + slot[:, None] * F + rows[None, :], h, mask=uses[:, None] & row_ok[None, :])

    @triton.jit
    def _down_by_expert_kernel(
        hidden,
        experts,
        combine,
        weight,
        out_slots,
        T,
        D,
        F,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_F: tl.constexpr,
    ):
        expert, tokens, token_ok, slot, uses = _expert_tokens(experts, T, K, BLOCK_T)
        if tl.max(uses.to(tl.int32), axis=0) == 0:
            return
        rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < D
        down_rows = weight + expert * D * F + rows.to(tl.int64)[:, None] * F
        acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
        for start in range(0, F, BLOCK_F):
            cols = start + tl.arange(0, BLOCK_F)
            col_ok = cols < F
            h_mask = uses[:, None] & col_ok[None, :]
            h = tl.load(hidden + slot[:, None] * F + cols[None, :], mask=h_mask, other=0.0)
            w = tl.load(down_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        # Every slot of this expert gets its weighted row (a token that chose it twice, twice).
        for j in tl.static_range(K):
            ids = tl.load(experts + tokens * K + j, mask=token_ok, other=-1)
            scale = tl.load(combine + tokens * K + j, mask=token_ok, other=0.0).to(tl.float32)
            mask = (ids == expert)[:, None] & row_ok[None, :]
            rows_out = out_slots + (tokens * K + j)[:, None] * D + rows[None, :]
            tl.store(rows_out, acc * scale[:, None], mask=mask)


# 64 of F's rows x 128 columns a program (88 programs per expert at F = 5632), 32 of D's rows
# x 128 for the down pass; tl.dot needs 16 token rows, and a block takes at most 64.
_GATE_UP_BLOCKS = (64, 128)
_DOWN_BLOCKS = (32, 128)
MAX_BLOCK_TOKENS = 64


def glu_decode_triton(
    x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, expert_indices: Tensor, combine_weights: Tensor
) -> Tensor:
    """sum_k w[t, k] * down[e](silu(gate[e] x_t) * up[e] x_t) with e = expert_indices[t, k].

    x # [T, D]; gate_up_proj # [E, 2F, D]; down_proj # [E, D, F]; expert_indices, combine_weights
    # [T, K] -> [T, D] in x's dtype. Products accumulate in float32; the hidden activations are
    rounded to the weights' dtype, as the grouped path (prefill) rounds them.
    """
    num_tokens, hidden_size = x.shape
    num_experts, intermediate = gate_up_proj.shape[0], gate_up_proj.shape[1] // 2
    top_k = expert_indices.shape[-1]
    x, gate_up_proj, down_proj = x.contiguous(), gate_up_proj.contiguous(), down_proj.contiguous()
    experts, combine = expert_indices.contiguous(), combine_weights.contiguous()
    out = torch.empty_like(x)
    if num_tokens == 0:
        return out
    hidden = torch.empty(num_tokens * top_k, intermediate, device=x.device, dtype=x.dtype)
    out_slots = torch.empty(num_tokens * top_k, hidden_size, device=x.device, dtype=torch.float32)
    # More than 64 tokens take several token blocks, each reading the weights again.
    block_t = min(max(16, triton.next_power_of_2(num_tokens)), MAX_BLOCK_TOKENS)
    token_blocks = triton.cdiv(num_tokens, block_t)
    block_n, block_d = _GATE_UP_BLOCKS
    _gate_up_by_expert_kernel[(num_experts, triton.cdiv(intermediate, block_n), token_blocks)](
        x, experts, gate_up_proj, hidden, num_tokens, hidden_size, intermediate,
        K=top_k, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_D=block_d,
    )  # fmt: skip
    block_n, block_f = _DOWN_BLOCKS
    _down_by_expert_kernel[(num_experts, triton.cdiv(hidden_size, block_n), token_blocks)](
        hidden, experts, combine, down_proj, out_slots, num_tokens, hidden_size, intermediate,
        K=top_k, BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_F=block_f,
    )  # fmt: skip
    # Each token's K rows, summed in slot order (deterministic) into x's dtype.
    return gather_sum_triton(out_slots, None, None, top_k, out=out)


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
