"""Dispatch: send token-slots to their experts and combine the results. The hot path.

Shape legend: T tokens, K top_k, S = T*K token-slots, E experts, I/O expert input/output size.
A slot is one (token, choice) pair, numbered token * K + choice.

Five backends compute the same function:
- `reference_dispatch`: for each expert, the tokens that chose it, run through that expert and
  added back with their weight. Any device and dtype (float64 included); the definition.
- `grouped_dispatch`: one stable sort of the slots by expert, one gather of the token rows,
  grouped matmuls over contiguous expert segments (`torch.nn.functional.grouped_mm` on CUDA),
  one gather back and a K-way weighted sum. Both gathers are permutations whose backward is
  again a gather, so there are no atomics, and on CUDA no host synchronisation. For memory,
  GLU and MLP experts gather inside their first matmul (`gathered_linear`: the backward
  gathers again instead of keeping [S, I]) and GLU experts apply the combine weights in their
  SwiGLU pass (the combine is then a plain sum that keeps no [S, O] output). Where QuACK is
  installed (Hopper, bf16, large experts), its varlen GEMMs take grouped_mm's place, forward
  and backward, and the first one gathers the token rows in its loads (`kernels.quack_gemm`).
  For SwiGLU experts there, `combined_glu` runs the whole FFN and the combine as one autograd
  function with the SwiGLU in the first GEMM's epilogue: no SwiGLU pass in the forward, and
  neither the [S, F] hidden rows nor the [S, O] expert output kept for the backward.
- `segments`: the same sort and gathers, but the expert counts are read to the host once per
  forward (one synchronisation) and each expert's segment is one plain matmul (cuBLAS on CUDA),
  forward and backward. Per matmul, cuBLAS beats the grouped kernel by up to 7% for a few large
  experts (`benchmarks/gemm_efficiency.py`), 0-3% in the whole layer; many small experts are
  much slower. Opt-in: `auto` never takes it (the sync; torch.compile breaks its graph there).
  Also what `grouped` runs where grouped_mm cannot (CPU, non-bf16 weights).
- `dense_dispatch`: every expert on every token, weighted by a [T, E] gate matrix that is zero
  off the chosen experts. E times the expert FLOPs but no permutation at all: the fast choice
  for low-rank (LoRA) experts, whose E * rank is small beside the frozen base matmul.
- `decode_dispatch`: no sort and no plan; each slot's expert weights read in place by two
  kernels (`vlmoe.moe.kernels.decode`). For a few token-slots with autograd off (generation),
  where the grouped path's ~25 small launches, not its bytes, bound the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from vlmoe.moe.kernels import plan as plan_kernels
from vlmoe.moe.kernels import quack_gemm, use_triton
from vlmoe.moe.kernels import swiglu as swiglu_kernels
from vlmoe.moe.kernels.combine import combine_sorted, gather_sum, spread_rows, sum_sorted
from vlmoe.moe.router import Routing

Backend = Literal["auto", "reference", "grouped", "segments", "dense", "decode"]
BACKENDS: tuple[str, ...] = ("auto", "reference", "grouped", "segments", "dense", "decode")
# `auto` runs LoRA experts densely on CUDA while all experts' ranks together stay this small.
DENSE_MAX_TOTAL_RANK = 512
# `auto` takes the decode path on CUDA, with autograd off, up to this many tokens: its kernels
# read each chosen expert's weights once per 64 tokens, and beat the grouped path (a CUDA graph
# too) up to there: 89 against 136 us at 64 tokens of a 4-expert layer (H200, NOTES.md v21).
DECODE_MAX_TOKENS = 64

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@dataclass
class DispatchPlan:
    """Where each token-slot sits once the slots are sorted by expert."""

    sorted_slots: Tensor  # [S] slot number of each sorted row
    slot_rows: Tensor  # [S] sorted row of each slot (inverse of sorted_slots)
    row_experts: Tensor  # [S] expert of each sorted row; num_experts for dropped rows (at the end)
    tokens_per_expert: Tensor  # [E] int64, computed rows per expert
    offsets: Tensor  # [E] int32, end of each expert's segment (grouped_mm's `offs`)
    row_valid: Tensor | None  # [S, 1] bool, False for dropped rows; None when none is dropped
    top_k: int
    # The `segments` backend: every expert matmul runs on host-side counts, even where grouped_mm could.
    segments: bool = False
    sorted_tokens: Tensor | None = None  # [S] token of each sorted row (sorted_slots // top_k), once per plan
    # [E + 1] int32, [0, offsets...]: QuACK's cu_seqlens, once per plan (not once per matmul);
    # `offsets` is a view of it where plan_dispatch made both.
    segment_bounds: Tensor | None = None
    _host_counts: list[int] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.sorted_tokens is None:
            self.sorted_tokens = self.sorted_slots // self.top_k
        if self.segment_bounds is None:
            self.segment_bounds = quack_gemm.cu_seqlens(self.offsets)

    def gather(self, x: Tensor) -> Tensor:
        """The token rows in expert order, zeros for dropped rows. x # [T, I] -> x_sorted # [S, I]"""
        rows = _GatherTokenRows.apply(x, self.sorted_tokens, self.slot_rows, self.top_k)
        return _zero_dropped(rows, self.row_valid)

    def host_counts(self) -> list[int]:
        """tokens_per_expert on the host, read once per plan (one synchronisation on CUDA) however
        many per-segment matmuls use it."""
        if self._host_counts is None:
            self._host_counts = self.tokens_per_expert.tolist()
        return self._host_counts


