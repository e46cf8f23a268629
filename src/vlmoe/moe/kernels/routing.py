"""Top-k routing of a few tokens in one launch: gate product, softmax, top-k and renormalising.

The torch router is six launches per layer (linear, cast, softmax, topk, sum, divide); while
decoding one token per sequence they cost more than their arithmetic. One program per token
computes its [E] logits from the [E, D] gate weight, rounds them to the input dtype (as the
linear layer's output is), and writes logits, probabilities, the K best experts (best first) and
their weights. No backward: the router uses it only with autograd off (`Router.forward`).
`route_reference` is the same function in torch.
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
    probs = torch.softmax(logits / temperature, dim=-1)
    top_probs, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        top_probs = top_probs / top_probs.sum(dim=-1, keepdim=True)
    return logits, probs, indices, top_probs
