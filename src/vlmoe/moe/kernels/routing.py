"""Top-k routing kernels: decoding's one-launch router, and training's fused top-k with a backward.

Decoding (`route_triton`): top-k routing of a few tokens in one launch, gate product, softmax,
top-k and renormalising.

The torch router is six launches per layer (linear, cast, softmax, topk, sum, divide); while
decoding one token per sequence they cost more than their arithmetic. One program per token
computes its [E] logits from the [E, D] gate weight, rounds them to the input dtype (as the
linear layer's output is), and writes logits, probabilities, the K best experts (best first) and
their weights. No backward: the router uses it only with autograd off (`Router.forward`).
`route_reference` is the same function in torch.

Training (`topk_softmax`): softmax, top-k, renormalising and the slots per expert from the
router's logits, one kernel forward and one backward (below).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _route_kernel(
        x,
        gate_weight,
        gate_bias,
        logits_out,
        probs_out,
        indices_out,
        weights_out,
        D,
        E,
        temperature,
        K: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_E: tl.constexpr,
        BLOCK_D: tl.constexpr,
        HAS_BIAS: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        experts = tl.arange(0, BLOCK_E)
        valid = experts < E
        acc = tl.zeros([BLOCK_E, BLOCK_D], dtype=tl.float32)
        for start in range(0, D, BLOCK_D):
            cols = start + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            values = tl.load(x + token * D + cols, mask=col_ok, other=0.0).to(tl.float32)
            mask = valid[:, None] & col_ok[None, :]
            rows = tl.load(gate_weight + experts[:, None] * D + cols[None, :], mask=mask, other=0.0)
            acc += rows.to(tl.float32) * values[None, :]
        logits = tl.sum(acc, axis=1)
        if HAS_BIAS:
            logits += tl.load(gate_bias + experts, mask=valid, other=0.0).to(tl.float32)
        logits = logits.to(x.dtype.element_ty).to(tl.float32)  # the linear layer's output rounding
        tl.store(logits_out + token * E + experts, logits, mask=valid)
        scaled = tl.where(valid, logits / temperature, float("-inf"))
        exp = tl.exp(scaled - tl.max(scaled, axis=0))
        probs = exp / tl.sum(exp, axis=0)
        tl.store(probs_out + token * E + experts, probs, mask=valid)
        # K rounds of argmax; each winner is masked out for the next round.
        remaining = tl.where(valid, probs, -1.0)
        slots = tl.arange(0, BLOCK_K)
        top_probs = tl.zeros([BLOCK_K], dtype=tl.float32)
        top_indices = tl.zeros([BLOCK_K], dtype=tl.int64)
        for j in tl.static_range(K):
            best = tl.argmax(remaining, axis=0)
            top_probs = tl.where(slots == j, tl.max(remaining, axis=0), top_probs)
            top_indices = tl.where(slots == j, best.to(tl.int64), top_indices)
            remaining = tl.where(experts == best, -2.0, remaining)
        if NORMALIZE:
            top_probs = top_probs / tl.sum(tl.where(slots < K, top_probs, 0.0), axis=0)
        tl.store(indices_out + token * K + slots, top_indices, mask=slots < K)
        tl.store(weights_out + token * K + slots, top_probs, mask=slots < K)


def route_triton(
    x: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, top_k: int, temperature: float, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(logits, probs, expert_indices, combine_weights) of top-k softmax routing.

    x # [T, D]; gate_weight # [E, D] -> float32 [T, E], [T, E]; int64 [T, K]; float32 [T, K].
    """
    num_tokens, hidden = x.shape
    num_experts = gate_weight.shape[0]
    x, gate_weight = x.contiguous(), gate_weight.contiguous()
    logits = torch.empty(num_tokens, num_experts, device=x.device, dtype=torch.float32)
    probs = torch.empty_like(logits)
    indices = torch.empty(num_tokens, top_k, device=x.device, dtype=torch.int64)
    weights = torch.empty(num_tokens, top_k, device=x.device, dtype=torch.float32)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        _route_kernel[(num_tokens,)](
            x,
            gate_weight,
            gate_weight if gate_bias is None else gate_bias,  # unused without a bias
            logits,
            probs,
            indices,
            weights,
            hidden,
            num_experts,
            float(temperature),
            K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k),
            BLOCK_E=block_e,
            BLOCK_D=max(64, min(1024, 4096 // block_e)),
            HAS_BIAS=gate_bias is not None,
            NORMALIZE=normalize,
        )
    return logits, probs, indices, weights


def route_reference(
    x: Tensor, gate_weight: Tensor, gate_bias: Tensor | None, top_k: int, temperature: float, normalize: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The same routing in torch (what `Router.forward` computes without forcing or capacity).

    Example:
        >>> x, gate = torch.randn(3, 8), torch.randn(4, 8)
        >>> logits, probs, experts, weights = route_reference(x, gate, None, 2, 1.0, True)
        >>> experts.shape, bool(torch.allclose(weights.sum(-1), torch.ones(3)))
        (torch.Size([3, 2]), True)
    """
    logits = torch.nn.functional.linear(x, gate_weight, gate_bias)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs, top_probs, indices, _ = topk_softmax_reference(logits, top_k, temperature, normalize)
    return logits, probs, indices, top_probs


# Training routing: softmax, top-k and renormalising of the router's logits in one kernel each way,
# with the expert counts the balance loss needs. The torch chain is a dozen launches (softmax, topk
# and its sort, sum, divide; backward: the same again with a scatter), and the balance loss counts
# the slots per expert with an index_add whose atomics all land on E addresses (0.03 ms at
# 98304 slots and E = 64: more than the softmax and top-k together). Here each program counts
# its own rows and adds E integers: exact, so deterministic.

if HAS_TRITON:

    @triton.jit
    def _token_expert_tile(T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        """This program's [BLOCK_T, BLOCK_E] tile of a [T, E] row-major tensor: rows, which rows
        exist, experts, which cells exist, and their element offsets."""
        rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < T
        experts = tl.arange(0, BLOCK_E)
        valid = row_ok[:, None] & (experts[None, :] < E)
        offsets = rows[:, None].to(tl.int64) * E + experts[None, :]
        return rows, row_ok, experts, valid, offsets

    @triton.jit
    def _topk_softmax_kernel(
        logits,
        probs_out,
        indices_out,
        weights_out,
        counts_out,
        T,
        E,
        inv_temperature,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
        BLOCK_E: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        rows, row_ok, experts, valid, offsets = _token_expert_tile(T, E, BLOCK_T, BLOCK_E)
        scaled = tl.load(logits + offsets, mask=valid, other=float("-inf")).to(tl.float32) * inv_temperature
        scaled = tl.where(valid, scaled, float("-inf"))
        # Rows past T are all -inf: give them a finite maximum so they stay NaN-free (never stored).
        row_max = tl.where(row_ok, tl.max(scaled, axis=1), 0.0)
        exp = tl.exp(scaled - row_max[:, None])
        total = tl.sum(exp, axis=1)
        probs = exp / tl.where(row_ok, total, 1.0)[:, None]
        tl.store(probs_out + offsets, probs, mask=valid)
        # K rounds of argmax per row; the winner is masked out for the next round.
        remaining = tl.where(valid, probs, -1.0)
        slots = tl.arange(0, BLOCK_K)
        top = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
        top_indices = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int64)
        chosen = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.argmax(remaining, axis=1)  # [BLOCK_T]
            is_best = experts[None, :] == best[:, None]
            top = tl.where(slots[None, :] == j, tl.max(remaining, axis=1)[:, None], top)
            top_indices = tl.where(slots[None, :] == j, best[:, None].to(tl.int64), top_indices)
            chosen += is_best.to(tl.int32)
            remaining = tl.where(is_best, -2.0, remaining)
        if NORMALIZE:
            top = top / tl.sum(tl.where(slots[None, :] < K, top, 0.0), axis=1)[:, None]
        slot_ok = row_ok[:, None] & (slots[None, :] < K)
        slot_offsets = rows[:, None].to(tl.int64) * K + slots[None, :]
        tl.store(indices_out + slot_offsets, top_indices, mask=slot_ok)
        tl.store(weights_out + slot_offsets, top, mask=slot_ok)
        block_counts = tl.sum(tl.where(row_ok[:, None], chosen, 0), axis=0)  # [BLOCK_E]
        counted = (experts < E) & (block_counts > 0)
        tl.atomic_add(counts_out + experts, block_counts.to(tl.int64), mask=counted)

    @triton.jit
    def _topk_softmax_backward_kernel(
        probs,
        indices,
        weights,
        grad_weights,
        grad_probs,
        grad_logits,
        T,
        E,
        inv_temperature,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_E: tl.constexpr,
        NORMALIZE: tl.constexpr,
        HAS_GRAD_WEIGHTS: tl.constexpr,
        HAS_GRAD_PROBS: tl.constexpr,
    ):
        rows, row_ok, experts, valid, offsets = _token_expert_tile(T, E, BLOCK_T, BLOCK_E)
        p = tl.load(probs + offsets, mask=valid, other=0.0)
        if HAS_GRAD_PROBS:
            g = tl.load(grad_probs + offsets, mask=valid, other=0.0).to(tl.float32)
        else:
            g = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
        if HAS_GRAD_WEIGHTS:
            # The chosen probabilities' gradient, through the renormalising w_j = p_j / s where it
            # ran: dL/dp_j = (dL/dw_j - sum_i dL/dw_i w_i) / s, then scattered onto their experts.
            slot_base = rows.to(tl.int64) * K
            dot = tl.zeros([BLOCK_T], dtype=tl.float32)
            top_sum = tl.zeros([BLOCK_T], dtype=tl.float32)
            if NORMALIZE:
                for j in tl.static_range(K):
                    w_j = tl.load(weights + slot_base + j, mask=row_ok, other=0.0)
                    g_j = tl.load(grad_weights + slot_base + j, mask=row_ok, other=0.0).to(tl.float32)
                    e_j = tl.load(indices + slot_base + j, mask=row_ok, other=0)
                    dot += g_j * w_j
                    top_sum += tl.sum(tl.where(experts[None, :] == e_j[:, None], p, 0.0), axis=1)
                top_sum = tl.where(row_ok, top_sum, 1.0)
            for j in tl.static_range(K):
                g_j = tl.load(grad_weights + slot_base + j, mask=row_ok, other=0.0).to(tl.float32)
                e_j = tl.load(indices + slot_base + j, mask=row_ok, other=0)
                if NORMALIZE:
                    g_j = (g_j - dot) / top_sum
                g += tl.where(experts[None, :] == e_j[:, None], g_j[:, None], 0.0)
        # Softmax backward on the scaled logits: p * (g - <p, g>), and the temperature's 1/t.
        grad = p * (g - tl.sum(p * g, axis=1)[:, None]) * inv_temperature
        tl.store(grad_logits + offsets, grad, mask=valid)


def _routing_block_t(num_experts: int) -> int:
    # A [BLOCK_T, BLOCK_E] tile of about 2048 float32s: 32 rows at E = 64, 8 at E = 256.
    return max(1, min(64, 2048 // triton.next_power_of_2(num_experts)))


class _TopKSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: Tensor, top_k: int, temperature: float, normalize: bool):
        logits = logits.contiguous()
        num_tokens, num_experts = logits.shape
        probs = torch.empty(num_tokens, num_experts, device=logits.device, dtype=torch.float32)
        indices = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.int64)
        weights = torch.empty(num_tokens, top_k, device=logits.device, dtype=torch.float32)
        counts = torch.zeros(num_experts, device=logits.device, dtype=torch.int64)
        block_t = _routing_block_t(num_experts)
        if num_tokens:
            _topk_softmax_kernel[(triton.cdiv(num_tokens, block_t),)](
                logits, probs, indices, weights, counts, num_tokens, num_experts, 1.0 / temperature,
                K=top_k, BLOCK_T=block_t, BLOCK_K=triton.next_power_of_2(top_k),
                BLOCK_E=triton.next_power_of_2(num_experts), NORMALIZE=normalize,
            )  # fmt: skip
        ctx.save_for_backward(probs, indices, weights)
        ctx.temperature, ctx.normalize, ctx.logits_dtype = temperature, normalize, logits.dtype
        ctx.mark_non_differentiable(indices, counts)
        return probs, weights, indices, counts

    @staticmethod
    def backward(ctx, grad_probs, grad_weights, _grad_indices, _grad_counts):
        probs, indices, weights = ctx.saved_tensors
        num_tokens, num_experts = probs.shape
        top_k = indices.shape[-1]
        grad_logits = torch.empty_like(probs)
        block_t = _routing_block_t(num_experts)
        if num_tokens:
            _topk_softmax_backward_kernel[(triton.cdiv(num_tokens, block_t),)](
                probs, indices, weights,
                probs if grad_weights is None else grad_weights.contiguous(),
                probs if grad_probs is None else grad_probs.contiguous(),
                grad_logits, num_tokens, num_experts, 1.0 / ctx.temperature,
                K=top_k, BLOCK_T=block_t, BLOCK_E=triton.next_power_of_2(num_experts),
                NORMALIZE=ctx.normalize, HAS_GRAD_WEIGHTS=grad_weights is not None,
                HAS_GRAD_PROBS=grad_probs is not None,
            )  # fmt: skip
        return grad_logits.to(ctx.logits_dtype), None, None, None


def topk_softmax(
    logits: Tensor, top_k: int, temperature: float = 1.0, normalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(probs, combine_weights, expert_indices, expert_counts) of top-k softmax routing, with
    autograd through probs and combine_weights: the Triton kernels (CUDA, or TRITON_INTERPRET on
    the CPU). logits # [T, E] -> float32 [T, E], float32 [T, K], int64 [T, K], int64 [E] (slots
    per expert). `topk_softmax_reference` is the same function in torch."""
    return _TopKSoftmax.apply(logits, top_k, float(temperature), normalize)


def topk_softmax_reference(
    logits: Tensor, top_k: int, temperature: float = 1.0, normalize: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """What `Router.forward` computes in torch without forcing or capacity (the float64 reference)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)
    top_probs, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    counts = torch.bincount(indices.reshape(-1), minlength=logits.shape[-1])
    return probs, top_probs, indices, counts