class Experts(Protocol):
    """What dispatch needs from an expert container (see `vlmoe.moe.experts`)."""

    num_experts: int

    def forward(self, x_sorted: Tensor, plan: DispatchPlan) -> Tensor:
        """All experts on expert-sorted rows # [S, I] -> [S, O].

        Two optional capabilities change the call. A container with `gathers_token_rows = True`
        is called `forward(x, plan, token_rows=True)` with the [T, I] token rows, to gather inside
        its first matmul (`gathered_linear`). Where `folds_row_weights()` returns True, grouped
        dispatch passes `row_weights=w` (w # [S], each row's combine weight) and expects every
        output row already multiplied by its weight. A container with `combined_forward(x,
        plan, combine_weights)` may return the combined [T, O] output itself (None: it cannot
        here, and the call above follows)."""
        ...

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        """One expert on its rows # [n, I] -> [n, O]."""
        ...

    def gated_forward(self, x: Tensor, gates: Tensor) -> Tensor:
        """sum_e gates[:, e] * expert_e(x) over all experts. x # [T, I], gates # [T, E] -> [T, O]."""
        ...


def plan_dispatch(routing: Routing) -> DispatchPlan:
    num_experts = routing.num_experts
    top_k = routing.expert_indices.shape[-1]
    slot_experts = routing.expert_indices.reshape(-1)  # [S]
    dropped = routing.kept is not None
    if dropped:
        # Dropped slots get the sentinel expert E, so the stable sort puts them last.
        slot_experts = torch.where(routing.kept.reshape(-1), slot_experts, num_experts)
    if use_triton(slot_experts) and num_experts < plan_kernels.MAX_BINS:
        # A counting sort: two kernels for what the torch sort and its bookkeeping take a dozen.
        parts = plan_kernels.sort_slots_triton(slot_experts, num_experts, top_k, dropped)
    else:
        parts = plan_kernels.sort_slots_reference(slot_experts, num_experts, top_k, dropped)
    segment_bounds = parts["segment_bounds"]  # [E + 1]
    return DispatchPlan(
        sorted_slots=parts["sorted_slots"],
        slot_rows=parts["slot_rows"],
        row_experts=parts["row_experts"],
        tokens_per_expert=parts["tokens_per_expert"],
        offsets=segment_bounds[1:],
        row_valid=(parts["row_experts"] < num_experts).unsqueeze(-1) if dropped else None,
        top_k=top_k,
        sorted_tokens=parts["sorted_tokens"],
        segment_bounds=segment_bounds,
    )


