"""silu(gate) * up over a fused [rows, 2F] gate_up tensor, forward and backward in one pass each.

Reading the two halves of the fused projection in place avoids the strided elementwise kernels
and the gradient concatenation that `chunk` costs in eager torch (benchmarks/NOTES.md).

`swiglu(gate_up, overwrite_input=True)` (what the MoE experts use: their gate_up is a temporary
nobody else reads) writes the backward's gradient over the saved gate_up instead of a new
[rows, 2F] tensor: each element is read before it is written by the same program, and the
largest activation of the layer is not held twice at the backward's peak. A second backward
through the same graph (retain_graph) would read the overwritten input, so it raises instead.

`swiglu(gate_up, row_scale=w)` multiplies each output row by w[row] in the same pass (the MoE
combine weights); the backward returns w's gradient, each row's <grad, silu(gate) * up>,
reduced per column block in the kernel and over the blocks in torch (no atomics).

`swiglu_pairs_backward` is the same backward for gate and up paired in adjacent columns, the
layout of QuACK's gated GEMM epilogue, whose forward computes the SwiGLU itself
(`vlmoe.moe.dispatch.combined_glu`); it reads each row's combine weight at the row's slot and
writes the weight's gradient there, so the caller gathers neither.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmoe.moe.kernels import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _swiglu_forward_kernel(gate_up, row_scale, out, size, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = cols < size
        gate = tl.load(gate_up + row * 2 * size + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up + row * 2 * size + size + cols, mask=inside, other=0.0).to(tl.float32)
        result = gate * tl.sigmoid(gate) * up
        if HAS_SCALE:
            result = result * tl.load(row_scale + row).to(tl.float32)
        tl.store(out + row * size + cols, result.to(out.dtype.element_ty), mask=inside)

    @triton.jit
    def _swiglu_grads(gate, up, grad):
        """(d gate, d up) of silu(gate) * up for the gradient grad, all float32."""
        sigmoid = tl.sigmoid(gate)
        silu = gate * sigmoid
        return grad * up * (sigmoid + silu * (1.0 - sigmoid)), grad * silu

    @triton.jit
    def _swiglu_backward_kernel(
        gate_up,
        row_scale,
        grad_out,
        grad_gate_up,
        grad_scale_parts,
        size,
        HAS_SCALE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        inside = cols < size
        gate = tl.load(gate_up + row * 2 * size + cols, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(gate_up + row * 2 * size + size + cols, mask=inside, other=0.0).to(tl.float32)
        grad = tl.load(grad_out + row * size + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_SCALE:
            # out = scale * silu * up: the scale's gradient is this row's <grad, silu * up>, summed
            # here per column block (no atomics) and over the blocks by the caller.
            hidden = gate * tl.sigmoid(gate) * up
            tl.store(grad_scale_parts + row * tl.num_programs(1) + block, tl.sum(grad * hidden, axis=0))
            grad = grad * tl.load(row_scale + row).to(tl.float32)
        grad_gate, grad_up = _swiglu_grads(gate, up, grad)
        dtype = grad_gate_up.dtype.element_ty
        tl.store(grad_gate_up + row * 2 * size + cols, grad_gate.to(dtype), mask=inside)
        tl.store(grad_gate_up + row * 2 * size + size + cols, grad_up.to(dtype), mask=inside)

    @triton.jit
    def _swiglu_pairs_backward_kernel(
        preact_words,
        slot_weights,
        sorted_slots,
        grad_hidden,
        grad_words,
        grad_slot_weights,
        rows,
        size,
        ROWS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # preact pairs gate j and up j in bf16 columns 2j, 2j + 1 (QuACK's gated GEMM epilogue):
        # one little-endian 32-bit word per pair, gate in its low half, up in its high half. One
        # coalesced word load splits into both with two bit operations (a bf16 is the top half
        # of a float32); a [BLOCK, 2] tile with tl.split measured 2x slower (NOTES.md v17). Every
        # word is read before this same program writes it: grad_words may be preact_words, and
        # grad_hidden takes scale * hidden in place.
        # A program owns ROWS whole rows and walks their columns BLOCK at a time, so it finishes
        # each row's weight gradient itself and stores it at the row's slot: no per-block partial
        # sums, no reduction kernel, no gathers of the weights in and of their gradient out.
        row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        row_inside = row < rows
        slot = tl.load(sorted_slots + row, mask=row_inside, other=0)
        scale = tl.load(slot_weights + slot, mask=row_inside, other=0.0).to(tl.float32)[:, None]
        row_start = row.to(tl.int64)[:, None] * size
        total = tl.zeros([ROWS], dtype=tl.float32)
        for first in range(0, size, BLOCK):
            cols = first + tl.arange(0, BLOCK)
            inside = row_inside[:, None] & (cols < size)[None, :]
            where = row_start + cols[None, :]
            words = tl.load(preact_words + where, mask=inside, other=0)
            gate = (words << 16).to(tl.float32, bitcast=True)
            up = (words & -65536).to(tl.float32, bitcast=True)
            grad = tl.load(grad_hidden + where, mask=inside, other=0.0).to(tl.float32)
            hidden = gate * tl.sigmoid(gate) * up
            total += tl.sum(grad * hidden, axis=1)
            grad_gate, grad_up = _swiglu_grads(gate, up, grad * scale)
            gate_bits = grad_gate.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
            up_bits = grad_up.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16
            tl.store(grad_words + where, gate_bits | up_bits, mask=inside)
            tl.store(grad_hidden + where, (hidden * scale).to(grad_hidden.dtype.element_ty), mask=inside)
        tl.store(grad_slot_weights + slot, total, mask=row_inside)


_BLOCK = 1024
# The pairs kernel's launch, (ROWS, BLOCK, num_warps): rows per program, columns per step of its
# loop, warps. One row of 512-column steps was the fastest of ten launches at F = 1408 and 14336
# and within 1% of the fastest at 5632 (H200, NOTES.md v25): 4.0 TB/s, where v18's kernel, with
# a partial sum per block and the weights gathered around it, reached 3.7-3.8.
PAIRS_LAUNCH = (1, 512, 4)


def swiglu_reference(gate_up: Tensor, row_scale: Tensor | None = None) -> Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    out = F.silu(gate) * up
    return out if row_scale is None else out * row_scale.to(out.dtype).unsqueeze(-1)


def swiglu_forward_triton(gate_up: Tensor, row_scale: Tensor | None = None) -> Tensor:
    rows, size = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(rows, size)
    if rows:
        scale = gate_up if row_scale is None else row_scale  # unused when HAS_SCALE=False
        _swiglu_forward_kernel[(rows, triton.cdiv(size, _BLOCK))](
            gate_up, scale, out, size, HAS_SCALE=row_scale is not None, BLOCK=_BLOCK
        )
    return out


def swiglu_backward_triton(
    gate_up: Tensor, grad_out: Tensor, out: Tensor | None = None, row_scale: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The gradients w.r.t. gate_up (written to `out`, which may be gate_up itself, or a new
    tensor) and, with `row_scale`, w.r.t. the row scale (float32, [rows])."""
    rows, size = grad_out.shape
    grad_gate_up = torch.empty_like(gate_up) if out is None else out
    blocks = triton.cdiv(size, _BLOCK)
    grad_scale_parts = None if row_scale is None else gate_up.new_empty(rows, blocks, dtype=torch.float32)
    if rows:
        _swiglu_backward_kernel[(rows, blocks)](
            gate_up,
            gate_up if row_scale is None else row_scale,
            grad_out.contiguous(),
            grad_gate_up,
            gate_up if grad_scale_parts is None else grad_scale_parts,
            size,
            HAS_SCALE=row_scale is not None,
            BLOCK=_BLOCK,
        )
    return grad_gate_up, None if grad_scale_parts is None else grad_scale_parts.sum(dim=1)


