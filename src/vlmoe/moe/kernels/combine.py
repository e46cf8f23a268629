"""Moving rows between token order [T, W] and expert-sorted slot order [S = T * K, W].

Combine: out[t] = sum_j weights[t, j] * rows_src[slot_rows[t * K + j]]: one read of the K rows and
one write of the token row, where the torch version gathers, multiplies and reduces in three
passes. The same kernel with unit weights is the backward of the token gather (`dispatch.py`) and
the plain-sum combine `sum_sorted`, for experts that applied the weights themselves; with rows
already in token-slot order (no slot_rows) it is the decode kernels' last step.

Spread, the token gather itself: out[slot_rows[t * K + j]] = src[t]. It is index_select(0,
sorted_tokens), run token by token instead of row by row: each token row is read once for its K
copies, where the gather in sorted order reads it K times from all over src (at K = 6 and d = 2048
that is 400 MB of reads where 67 MB will do).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_sum_kernel(
        src,
        slot_rows,
        weights,
        out,
        width,
        K: tl.constexpr,
        HAS_ROWS: tl.constexpr,
        HAS_WEIGHTS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            if HAS_ROWS:  # noqa: SIM108 (a constexpr branch: Triton compiles only the one taken)
                row = tl.load(slot_rows + token * K + j).to(tl.int64)
            else:  # src is in token-slot order already
                row = token * K + j
            values = tl.load(src + row * width + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                values = values * tl.load(weights + token * K + j).to(tl.float32)
            acc += values
        tl.store(out + token * width + cols, acc.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _combine_backward_kernel(
        grad_out,
        y_sorted,
        sorted_slots,
        weights,
        grad_y,
        grad_weights,
        width,
        K: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # For sorted row r holding slot s of token t = s // K, in one pass over the row:
        #   grad_y[r] = weights[s] * grad_out[t]   and   grad_weights[s] = <grad_out[t], y_sorted[r]>
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(sorted_slots + row).to(tl.int64)
        scale = tl.load(weights + slot).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, width, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < width
            g = tl.load(grad_out + (slot // K) * width + cols, mask=inside, other=0.0).to(tl.float32)
            y = tl.load(y_sorted + row * width + cols, mask=inside, other=0.0).to(tl.float32)
            tl.store(grad_y + row * width + cols, (g * scale).to(grad_y.dtype.element_ty), mask=inside)
            dot += g * y
        tl.store(grad_weights + slot, tl.sum(dot, axis=0))

    @triton.jit
    def _spread_rows_kernel(src, slot_rows, out, width, K: tl.constexpr, BLOCK: tl.constexpr):
        # slot_rows is a permutation of the S rows: every output row is written once, by one program.
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < width
        values = tl.load(src + token * width + cols, mask=inside)
        for j in tl.static_range(K):
            row = tl.load(slot_rows + token * K + j).to(tl.int64)
            tl.store(out + row * width + cols, values, mask=inside)


_BLOCK = 1024


def spread_rows_triton(src: Tensor, slot_rows: Tensor, top_k: int) -> Tensor:
    """out[slot_rows[t*K + j]] = src[t]: src # [T, W] -> [T * K, W], no autograd of its own."""
    src = src.contiguous()
    num_tokens, width = src.shape
    if slot_rows.numel() != num_tokens * top_k:
        raise ValueError(f"slot_rows has {slot_rows.numel()} slots, expected {num_tokens} tokens x {top_k}")
    out = src.new_empty(slot_rows.numel(), width)
    if num_tokens and width:
        grid = (num_tokens, triton.cdiv(width, _BLOCK))
        _spread_rows_kernel[grid](src, slot_rows, out, width, K=top_k, BLOCK=_BLOCK)
    return out


def spread_rows(src: Tensor, slot_rows: Tensor, sorted_tokens: Tensor, top_k: int) -> Tensor:
    """The token rows in expert-sorted order, src.index_select(0, sorted_tokens) # [T, W] -> [S, W]:
    spread_rows_triton on CUDA, index_select elsewhere. slot_rows and sorted_tokens are the same
    permutation seen from both ends (`DispatchPlan`); no autograd of its own."""
    if use_triton(src) and src.dim() == 2:
        return spread_rows_triton(src, slot_rows, top_k)
    return src.index_select(0, sorted_tokens)


def gather_sum_reference(src: Tensor, slot_rows: Tensor, weights: Tensor | None, top_k: int) -> Tensor:
    rows = src.index_select(0, slot_rows).view(-1, top_k, src.shape[-1])  # [T, K, W]
    if weights is not None:
        rows = rows * weights.to(rows.dtype).unsqueeze(-1)
    return rows.sum(dim=1)