class _GatherTokenRows(torch.autograd.Function):
    """x_sorted[r] = x[sorted_tokens[r]]; backward sums each token's K slot gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, sorted_tokens: Tensor, slot_rows: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(slot_rows)
        ctx.top_k = top_k
        return spread_rows(x, slot_rows, sorted_tokens, top_k)

    @staticmethod
    def backward(ctx, grad_sorted: Tensor):
        (slot_rows,) = ctx.saved_tensors
        return _sum_slot_rows(grad_sorted, slot_rows, None, ctx.top_k), None, None, None


def _can_use_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    return grouped_mm_runs(x, (weight,))


def grouped_mm_runs(x: Tensor, weights: tuple[Tensor, ...]) -> bool:
    """Whether grouped_mm runs the expert matmuls of these [E, O, I] weights on x's device, so
    that `grouped_dispatch` reads no expert count to the host (it is then CUDA-graph safe)."""
    # The CUDA kernels want bf16 and 16-byte aligned rows; CPU's grouped_mm has no backward.
    return (
        _grouped_mm is not None
        and x.is_cuda
        and x.dtype == torch.bfloat16
        and all(w.dtype == torch.bfloat16 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0 for w in weights)
    )


def grouped_linear(
    x_sorted: Tensor, weight: Tensor, plan: DispatchPlan, bias: Tensor | None = None
) -> Tensor:
    """Row r of the result is x_sorted[r] @ weight[e].T (+ bias[e]) with e its expert.

    x_sorted # [S, I]; weight # [E, O, I] (nn.Linear layout per expert); bias # [E, O].
    Rows of dropped slots (after the last segment) come back as zeros.
    """
    counts = _segment_counts(x_sorted, weight, plan)
    # The kernel (QuACK, grouped_mm or a matmul per segment) is chosen in one place, _experts_mm.
    out = _ExpertsLinear.apply(*_matmul_operands(x_sorted, weight), plan.segment_bounds, counts)
    return _add_bias(out, bias, plan)


def gathered_linear(x: Tensor, weight: Tensor, plan: DispatchPlan, bias: Tensor | None = None) -> Tensor:
    """grouped_linear(plan.gather(x), weight, plan, bias), keeping x, not the gathered rows.

    x # [T, I] token rows; returns # [S, O]. Autograd would keep the [S, I] gathered rows for the
    weight gradient and hold them together with their own [S, I] gradient; here the backward
    gathers the rows again from x (one bandwidth pass) and reduces the rows' gradient to the
    tokens' right away (benchmarks/NOTES.md v14: the layer's peak memory is in this backward).
    """
    x, weight = _matmul_operands(x, weight)
    counts = _segment_counts(x, weight, plan)
    out = _GatheredLinear.apply(
        x, weight, plan.sorted_tokens, plan.slot_rows, plan.segment_bounds, plan.row_valid, plan.top_k, counts
    )
    return _add_bias(out, bias, plan)


def _segment_counts(x: Tensor, weight: Tensor, plan: DispatchPlan) -> tuple[int, ...] | None:
    """None where a grouped kernel runs the expert matmuls on device-side offsets (grouped_mm, or
    QuACK where `quack_gemm.usable`); else the host-side expert counts, for one matmul per
    contiguous segment (the `segments` backend, CPU, non-bf16 weights)."""
    if not plan.segments and _can_use_grouped_mm(x, weight):
        return None
    return tuple(plan.host_counts())


def _add_bias(out: Tensor, bias: Tensor | None, plan: DispatchPlan) -> Tensor:
    if bias is None:
        return out
    return out + bias[plan.row_experts.clamp(max=bias.shape[0] - 1)]


def _matmul_dtype(x: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype a matmul of x and weight would run in (autocast's, where it is on)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(x.dtype, weight.dtype)


def _matmul_operands(x: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
    """x and weight in the dtype a matmul of them would run in."""
    dtype = _matmul_dtype(x, weight)
    return x.to(dtype), weight.to(dtype)


def segment_linear(x_sorted: Tensor, weight: Tensor, counts: list[int] | tuple[int, ...]) -> Tensor:
    """grouped_linear with host-side segment lengths: one matmul per expert, written in place.

    x_sorted # [S, I] sorted by expert, counts[e] rows each (rows past sum(counts) give zeros);
    weight # [E, O, I] -> [S, O]. Follows autocast like a matmul would.
    """
    if len(counts) != weight.shape[0]:
        raise ValueError(f"segment_linear: {len(counts)} counts for {weight.shape[0]} experts")
    return _ExpertsLinear.apply(*_matmul_operands(x_sorted, weight), None, tuple(counts))


# The three matmuls of an expert-sorted linear, on QuACK or grouped_mm (counts None: the segment
# bounds on the device, [E + 1] from 0, whose tail is grouped_mm's `offs`) or one plain matmul per
# segment (host counts; rows past the segments get zeros).


def _experts_mm(x_sorted: Tensor, weight: Tensor, bounds: Tensor, counts: tuple[int, ...] | None) -> Tensor:
    """Row r: x_sorted[r] @ weight[e].T. # [S, I] x [E, O, I] -> [S, O]"""
    if counts is None:
        if quack_gemm.usable(weight, x_sorted):
            return quack_gemm.experts_mm(x_sorted, weight, bounds)
        return _grouped_mm(x_sorted, weight.transpose(-2, -1), offs=bounds[1:])
    out = x_sorted.new_empty(x_sorted.shape[0], weight.shape[-2])
    with torch.autocast(x_sorted.device.type, enabled=False):
        for expert, rows in _segments(counts):
            torch.mm(x_sorted[rows], weight[expert].t(), out=out[rows])
    out[sum(counts) :].zero_()  # dropped slots
    return out