def swiglu_pairs_backward(
    preact: Tensor,
    grad_hidden: Tensor,
    slot_weights: Tensor,
    sorted_slots: Tensor,
    out: Tensor | None = None,
    launch: tuple[int, int, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """The backward of w[slot(r)] * silu(gate) * up with gate and up paired in adjacent columns
    of preact # [rows, 2F] (gate j in column 2j, up j in 2j + 1), given grad_hidden # [rows, F],
    the gradient of the scaled product (the Triton kernel for bf16 on CUDA, torch elsewhere).
    slot_weights # [S] are the combine weights in slot order and sorted_slots # [rows] the slot
    of each row (`DispatchPlan.sorted_slots`; no slot twice): row r is scaled by
    slot_weights[sorted_slots[r]].

    Returns (grad_preact, grad_slot_weights): grad_preact, paired as preact, in `out` (may be
    preact itself) or a new tensor; grad_slot_weights # [S] float32 in slot order, each slot's
    <grad_hidden, silu(gate) * up> over its row (0 for a slot no row holds). grad_hidden is
    overwritten with the scaled product, what the next matmul's weight gradient multiplies (no
    [rows, F] tensor is kept for it). `launch`: the kernel's (ROWS, BLOCK, num_warps), for
    benchmarks; by default `PAIRS_LAUNCH`."""
    rows, size = grad_hidden.shape
    grad_preact = torch.empty_like(preact) if out is None else out
    kernel_runs = (
        use_triton(preact)
        and preact.dtype == grad_preact.dtype == torch.bfloat16  # the kernel's word layout
        and preact.is_contiguous()
        and grad_preact.is_contiguous()
        and grad_hidden.is_contiguous()
    )
    if not kernel_runs:
        return _swiglu_pairs_backward_reference(preact, grad_hidden, slot_weights, sorted_slots, grad_preact)
    row_block, block, num_warps = PAIRS_LAUNCH if launch is None else launch
    # Slots no row holds (none on the MoE path, where the rows are a permutation) keep 0.
    grad_slot_weights = (torch.empty if rows == slot_weights.numel() else torch.zeros)(
        slot_weights.numel(), device=preact.device, dtype=torch.float32
    )
    if rows:
        _swiglu_pairs_backward_kernel[(triton.cdiv(rows, row_block),)](
            preact.view(torch.int32),
            slot_weights.contiguous(),
            sorted_slots.contiguous(),
            grad_hidden,
            grad_preact.view(torch.int32),
            grad_slot_weights,
            rows,
            size,
            ROWS=row_block,
            BLOCK=block,
            num_warps=num_warps,
        )
    return grad_preact, grad_slot_weights


def _swiglu_pairs_backward_reference(
    preact: Tensor, grad_hidden: Tensor, slot_weights: Tensor, sorted_slots: Tensor, grad_preact: Tensor
) -> tuple[Tensor, Tensor]:
    compute = torch.promote_types(preact.dtype, torch.float32)
    gate, up = preact[:, 0::2].to(compute), preact[:, 1::2].to(compute)
    grad = grad_hidden.to(compute)
    scale = slot_weights.to(compute).index_select(0, sorted_slots).unsqueeze(-1)
    sigmoid = torch.sigmoid(gate)
    silu = gate * sigmoid
    hidden = silu * up
    grad_slot_weights = torch.zeros(slot_weights.numel(), device=preact.device, dtype=torch.float32)
    grad_slot_weights.index_copy_(0, sorted_slots, (grad * hidden).sum(-1).float())
    grad = grad * scale
    pairs = torch.stack([grad * up * (sigmoid + silu * (1 - sigmoid)), grad * silu], dim=-1)
    grad_preact.copy_(pairs.flatten(-2))  # every read of preact is done: grad_preact may be preact
    grad_hidden.copy_(hidden * scale)
    return grad_preact, grad_slot_weights


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, gate_up: Tensor, overwrite_input: bool = False, row_scale: Tensor | None = None
    ) -> Tensor:
        if row_scale is not None:
            row_scale = row_scale.contiguous()
        ctx.save_for_backward(gate_up, row_scale)
        ctx.overwrite_input = overwrite_input
        ctx.overwritten = False
        return swiglu_forward_triton(gate_up, row_scale)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.overwritten:
            raise RuntimeError(
                "a second backward through vlmoe's SwiGLU kernel (retain_graph=True?): the first "
                "one wrote its gradient over the saved gate_up to save memory. To backward twice, "
                "set vlmoe.moe.kernels.swiglu.OVERWRITE_IN_BACKWARD = False before the forward"
            )
        gate_up, row_scale = ctx.saved_tensors
        out = None
        if ctx.overwrite_input:
            ctx.overwritten = True
            out = gate_up
        grad_gate_up, grad_scale = swiglu_backward_triton(gate_up, grad_out, out=out, row_scale=row_scale)
        if grad_scale is not None:
            grad_scale = grad_scale.to(row_scale.dtype)
        return grad_gate_up, None, grad_scale


# The experts' switch: overwrite the saved gate_up in backward (saves one [rows, 2F] activation).
OVERWRITE_IN_BACKWARD = True


def swiglu(gate_up: Tensor, overwrite_input: bool = False, row_scale: Tensor | None = None) -> Tensor:
    """silu(gate_up[:, :F]) * gate_up[:, F:] (* row_scale per row). gate_up # [rows, 2F] -> [rows, F].

    `overwrite_input`: the backward may reuse gate_up's memory for its gradient (only for a
    gate_up the caller does not read again; see the module docstring). `row_scale` # [rows]:
    each output row times its scale, inside the same pass (the MoE combine weights, see
    `vlmoe.moe.dispatch.grouped_dispatch`)."""
    if use_triton(gate_up) and gate_up.is_contiguous() and gate_up.dim() == 2:
        # Never a leaf (a tensor the caller owns), and not under torch.compile, which plans the
        # memory itself and would have to functionalise the write.
        overwrite = overwrite_input and not gate_up.is_leaf and not torch.compiler.is_compiling()
        return _SwiGLU.apply(gate_up, overwrite, row_scale)
    return swiglu_reference(gate_up, row_scale)