def gather_sum_triton(
    src: Tensor, slot_rows: Tensor | None, weights: Tensor | None, top_k: int, out: Tensor | None = None
) -> Tensor:
    """out[t] = sum_j w[t, j] * src[slot_rows[t*K + j]] (w = 1 when weights is None; src's row
    t*K + j when slot_rows is None: rows in token-slot order), summed in j's order in float32;
    into `out` (its dtype) when given, else a new tensor of src's dtype."""
    num_rows = src.shape[0] if slot_rows is None else slot_rows.numel()
    num_tokens, width = num_rows // top_k, src.shape[-1]
    if out is None:
        out = src.new_empty(num_tokens, width)
    if num_tokens:
        grid = (num_tokens, triton.cdiv(width, _BLOCK))
        # Unused pointers (HAS_ROWS / HAS_WEIGHTS false) still need a tensor: src stands in.
        rows = src if slot_rows is None else slot_rows
        w = src if weights is None else weights.contiguous()
        _gather_sum_kernel[grid](
            src, rows, w, out, width,
            K=top_k, HAS_ROWS=slot_rows is not None, HAS_WEIGHTS=weights is not None, BLOCK=_BLOCK,
        )  # fmt: skip
    return out


def gather_sum(src: Tensor, slot_rows: Tensor, weights: Tensor | None, top_k: int) -> Tensor:
    """gather_sum_triton on CUDA, its torch reference elsewhere; no autograd of its own."""
    if use_triton(src):
        return gather_sum_triton(src.contiguous(), slot_rows, weights, top_k)
    return gather_sum_reference(src, slot_rows, weights, top_k)


class _CombineSorted(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_sorted, weights, slot_rows, sorted_slots, top_k):
        ctx.weights_dtype = weights.dtype
        weights = weights.float().contiguous()
        ctx.save_for_backward(y_sorted, weights, sorted_slots)
        ctx.top_k = top_k
        return gather_sum_triton(y_sorted, slot_rows, weights, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        y_sorted, weights, sorted_slots = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        width, top_k = y_sorted.shape[-1], ctx.top_k
        grad_y = torch.empty_like(y_sorted)
        grad_weights = torch.empty_like(weights)
        if grad_y.shape[0]:
            _combine_backward_kernel[(grad_y.shape[0],)](
                grad_out, y_sorted, sorted_slots, weights, grad_y, grad_weights, width, K=top_k, BLOCK=_BLOCK
            )
        grad_weights = grad_weights.to(ctx.weights_dtype)
        return grad_y, grad_weights, None, None, None


class _SumSorted(torch.autograd.Function):
    """The unweighted combine (weights already applied inside the experts): out[t] = sum_j
    y_sorted[slot_rows[t*K + j]]; its backward copies each token's gradient to its K rows, so
    nothing of the forward is saved."""

    @staticmethod
    def forward(ctx, y_sorted, slot_rows, sorted_tokens, top_k):
        ctx.save_for_backward(slot_rows, sorted_tokens)
        ctx.top_k = top_k
        return gather_sum_triton(y_sorted, slot_rows, None, top_k)

    @staticmethod
    def backward(ctx, grad_out):
        slot_rows, sorted_tokens = ctx.saved_tensors
        return spread_rows(grad_out, slot_rows, sorted_tokens, ctx.top_k), None, None, None


def combine_sorted(y_sorted: Tensor, weights: Tensor, slot_rows: Tensor, sorted_slots: Tensor) -> Tensor:
    """Per token, the weighted sum of its K rows of the expert-sorted output.

    y_sorted # [S, W] (row slot_rows[s] holds slot s); weights # [T, K]; returns # [T, W].
    """
    top_k = weights.shape[-1]
    if use_triton(y_sorted) and y_sorted.is_contiguous():
        return _CombineSorted.apply(y_sorted, weights, slot_rows, sorted_slots, top_k)
    return gather_sum_reference(y_sorted, slot_rows, weights, top_k)


def sum_sorted(y_sorted: Tensor, slot_rows: Tensor, sorted_tokens: Tensor, top_k: int) -> Tensor:
    """Per token, the plain sum of its K rows of the expert-sorted output (rows the experts
    already scaled by their weights). sorted_tokens # [S], the token of each sorted row."""
    if use_triton(y_sorted) and y_sorted.is_contiguous():
        return _SumSorted.apply(y_sorted, slot_rows, sorted_tokens, top_k)
    return gather_sum_reference(y_sorted, slot_rows, None, top_k)