def _experts_mm_grad_input(
    grad_out: Tensor, weight: Tensor, bounds: Tensor, counts: tuple[int, ...] | None
) -> Tensor:
    """Row r: grad_out[r] @ weight[e]. # [S, O] x [E, O, I] -> [S, I] (rows past the segments:
    zeros on the segment path, unwritten by the grouped kernels)"""
    if counts is None:
        if quack_gemm.usable(weight, grad_out):
            return quack_gemm.experts_mm_grad_input(grad_out, weight, bounds)
        return _grouped_mm(grad_out, weight, offs=bounds[1:])
    grad_x = grad_out.new_empty(grad_out.shape[0], weight.shape[-1])
    for expert, rows in _segments(counts):
        torch.mm(grad_out[rows], weight[expert], out=grad_x[rows])
    grad_x[sum(counts) :].zero_()
    return grad_x


def _experts_mm_grad_weight(
    grad_out: Tensor, x_sorted: Tensor, weight: Tensor, bounds: Tensor, counts: tuple[int, ...] | None
) -> Tensor:
    """Expert e: grad_out[segment e].T @ x_sorted[segment e]. -> [E, O, I] (zeros for empty experts)"""
    if counts is None:
        if quack_gemm.usable(weight, grad_out):
            return quack_gemm.experts_mm_grad_weight(grad_out, x_sorted, weight, bounds)
        return _grouped_mm(grad_out.t(), x_sorted, offs=bounds[1:])
    # Every expert's gradient is written once; only experts without rows need zeros
    # (zeros_like would clear all E x O x I first: 0.8 ms on the (8192, 4096, 14336) layer).
    grad_weight = torch.empty_like(weight)
    for expert, count in enumerate(counts):
        if not count:
            grad_weight[expert].zero_()
    for expert, rows in _segments(counts):
        torch.mm(grad_out[rows].t(), x_sorted[rows], out=grad_weight[expert])
    return grad_weight


class _ExpertsLinear(torch.autograd.Function):
    """x_sorted @ weight[e].T per segment, its backward the two matching expert matmuls: on QuACK
    (segment bounds on the device) or one plain matmul per segment into slices of one output (host
    counts: no split, no cat, no copy of the result)."""

    @staticmethod
    def forward(ctx, x_sorted: Tensor, weight: Tensor, bounds, counts: tuple[int, ...] | None) -> Tensor:
        ctx.save_for_backward(x_sorted, weight, bounds)
        ctx.counts = counts
        return _experts_mm(x_sorted, weight, bounds, counts)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x_sorted, weight, bounds = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = _experts_mm_grad_input(grad_out, weight, bounds, ctx.counts)
        if ctx.needs_input_grad[1]:
            grad_weight = _experts_mm_grad_weight(grad_out, x_sorted, weight, bounds, ctx.counts)
        return grad_x, grad_weight, None, None


def _gather_rows(
    x: Tensor, slot_rows: Tensor, sorted_tokens: Tensor, top_k: int, row_valid: Tensor | None
) -> Tensor:
    """x_sorted[r] = x[sorted_tokens[r]], zero for dropped rows."""
    return _zero_dropped(spread_rows(x, slot_rows, sorted_tokens, top_k), row_valid)


def _zero_dropped(rows: Tensor, row_valid: Tensor | None) -> Tensor:
    """Rows of dropped slots set to zero (row_valid # [S, 1], None when none is dropped): they
    must not feed garbage into the experts, nor their gradient, since grouped_mm leaves the rows
    past the last segment unwritten."""
    return rows if row_valid is None else torch.where(row_valid, rows, 0)


def _sum_slot_rows(grad_sorted: Tensor, slot_rows: Tensor, row_valid: Tensor | None, top_k: int) -> Tensor:
    """Each token's K row gradients summed (the gather's backward). # [S, I] -> [T, I]"""
    return gather_sum(_zero_dropped(grad_sorted, row_valid), slot_rows, None, top_k)


class _GatheredLinear(torch.autograd.Function):
    """out = experts_mm(gather(x)); the backward gathers again for the weight gradient, and turns
    the rows' input gradient into the tokens' before anything else is allocated."""

    @staticmethod
    def forward(ctx, x, weight, sorted_tokens, slot_rows, bounds, row_valid, top_k, counts):
        ctx.save_for_backward(x, weight, sorted_tokens, slot_rows, bounds, row_valid)
        ctx.top_k, ctx.counts = top_k, counts
        if counts is None and quack_gemm.usable(weight, x, rows=sorted_tokens.shape[0]):
            # QuACK gathers the token rows in its loads: no [S, I] copy, forward or kept. Dropped
            # rows sit past the last segment, so they are not computed, as with grouped_mm.
            return quack_gemm.experts_mm(x, weight, bounds, token_rows=sorted_tokens)
        x_sorted = _gather_rows(x, slot_rows, sorted_tokens, top_k, row_valid)
        return _experts_mm(x_sorted, weight, bounds, counts)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight, sorted_tokens, slot_rows, bounds, row_valid = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        grad_x = grad_weight = None
        if ctx.needs_input_grad[1]:
            x_sorted = _gather_rows(x, slot_rows, sorted_tokens, ctx.top_k, row_valid)
            grad_weight = _experts_mm_grad_weight(grad_out, x_sorted, weight, bounds, ctx.counts)
            del x_sorted
        if ctx.needs_input_grad[0]:
            grad_sorted = _experts_mm_grad_input(grad_out, weight, bounds, ctx.counts)
            grad_x = _sum_slot_rows(grad_sorted, slot_rows, row_valid, ctx.top_k)
        return grad_x, grad_weight, None, None, None, None, None, None


def combined_glu(
    x: Tensor, gate_up_proj: Tensor, down_proj: Tensor, plan: DispatchPlan, combine_weights: Tensor
) -> Tensor | None:
    """The combined output of SwiGLU experts, sum_k w[t, k] * down(silu(gate) * up)(x_t) over each
    token's slots, with the SwiGLU inside QuACK's gated GEMM epilogue; None where that path does not
    run (no QuACK, off Hopper, small or unaligned problems, dropped rows, VLMOE_QUACK_FUSED=0).

    x # [T, I]; gate_up_proj # [E, 2F, I] ([gate; up]); down_proj # [E, I, F]; combine_weights
    # [T, K]. Returns # [T, I].
    """
    # Decided before casting: under autocast a cast copies the weights, and the path taken
    # otherwise (`GLUExperts.forward`) makes its own.
    dtype = _matmul_dtype(x, gate_up_proj)
    rows = plan.sorted_tokens.shape[0]
    if not (
        quack_gemm.FUSE_SWIGLU
        and plan.row_valid is None
        and not plan.segments
        and quack_gemm.usable(gate_up_proj, x, rows=rows, dtype=dtype)
        and quack_gemm.usable(down_proj, x, rows=rows, dtype=dtype)
    ):
        return None
    return _CombinedGLU.apply(
        x.to(dtype), gate_up_proj.to(dtype), down_proj.to(dtype), combine_weights, plan.sorted_tokens,
        plan.slot_rows, plan.sorted_slots, plan.segment_bounds, plan.top_k,
    )  # fmt: skip


class _CombinedGLU(torch.autograd.Function):
    """SwiGLU experts and the weighted combine as one function, the SwiGLU in QuACK's gated GEMM.

    Forward: preact (gate and up paired in adjacent columns) and hidden = silu(gate) * up from
    one gathered GEMM, y = hidden @ down, out = sum_k w * y over each token's rows. Saved: x and
    preact; hidden and y are not kept. Backward: the output gradient gathered to the rows, its
    product with down, then one Triton pass (`swiglu_pairs_backward`) gives preact's gradient
    (written over preact), w's gradient and w * hidden for down's weight gradient; the other
    three matmuls read the paired columns through QuACK's concat_layout. With
    `quack_gemm.fuse_swiglu_backward` (by default for small experts, F <= 2048) the product and
    that pass are one GEMM, QuACK's dgated epilogue (`experts_swiglu_backward`, NOTES.md v27).
    Small experts' problems also tune among the extra tiles (`quack_gemm.SMALL_EXPERTS_FF`).
    `quack_gemm.backward_gathers` (a probe, NOTES.md v31) reads x and the output gradient in the
    backward GEMMs' loads instead of copying them to expert order."""

    @staticmethod
    def forward(
        ctx,
        x,
        gate_up_proj,
        down_proj,
        combine_weights,
        sorted_tokens,
        slot_rows,
        sorted_slots,
        bounds,
        top_k,
    ):
        small = quack_gemm.is_small_experts(down_proj)  # the rule's tiles for each GEMM of the layer
        if quack_gemm.GATHER_IN_LOADS:
            preact, hidden = quack_gemm.experts_swiglu(
                x, gate_up_proj, bounds, sorted_tokens, small_experts=small
            )
        else:  # the probe: [S, I] rows for one GEMM, the size of y_sorted below, so no higher peak
            x_sorted = _gather_rows(x, slot_rows, sorted_tokens, top_k, None)
            preact, hidden = quack_gemm.experts_swiglu(
                x_sorted, gate_up_proj, bounds, None, small_experts=small
            )
            del x_sorted
        y_sorted = quack_gemm.experts_mm(hidden, down_proj, bounds, small_experts=small)
        del hidden
        weights = combine_weights.float().contiguous()  # [T, K]
        out = gather_sum(y_sorted, slot_rows, weights, top_k)
        # The weights stay in slot order: the backward's kernel reads each row's at its slot.
        slot_weights = weights.view(-1)  # [S]
        ctx.save_for_backward(
            x, gate_up_proj, down_proj, preact, slot_weights, sorted_tokens, slot_rows, sorted_slots, bounds
        )
        ctx.top_k, ctx.weights_dtype = top_k, combine_weights.dtype
        # preact is ours alone: its memory can take its gradient (as the SwiGLU kernel's backward).
        ctx.overwrite = swiglu_kernels.OVERWRITE_IN_BACKWARD and not torch.compiler.is_compiling()
        ctx.overwritten = False
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.overwritten:
            raise RuntimeError(
                "a second backward through vlmoe's fused SwiGLU experts (retain_graph=True?): the "
                "first one wrote its gradient over the saved preact to save memory. To backward "
                "twice, set vlmoe.moe.kernels.swiglu.OVERWRITE_IN_BACKWARD = False before the forward"
            )
        x, gate_up_proj, down_proj, preact, slot_weights, sorted_tokens, slot_rows, sorted_slots, bounds = (
            ctx.saved_tensors
        )
        small = quack_gemm.is_small_experts(down_proj)
        if ctx.overwrite:
            ctx.overwritten = True
        needs_x, needs_gate_up, needs_down, needs_weights = ctx.needs_input_grad[:4]
        # The output gradient in expert order, or (BACKWARD_GATHER "all") read in place by the two
        # GEMMs that take it, at the rows' tokens (`grad_tokens`).
        gathers = quack_gemm.BACKWARD_GATHER
        if gathers == "all":  # QuACK's varlen-M A must be k-major (an expanded gradient is not)
            grad_rows, grad_tokens = grad_out.contiguous(), sorted_tokens
        else:
            grad_rows, grad_tokens = _gather_rows(grad_out, slot_rows, sorted_tokens, ctx.top_k, None), None
        out = preact if ctx.overwrite else None
        if quack_gemm.fuse_swiglu_backward(down_proj):  # the SwiGLU's gradient in the GEMM's epilogue
            row_weights = slot_weights.index_select(0, sorted_slots)  # [S], expert order
            grad_preact, scaled_hidden, grad_row_weights = quack_gemm.experts_swiglu_backward(
                grad_rows,
                down_proj,
                preact,
                row_weights,
                bounds,
                out=out,
                token_rows=grad_tokens,
                small_experts=small,
            )
            # Every slot holds one row here (no dropped rows on this path).
            grad_slot_weights = torch.empty_like(slot_weights).index_copy_(0, sorted_slots, grad_row_weights)
        else:
            grad_hidden = quack_gemm.experts_mm_grad_input(
                grad_rows, down_proj, bounds, token_rows=grad_tokens, small_experts=small
            )
            grad_preact, grad_slot_weights = swiglu_kernels.swiglu_pairs_backward(
                preact, grad_hidden, slot_weights, sorted_slots, out=out
            )  # grad_hidden # [S, F]
            scaled_hidden = grad_hidden  # overwritten with w * hidden by the pass above
            del grad_hidden
        del preact, out
        grad_x = grad_gate_up = grad_down = grad_weights = None
        if needs_down:
            grad_down = quack_gemm.experts_mm_grad_weight(
                grad_rows, scaled_hidden, down_proj, bounds, token_rows=grad_tokens, small_experts=small
            )
        del grad_rows, scaled_hidden
        if needs_gate_up and gathers != "none":  # x read in place, gathered along K
            grad_gate_up = quack_gemm.experts_mm_grad_weight_gathered_x(
                grad_preact, x, sorted_tokens, gate_up_proj, bounds, interleaved=True, small_experts=small
            )
        elif needs_gate_up:
            x_sorted = _gather_rows(x, slot_rows, sorted_tokens, ctx.top_k, None)
            grad_gate_up = quack_gemm.experts_mm_grad_weight(
                grad_preact, x_sorted, gate_up_proj, bounds, interleaved=True, small_experts=small
            )
            del x_sorted
        if needs_x:
            grad_sorted = quack_gemm.experts_mm_grad_input(
                grad_preact, gate_up_proj, bounds, interleaved=True, small_experts=small
            )
            del grad_preact
            grad_x = _sum_slot_rows(grad_sorted, slot_rows, None, ctx.top_k)
        if needs_weights:
            grad_weights = grad_slot_weights.view(-1, ctx.top_k).to(ctx.weights_dtype)
        return grad_x, grad_gate_up, grad_down, grad_weights, None, None, None, None, None


def _segments(counts: tuple[int, ...]):
    """(expert, row slice) of every non-empty segment of expert-sorted rows."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, slice(start, start + count)
        start += count


def grouped_dispatch(x: Tensor, routing: Routing, experts: Experts, segments: bool = False) -> Tensor:
    """Sorted-segment dispatch. x # [T, I] -> [T, O]. `segments`: every expert matmul a plain
    one on the expert counts read to the host (the `segments` backend)."""
    top_k = routing.expert_indices.shape[-1]
    plan = plan_dispatch(routing)
    plan.segments = segments
    combined_forward = getattr(experts, "combined_forward", None)
    if combined_forward is not None:
        out = combined_forward(x, plan, routing.combine_weights)
        if out is not None:
            return out  # [T, O]
    # Containers that gather inside their first matmul (`gathered_linear`) take the token rows.
    if getattr(experts, "gathers_token_rows", False):
        rows, extra = x, {"token_rows": True}
    else:
        rows, extra = plan.gather(x), {}
    folds = getattr(experts, "folds_row_weights", None)
    if plan.row_valid is None and folds is not None and folds():
        # The experts scale each row by its combine weight inside a pass they make anyway
        # (GLUExperts' SwiGLU), so the combine is a plain sum whose backward needs nothing of the
        # forward: the [S, O] expert output is not kept for the weights' gradient.
        row_weights = _PermuteRows.apply(
            routing.combine_weights.reshape(-1), plan.sorted_slots, plan.slot_rows
        )
        y_sorted = experts(rows, plan, row_weights=row_weights, **extra)  # [S, O], already weighted
        return sum_sorted(y_sorted, plan.slot_rows, plan.sorted_tokens, top_k)  # [T, O]
    y_sorted = _zero_dropped(experts(rows, plan, **extra), plan.row_valid)  # [S, O]
    # Per token, the weighted sum of its K rows, read in place from the sorted output.
    return combine_sorted(y_sorted, routing.combine_weights, plan.slot_rows, plan.sorted_slots)  # [T, O]


class _PermuteRows(torch.autograd.Function):
    """values[order] with the inverse permutation's gather as backward (index_select's own
    backward would scatter-add)."""

    @staticmethod
    def forward(ctx, values: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return values.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def reference_dispatch(x: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """Per-expert loop. x # [T, I] -> [T, O]. Slow and obviously right."""
    chosen = routing.expert_indices
    valid = torch.ones_like(chosen, dtype=torch.bool) if routing.kept is None else routing.kept
    out: Tensor | None = None
    for expert in range(experts.num_experts):
        token_idx, choice = torch.where((chosen == expert) & valid)
        y = experts.expert_forward(expert, x[token_idx])  # [n, O]
        if out is None:
            out = x.new_zeros(x.shape[0], y.shape[-1], dtype=y.dtype)
        weight = routing.combine_weights[token_idx, choice].to(y.dtype).unsqueeze(-1)
        out = out.index_add(0, token_idx, y * weight)
    assert out is not None  # num_experts >= 1 is validated by RouterConfig
    return out


def gate_matrix(routing: Routing) -> Tensor:
    """The combine weights scattered into a [T, E] matrix (zero for unchosen or dropped)."""
    weights = routing.combine_weights
    if routing.kept is not None:
        weights = weights * routing.kept
    gates = weights.new_zeros(weights.shape[0], routing.num_experts)
    # scatter_add, not scatter: a forced expert can fill several slots of one token.
    return gates.scatter_add(1, routing.expert_indices, weights)


def dense_dispatch(x: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """Every expert on every token, masked by the gates. x # [T, I] -> [T, O]."""
    return experts.gated_forward(x, gate_matrix(routing).to(x.dtype))


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, x: Tensor, experts: Experts) -> str:
    if check_backend(backend) != "auto":
        return backend
    if not x.is_cuda:
        return "reference"
    total_rank = getattr(experts, "rank", None)
    if total_rank is not None and total_rank * experts.num_experts <= DENSE_MAX_TOTAL_RANK:
        return "dense"
    return "grouped"


def decode_dispatch(x: Tensor, routing: Routing, experts: Experts) -> Tensor:
    """Each token's chosen experts, read in place without a sort. x # [T, I] -> [T, O].

    Needs experts with a `decode_forward` (GLUExperts) and autograd off: it has no backward.

    Example:
        >>> from vlmoe.moe import GLUExperts, Routing
        >>> experts = GLUExperts(4, 8, 16, torch.nn.SiLU())
        >>> probs = torch.full((2, 4), 0.25)
        >>> routing = Routing(torch.tensor([[0, 3], [2, 1]]), torch.full((2, 2), 0.5), probs, probs.log())
        >>> x = torch.randn(2, 8)
        >>> with torch.no_grad():
        ...     fast = decode_dispatch(x, routing, experts)
        ...     torch.allclose(fast, reference_dispatch(x, routing, experts), atol=1e-6)
        True
    """
    decode_forward = getattr(experts, "decode_forward", None)
    if decode_forward is None:
        raise ValueError(f"backend='decode' supports GLUExperts, not {type(experts).__name__}; use 'grouped'")
    if torch.is_grad_enabled():
        raise ValueError(
            "backend='decode' has no backward: run it under torch.no_grad() or torch.inference_mode(), "
            "or use backend='auto' (which picks it only there)"
        )
    # Dropped slots (capacity) already carry weight 0 in combine_weights.
    return decode_forward(x, routing.expert_indices, routing.combine_weights)


def _auto_decodes(experts: Experts, num_tokens: int, dropping: bool) -> bool:
    return (
        hasattr(experts, "decode_forward")
        and not dropping
        and not torch.is_grad_enabled()
        and num_tokens <= DECODE_MAX_TOKENS
    )


def chosen_backend(backend: str, x: Tensor, experts: Experts, dropping: bool = False) -> str:
    """The backend `dispatch` runs for the tokens of x # [..., I] (`dropping`: the capacity
    limit drops some slots); asked before routing by a layer that replays graphs."""
    chosen = resolve_backend(backend, x, experts)
    num_tokens = x.shape[:-1].numel()
    if chosen == "grouped" and backend == "auto" and _auto_decodes(experts, num_tokens, dropping):
        return "decode"
    return chosen


def dispatch(x: Tensor, routing: Routing, experts: Experts, backend: str = "auto") -> Tensor:
    """Run `experts` on the token-slots chosen by `routing` and combine. x # [T, I] -> [T, O]."""
    chosen = chosen_backend(backend, x, experts, dropping=routing.kept is not None)
    if chosen == "decode":
        return decode_dispatch(x, routing, experts)
    if chosen in ("grouped", "segments"):
        return grouped_dispatch(x, routing, experts, segments=chosen == "segments")
    if chosen == "dense":
        return dense_dispatch(x, routing, experts)
    return reference_dispatch(x, routing, experts)
