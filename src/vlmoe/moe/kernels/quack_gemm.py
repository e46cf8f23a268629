"""The expert matmuls on QuACK's varlen GEMMs (PyPI `quack-kernels`, CuTe DSL), where installed.

torch's grouped_mm runs one CUTLASS tile (128x256, cooperative) for every large problem; on the
expert matmuls that is 0.71-1.05 of one cuBLAS matmul of the same FLOPs, lowest where K is short.
QuACK's persistent pingpong kernels run the same grouped problems at 0.84-1.16
(benchmarks/quack_gemm.py, NOTES.md v16), and its varlen-M GEMM can gather A's rows in its
loads, so the first expert matmul reads the token rows in place instead of a gathered [S, I]
copy. QuACK installs beside the user's torch (`pip install vlmoe[quack]`); without it, or off
Hopper, grouped_mm runs as before.

Three problems, each over expert-sorted rows with cu_seqlens = [0, offsets...] on the device
(no host synchronisation; the functions take it as `bounds`):
- forward        out[r] = x[r] @ W[e].T       varlen-M, A = x_sorted, or A = x with A_idx
- input gradient g_x[r] = g[r] @ W[e]         varlen-M
- weight grad.   g_W[e] = g[seg e].T @ x[seg e]  varlen-K
And `experts_swiglu`, the first GEMM of GLU experts with the SwiGLU in its epilogue (SonicMoE's
forward, NOTES.md v17), and `experts_swiglu_backward`, the backward's first GEMM with the
SwiGLU's gradient in its epilogue (SonicMoE's backward, v27), for their whole FFN in one
autograd function (`dispatch.combined_glu`).
QuACK's gated epilogue pairs gate and up in adjacent columns: preact and its gradient come with
gate j in column 2j and up j in column 2j + 1, while the weights keep the [gate; up] stacking
of GLUExperts; QuACK's `concat_layout` maps one onto the other in the loads and stores.

Under torch.compile each of these functions is one custom op of the graph (`vlmoe::quack_*`)
whose body is the eager call, so a compiled model runs the tuned tiles too.

Each problem shape picks among a few tile configurations by timing them once on its first call
(a few seconds, kernels compiled by QuACK once per configuration), remembered in-process and in
`$VLMOE_CACHE_DIR/quack_gemm.json` (default ~/.cache/vlmoe) across runs. A problem's candidate
kernels compile side by side, on QuACK's pool of CPU compile workers (`_compile_candidates`);
a candidate QuACK cannot run for a problem is left out of its timing, with a warning.
Switches: `VLMOE_QUACK=0` turns this path off; `VLMOE_QUACK_TUNE=0` keeps QuACK's default
configuration; `VLMOE_QUACK_FUSED=0` keeps the SwiGLU out of the GEMM (its own Triton pass, as
before v17); `VLMOE_QUACK_FUSED_BACKWARD=1` / `0` puts its gradient into the backward's GEMM
(v27) for every layer or for none, where by default small experts (`SMALL_EXPERTS_FF`) take it;
`VLMOE_QUACK_SMALL_EXPERTS_FF=0` turns that rule off; `backward_gathers()` (a probe) has the
backward read token rows in the GEMMs' loads instead of copying them to expert order;
`VLMOE_QUACK_PARALLEL_COMPILE=0` compiles the candidates one after another here;
`VLMOE_QUACK_PROGRESS=1` / `0` shows or hides the tuning's progress bars (default: where their
console, stderr or a training run's, is a terminal).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

ENABLED = os.environ.get("VLMOE_QUACK", "1") != "0"
# The SwiGLU in the first GEMM's epilogue for GLU experts (`dispatch.combined_glu`); off: the
# expert matmuls on QuACK and the SwiGLU in its own Triton pass, as before v17.
FUSE_SWIGLU = os.environ.get("VLMOE_QUACK_FUSED", "1") != "0"
# Their backward's first GEMM with the SwiGLU's gradient in its epilogue (QuACK's dgated, as
# SonicMoE's backward; `experts_swiglu_backward`, NOTES.md v27); off: the plain GEMM and then
# the Triton pairs pass (`swiglu.swiglu_pairs_backward`), as v17 to v26. None (the default): by
# the small-experts rule below. VLMOE_QUACK_FUSED_BACKWARD=1 / 0 sets it for every layer.
_fused_backward_env = os.environ.get("VLMOE_QUACK_FUSED_BACKWARD")
FUSE_SWIGLU_BACKWARD: bool | None = None if _fused_backward_env is None else _fused_backward_env == "1"
# The small-experts rule (NOTES.md session 19): SwiGLU experts whose FFN width F is at most this
# take the dgated backward and tune each of their problems among CANDIDATES + MORE_CANDIDATES.
# At the 64-expert shape (F = 1408) the two together gained 2.3-4.1% in four H200 calls
# (s17-run1/2, s19-run1/2); at F = 5632 the extra tiles alone lost 2% (s17, s18) and at 14336
# the pair read 0.994. 0 turns the rule off (VLMOE_QUACK_SMALL_EXPERTS_FF=0).
SMALL_EXPERTS_FF = int(os.environ.get("VLMOE_QUACK_SMALL_EXPERTS_FF", "2048"))
WIDE_KEY = "wide"  # a key part: tuned among the extra candidates by the rule (saved, unlike `more`)
TUNE = os.environ.get("VLMOE_QUACK_TUNE", "1") != "0"
# A problem's candidate kernels compile side by side on QuACK's CPU worker processes (NOTES.md v26).
PARALLEL_COMPILE = os.environ.get("VLMOE_QUACK_PARALLEL_COMPILE", "1") != "0"
# The gated GEMM gathers the token rows in its loads (False: `rows_spread_first`).
GATHER_IN_LOADS = True
# Where the fused SwiGLU experts' backward reads token rows in place (QuACK's gather on A) instead
# of from a gathered [S, I] copy, a probe (`backward_gathers`, NOTES.md v31). "none": both copies
# are made, as v17 to v30. "x": gate_up's weight gradient is computed as its transpose,
# x[rows].T @ grad_preact, with x gathered along K, so x is not copied to expert order again.
# "all": besides, the output gradient is read in place by the backward's first GEMM (varlen-M
# gather) and by down's weight gradient (varlen-K gather): no [S, O] copy of it either. At the
# 64-expert shape those GEMMs ran 0.963x / 0.931x the copies and theirs at full clock, and the
# layer 1.000x / 0.996x at the power cap (s22-run1/2): a gathered A loads by cp.async, not TMA.
BACKWARD_GATHERS = ("none", "x", "all")
BACKWARD_GATHER = "none"
# Below this many rows a problem is launch-bound (QuACK's host path is the heavier one) and was
# not measured; grouped_mm keeps it. Decoding steps stay there.
MIN_ROWS = 1024
# Measured on expert FFN matmuls only (every dimension >= 1408); low-rank (LoRA) factors, whose
# narrow side fits one tile, stay on grouped_mm, whose small-problem tile suits them.
MIN_DIM = 256

# (tile_m, tile_n, cluster_m, cluster_n, pingpong[, max_swizzle_size]). The first is QuACK's
# SM90 default and the choice wherever nothing was timed (tuning off, a first call under
# CUDA-graph capture). The others were the fastest on some of the layer's GEMMs in a sweep of QuACK's SM90
# tile space on the H200 (`benchmarks/quack_fused_ops.py --tiles`, NOTES.md v18; in the layer
# they gain 2-3 points at the 8 x 14336 shape, within noise elsewhere); the last is the default
# tile scheduled without swizzling. A swizzle is a launch argument, not a compile: four kernels
# to compile per problem.
CANDIDATES: tuple[tuple, ...] = (
    (128, 192, 2, 1, True),
    (128, 256, 1, 2, False),
    (256, 128, 1, 2, False),
    (128, 192, 1, 2, True),
    (128, 192, 2, 1, True, 1),
)
# Tiles QuACK's own autotuner chose for SonicMoE's GEMMs at the 64-expert shape that the
# candidates above lack (s16-run5, NOTES.md session 16): 128x256 cooperative 2x1, the widest a
# gather can take; 192x128 pingpong 1x2; 256x160 cooperative 2x1; 128x128 pingpong 2x1, whose
# N divides F = 1408 (and 5632, 14336). In the layer they gained 2-4% at the 64-expert shape
# and lost 2% at the 4-expert one (s17-run1/2), so they are candidates only for small experts
# (`SMALL_EXPERTS_FF`); `more_tiles()` adds them for every problem, for an A/B reading
# (`benchmarks/moe_layer.py --probe more`).
MORE_CANDIDATES: tuple[tuple, ...] = (
    (128, 256, 2, 1, False),
    (192, 128, 1, 2, True),
    (256, 160, 2, 1, False),
    (128, 128, 2, 1, True),
)
# Tiles one kind of call times besides CANDIDATES. The dgated GEMM (`experts_swiglu_backward`)
# chose 128x128 pingpong 2x1 at all three reference shapes whenever it could (s17-run1), where
# SonicMoE's dgated GEMM ran 1.30 ms against 2.07 on 128x192 (s16-run5).
OP_CANDIDATES: dict[str, tuple[tuple, ...]] = {"dgated": ((128, 128, 2, 1, True),)}
MORE = False
MORE_KEY = "more"  # the last part of a key tuned among the extra candidates too
# Tiles of a finer row block, a probe (`row_tiles`, `benchmarks/moe_layer.py --probe rows`).
# QuACK's varlen-M scheduler hands each expert whole blocks of tile_m x cluster_m rows, so an
# expert's last block is on average half padding: at the 64-expert shape (~1536 rows an
# expert) 9.6% of the rows computed are padding with 256-row blocks (128-row tiles in 2x1
# clusters), 7.2% with 192, 4.8% with 128, 2.3% with 64 (s21-run1's routing). These two keep a
# 2-CTA cluster's multicast on a 128-row block: 64 x 256 pingpong in 2x1 (SM90 pingpong takes
# tile_m 64) and 128 x 128 pingpong in 1x2. They won three of that shape's five varlen-M GEMMs
# in one H200 sweep (s21-run1) and none in the next (s21-run2, a fresh machine), and tuned
# among by the layer's varlen-M problems they read 0.995x in steady blocks (s21-run2): the
# padding is not where the time goes (NOTES.md v30). 64-row tiles without an M cluster (64-row
# blocks) ran 10-60% slower, each CTA loading all of B for 64 rows.
ROW_TILES: tuple[tuple, ...] = (
    (64, 256, 2, 1, True),
    (128, 128, 1, 2, True),
)
FINE_ROWS = False
FINE_ROWS_KEY = "rows"
# How a problem's candidates are timed: by default one call per candidate per round, 7 rounds,
# right after their kernels compiled (the GPU idle meanwhile, so at ~1980 MHz on an H200). In a
# training loop the same kernels run at the power cap, 700 W and ~1450-1550 MHz (s18-run1,
# `benchmarks/clocks.py`), so `tuning_in_steady_spans` times them that way instead: STEADY_WARMUP_MS
# of back-to-back calls to settle the clocks, then STEADY_ROUNDS interleaved rounds of one
# STEADY_SPAN_MS span of back-to-back calls per candidate. A probe, not the default: its choices
# lost 4.6% in the layer at the 4-expert shape and tied elsewhere (s18-run2, NOTES.md v28).
BURST_ROUNDS = 7
STEADY = False
STEADY_KEY = "steady"
STEADY_WARMUP_MS = 200.0
STEADY_SPAN_MS = 10.0
STEADY_ROUNDS = 5
# `in_step_probe`: keys of their own for a layer tuned by `step_tuning.tune_in_step` beside the
# shipped one in a benchmark (kept in this process, like the two probes above).
IN_STEP = False
IN_STEP_KEY = "instep"
# A transient rich progress bar for each problem tuned on first use (its kernels ready, then its
# timing rounds), so the half minute a first step can take reads as work, not a hang; "auto"
# (the default): where its console (`progress_console`) is a terminal. VLMOE_QUACK_PROGRESS=1 / 0
# forces it.
PROGRESS = os.environ.get("VLMOE_QUACK_PROGRESS", "auto")
logger = logging.getLogger(__name__)
_chosen: dict[str, int] = {}
# Per problem key tuned in this process: seconds compiling (or loading) its candidates and
# timing them, and how many were handed to QuACK's compile workers (`tuning_seconds`).
_tuning_log: dict[str, dict[str, Any]] = {}
_announced = False
_compile_server_started = False
# What the compile server imports before workers fork from it: vlmoe.compile_server ties the
# server's and its workers' lives to this process's, then runs QuACK's own preload (torch, the
# CUTLASS DSL; what quack.cache.async_compile._make_executor names).
COMPILE_SERVER_PRELOAD: tuple[str, ...] = ("vlmoe.compile_server",)
# Why the compile pool is off for the rest of the process (it could not start or take work).
_pool_unusable: str | None = None
# Held by the thread handing kernels to QuACK's pool: that pool is process-wide, so one thread
# at a time may have it active (`_compile_candidates`).
_pool_lock = threading.Lock()
_disk_loaded = False
_available: bool | None = None
# While `recording_problems` is open: each problem key a call tunes under -> the candidates it
# may take in a step (the chosen one first), their kernels compiled (`_record_problem`).
_recording: dict[str, list[int]] | None = None
_recording_more = False


def available() -> bool:
    """QuACK importable and a Hopper GPU present (the architecture its configs here were measured on)."""
    global _available
    if _available is None:
        _available = _probe()
    return _available


# A constant to torch.compile: evaluated once at trace time, no graph break.
@torch.compiler.assume_constant_result
def _probe() -> bool:
    try:
        import quack.gemm_interface  # noqa: F401
    except Exception:  # not installed, or its CUDA libraries do not load here
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def usable(weight: Tensor, x: Tensor, rows: int | None = None, dtype: torch.dtype | None = None) -> bool:
    """Whether an expert matmul of weight # [E, O, I] with x (the rows, or the token rows to
    gather `rows` rows from) runs on QuACK. `dtype`: the one both are cast to for the matmul
    (autocast's), asked before casting; by default their own, which must agree."""
    return (
        ENABLED
        and x.is_cuda
        and (x.shape[0] if rows is None else rows) >= MIN_ROWS
        and (dtype is not None or x.dtype == weight.dtype)
        and (x.dtype if dtype is None else dtype) == torch.bfloat16  # where grouped_mm runs; what is tested
        and weight.shape[-1] % 8 == 0  # 16-byte aligned rows for the TMA loads
        and weight.shape[-2] % 8 == 0
        and min(weight.shape[-2:]) >= MIN_DIM
        and available()
    )


@contextlib.contextmanager
def _switched(name: str, value: bool) -> Iterator[None]:
    """This module's switch `name` set to `value` inside the block, restored after."""
    saved = globals()[name]
    globals()[name] = value
    try:
        yield
    finally:
        globals()[name] = saved


def disabled() -> contextlib.AbstractContextManager[None]:
    """grouped_mm for the expert matmuls inside this block (a baseline, or a workaround)."""
    return _switched("ENABLED", False)


def rows_spread_first() -> contextlib.AbstractContextManager[None]:
    """Inside this block the fused SwiGLU experts copy the token rows to expert order first
    (`combine.spread_rows`) and the gated GEMM loads them with TMA, where every tile candidate
    may run (QuACK's gather in the loads takes cluster_n 1 only). A probe: `moe_layer.py` times
    it beside the shipped gather in the loads; one H200 call read no consistent gain (NOTES.md,
    session 11), so the gather in the loads stays the default."""
    return _switched("GATHER_IN_LOADS", False)


def more_tiles() -> contextlib.AbstractContextManager[None]:
    """Inside this block each problem tunes among CANDIDATES and MORE_CANDIDATES, under keys of
    their own that stay in this process (a probe for `moe_layer.py --probe more`)."""
    return _switched("MORE", True)


def row_tiles() -> contextlib.AbstractContextManager[None]:
    """Inside this block varlen-M problems tune among ROW_TILES (128-row blocks, less padding at each
    expert's end) besides their usual candidates, under keys of their own that stay in this
    process (`moe_layer.py --probe rows`)."""
    return _switched("FINE_ROWS", True)


def tuning_in_steady_spans() -> contextlib.AbstractContextManager[None]:
    """Inside this block a problem times its candidates in spans of back-to-back calls after a
    warm-up (at the clocks a GPU keeps under sustained load, `_steady_times`), under keys of its
    own that stay in this process (`moe_layer.py --probe steady`)."""
    return _switched("STEADY", True)


def in_step_probe() -> contextlib.AbstractContextManager[None]:
    """Inside this block problems tune under keys of their own that stay in this process, so a
    benchmark can tune a layer in its step (`step_tuning.tune_in_step`) and time it beside the
    shipped one (`moe_layer.py --probe instep`)."""
    return _switched("IN_STEP", True)


@contextlib.contextmanager
def recording_problems(extra_tiles: bool = True) -> Iterator[dict[str, list[int]]]:
    """Inside this block each tuned problem a call meets is recorded: its key -> the candidates
    it may take (CANDIDATES, with `extra_tiles` MORE_CANDIDATES too, and its op's own; the one
    chosen now first, those QuACK cannot run left out), each kernel compiled on the call's
    operands. What `step_tuning.tune_in_step` times inside the step. Problems met under CUDA-graph
    capture are not recorded (nothing is timed there)."""
    global _recording, _recording_more
    if _recording is not None:
        raise RuntimeError("recording_problems() is already open (one recording at a time)")
    problems: dict[str, list[int]] = {}
    _recording, _recording_more = problems, extra_tiles
    try:
        yield problems
    finally:
        _recording, _recording_more = None, False


def swiglu_backward_fused(on: bool | None = True) -> contextlib.AbstractContextManager[None]:
    """Inside this block the fused SwiGLU experts' backward takes the SwiGLU's gradient in its
    first GEMM's epilogue (`experts_swiglu_backward`) if `on`, else in the Triton pairs pass;
    None: by the small-experts rule (`SMALL_EXPERTS_FF`)."""
    return _switched("FUSE_SWIGLU_BACKWARD", on)


def is_small_experts(down_proj: torch.Tensor) -> bool:
    """Whether SwiGLU experts with this down projection (# [E, I, F]) fall under the small-experts
    rule: F at most `SMALL_EXPERTS_FF`."""
    return down_proj.shape[-1] <= SMALL_EXPERTS_FF


def fuse_swiglu_backward(down_proj: torch.Tensor) -> bool:
    """Whether these SwiGLU experts' backward takes the dgated GEMM: `FUSE_SWIGLU_BACKWARD` where
    set, else the small-experts rule."""
    if FUSE_SWIGLU_BACKWARD is not None:
        return FUSE_SWIGLU_BACKWARD
    return is_small_experts(down_proj)


def small_experts_rule(on: bool = True) -> contextlib.AbstractContextManager[None]:
    """Inside this block the small-experts rule applies (at its default width) if `on`, else to no
    layer: the layer as before session 19 (`moe_layer.py --probe norule`)."""
    return _switched("SMALL_EXPERTS_FF", 2048 if on else 0)


def backward_gathers(mode: str = "x") -> contextlib.AbstractContextManager[None]:
    """Inside this block the fused SwiGLU experts' backward gathers token rows in the GEMMs' loads
    as `mode` says (`BACKWARD_GATHER`: "none", "x" or "all"; `moe_layer.py --probe kgather`)."""
    if mode not in BACKWARD_GATHERS:
        raise ValueError(f"backward_gathers: mode must be one of {BACKWARD_GATHERS}, got {mode!r}")
    return _switched("BACKWARD_GATHER", mode)


def swiglu_unfused() -> contextlib.AbstractContextManager[None]:
    """QuACK's plain GEMMs with the SwiGLU in its own pass inside this block (the pre-v17 path)."""
    return _switched("FUSE_SWIGLU", False)


def cu_seqlens(offsets: Tensor) -> Tensor:
    """[E] segment ends -> [E + 1] int32 boundaries starting at 0, the `bounds` every function
    here takes (a plan computes them once: `DispatchPlan.segment_bounds`)."""
    return torch.nn.functional.pad(offsets.to(torch.int32), (1, 0))


def _gather_index(token_rows: Tensor | None) -> Tensor | None:
    """QuACK's A_idx for rows read at `token_rows` (int32, as its gather takes), None for none."""
    return None if token_rows is None else token_rows.to(torch.int32)


def _rows(x: Tensor, token_rows: Tensor | None) -> int:
    """The rows a varlen-M GEMM computes: x's own, or one per token row it gathers."""
    return x.shape[0] if token_rows is None else token_rows.shape[0]


def _one_op_under_compile(fake: Callable[..., Any]) -> Callable[[Callable[..., Any]], Any]:
    """The decorated function, run as it is in eager and as one custom op of the graph under
    torch.compile (`vlmoe::quack_<name>`, `fake` giving its outputs' shapes for tracing). The op's
    body is the eager function: the tile tuned for the problem (timed on its first call, as in
    eager), where tracing QuACK's own custom ops ran QuACK's default tile, never timed (nothing can
    be timed while tracing), which made the compiled layer 0.92x eager at the 64-expert shape
    (s23-run1). Its outputs are new tensors (no out= to mutate): Inductor copies nothing around it."""

    def wrap(eager: Callable[..., Any]) -> Callable[..., Any]:
        op = torch.library.custom_op(f"vlmoe::quack_{eager.__name__}", eager, mutates_args=())
        op.register_fake(fake)

        @functools.wraps(eager)
        def call(*args: Any, **kwargs: Any) -> Any:
            return (op if torch.compiler.is_compiling() else eager)(*args, **kwargs)

        return call

    return wrap


# `small_experts` (each function below): the call is one of a SwiGLU experts layer that the
# small-experts rule takes (`is_small_experts`): its problem tunes among MORE_CANDIDATES too, under
# a key of its own (WIDE_KEY).


def _experts_mm_fake(x, weight, bounds, token_rows=None, *, small_experts=False):
    return x.new_empty(_rows(x, token_rows), weight.shape[-2])


@_one_op_under_compile(_experts_mm_fake)
def experts_mm(
    x: Tensor,
    weight: Tensor,
    bounds: Tensor,
    token_rows: Tensor | None = None,
    *,
    small_experts: bool = False,
) -> Tensor:
    """Row r: x_r @ weight[e].T, x_r = x[token_rows[r]] if token_rows is given (the gather in the
    GEMM's loads) else x[r]. -> [S, O]; rows past the last segment are left unwritten.
    bounds # [E + 1] int32, expert e's rows bounds[e]:bounds[e + 1] (`cu_seqlens`)."""
    out = x.new_empty(_rows(x, token_rows), weight.shape[-2])
    a_idx = _gather_index(token_rows)
    _gemm(
        "forward", small_experts, A=x, B=weight.transpose(-2, -1), out=out, cu_seqlens_m=bounds, A_idx=a_idx
    )
    return out


def _experts_mm_grad_input_fake(
    grad_out, weight, bounds, interleaved=False, token_rows=None, *, small_experts=False
):
    return grad_out.new_empty(_rows(grad_out, token_rows), weight.shape[-1])


@_one_op_under_compile(_experts_mm_grad_input_fake)
def experts_mm_grad_input(
    grad_out: Tensor,
    weight: Tensor,
    bounds: Tensor,
    interleaved: bool = False,
    token_rows: Tensor | None = None,
    *,
    small_experts: bool = False,
) -> Tensor:
    """Row r: g_r @ weight[e], g_r = grad_out[token_rows[r]] if token_rows is given (gathered in
    the loads) else grad_out[r]. -> [S, I]; rows past the last segment left unwritten.
    `interleaved`: grad_out's columns pair gate and up (column 2j, 2j + 1) while weight # [E, 2F, I]
    stacks [gate; up] (the gradient of `experts_swiglu`'s preact)."""
    out = grad_out.new_empty(_rows(grad_out, token_rows), weight.shape[-1])
    concat = {"concat_layout": ("B",)} if interleaved else {}
    a_idx = _gather_index(token_rows)
    _gemm(
        "grad_input", small_experts, A=grad_out, B=weight, out=out, cu_seqlens_m=bounds, A_idx=a_idx, **concat
    )
    return out


def _experts_mm_grad_weight_fake(
    grad_out, x_sorted, weight, bounds, interleaved=False, token_rows=None, *, small_experts=False
):
    return torch.empty_like(weight)


@_one_op_under_compile(_experts_mm_grad_weight_fake)
def experts_mm_grad_weight(
    grad_out: Tensor,
    x_sorted: Tensor,
    weight: Tensor,
    bounds: Tensor,
    interleaved: bool = False,
    token_rows: Tensor | None = None,
    *,
    small_experts: bool = False,
) -> Tensor:
    """Expert e: g[segment e].T @ x_sorted[segment e], g_r = grad_out[token_rows[r]] if token_rows
    is given (gathered along K in the loads) else grad_out[r]. -> [E, O, I] (zeros for empty
    experts). `interleaved`: grad_out's columns pair gate and up, and the result comes back as
    [gate; up] stacked rows, the layout of `weight`."""
    out = torch.empty_like(weight)
    concat = {"concat_layout": ("out",)} if interleaved else {}
    a_idx = _gather_index(token_rows)
    _gemm(
        "grad_weight",
        small_experts,
        A=grad_out.t(),
        B=x_sorted,
        out=out,
        cu_seqlens_k=bounds,
        A_idx=a_idx,
        **concat,
    )
    return out


def _experts_mm_grad_weight_gathered_x_fake(
    grad_out, x, token_rows, weight, bounds, interleaved=False, *, small_experts=False
):
    return torch.empty_like(weight)


@_one_op_under_compile(_experts_mm_grad_weight_gathered_x_fake)
def experts_mm_grad_weight_gathered_x(
    grad_out: Tensor,
    x: Tensor,
    token_rows: Tensor,
    weight: Tensor,
    bounds: Tensor,
    interleaved: bool = False,
    *,
    small_experts: bool = False,
) -> Tensor:
    """`experts_mm_grad_weight` with x in token order: expert e's grad_out[segment e].T @
    x[token_rows[segment e]], computed as its transpose x[rows].T @ grad_out[segment e] so that
    the gathered operand is A (QuACK gathers A only), x gathered along K in the loads, and stored
    through a transposed view of the [E, O, I] result (an M-major output). -> [E, O, I].
    `interleaved`: as `experts_mm_grad_weight` (the paired columns are now N, the result's
    non-contiguous dimension still)."""
    out = torch.empty_like(weight)
    concat = {"concat_layout": ("out",)} if interleaved else {}
    _gemm(
        "grad_weight_t",
        small_experts,
        A=x.t(),
        B=grad_out,
        out=out.transpose(-2, -1),
        cu_seqlens_k=bounds,
        A_idx=_gather_index(token_rows),
        **concat,
    )
    return out


def _swiglu_outputs(x, gate_up_proj, bounds, token_rows, *, small_experts=False):
    """experts_swiglu's preact and hidden, unwritten: what it fills, and its fake under tracing."""
    rows, width = _rows(x, token_rows), gate_up_proj.shape[-2]
    return x.new_empty(rows, width), x.new_empty(rows, width // 2)


@_one_op_under_compile(_swiglu_outputs)
def experts_swiglu(
    x: Tensor, gate_up_proj: Tensor, bounds: Tensor, token_rows: Tensor | None, *, small_experts: bool = False
) -> tuple[Tensor, Tensor]:
    """One GEMM with the SwiGLU in its epilogue. With x_r = x[token_rows[r]] (gathered in the
    loads; x[r] when token_rows is None: rows already in expert order) and e row r's expert:
    preact[r] = x_r @ gate_up_proj[e].T with gate j in column 2j and up j in column 2j + 1,
    hidden[r] = silu(gate) * up from the float32 accumulator.
    x # [T, I], gate_up_proj # [E, 2F, I] ([gate; up] stacked) -> preact # [S, 2F], hidden # [S, F]."""
    preact, hidden = _swiglu_outputs(x, gate_up_proj, bounds, token_rows)
    _tuned(
        "swiglu_forward",
        "gated",
        dict(
            A=x,
            B=gate_up_proj.transpose(-2, -1),
            preact_out=preact,
            postact_out=hidden,
            cu_seqlens_m=bounds,
            A_idx=_gather_index(token_rows),
            concat_layout=("B",),
        ),
        small_experts,
    )
    return preact, hidden


def _experts_swiglu_backward_fake(
    grad_rows, down_proj, preact, row_weights, bounds, out=None, token_rows=None, *, small_experts=False
):
    if out is not None:
        raise ValueError("experts_swiglu_backward: out= is eager only (a custom op returns new tensors)")
    rows = preact.shape[0]
    return (
        torch.empty_like(preact),
        preact.new_empty(rows, preact.shape[1] // 2),
        preact.new_empty(rows, dtype=torch.float32),
    )


@_one_op_under_compile(_experts_swiglu_backward_fake)
def experts_swiglu_backward(
    grad_rows: Tensor,
    down_proj: Tensor,
    preact: Tensor,
    row_weights: Tensor,
    bounds: Tensor,
    out: Tensor | None = None,
    token_rows: Tensor | None = None,
    *,
    small_experts: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward of w_r * down(silu(gate) * up) up to preact, in one GEMM with the SwiGLU's
    gradient in its epilogue (QuACK's dgated). With e row r's expert, g_r = grad_rows[r] @
    down_proj[e] (float32 accumulator, never stored) and (gate, up) preact[r]'s pairs:
    - grad_preact[r]: the gradient of w_r * silu(gate) * up against g_r, paired as preact;
    - scaled_hidden[r] = w_r * silu(gate) * up, what down's weight gradient multiplies;
    - grad_row_weights[r] = <g_r, silu(gate) * up>, float32.
    grad_rows # [S, O] (expert order), down_proj # [E, O, F], preact # [S, 2F] (`experts_swiglu`'s),
    row_weights # [S] float32. `out`: where grad_preact goes, preact itself allowed (its memory,
    written tile by tile after that tile's pairs are read; eager only). `token_rows`: grad_rows
    is the tokens' output gradient # [T, O], row r read at token_rows[r] in the GEMM's loads."""
    grad_preact = torch.empty_like(preact) if out is None else out
    scaled_hidden = preact.new_empty(preact.shape[0], preact.shape[1] // 2)
    kwargs = dict(
        A=grad_rows,
        B=down_proj,
        PreAct=preact,
        dx_out=grad_preact,
        postact_out=scaled_hidden,
        colvec_scale=row_weights,
        colvec_reduce=True,
        cu_seqlens_m=bounds,
        A_idx=_gather_index(token_rows),
    )
    candidates = _candidates("dgated", kwargs, small_experts)
    if out is preact and _untimed(_tuning_key("swiglu_backward", candidates, kwargs, small_experts)):
        # Tuning runs each candidate several times on these operands: in place, every run after
        # the first would read the gradient as preact. It runs on a scratch output instead.
        _tuned("swiglu_backward", "dgated", {**kwargs, "dx_out": torch.empty_like(preact)}, small_experts)
    _, _, grad_row_weights = _tuned("swiglu_backward", "dgated", kwargs, small_experts)
    return grad_preact, scaled_hidden, grad_row_weights


@functools.cache
def gemm_config(tile: tuple) -> Any:
    """QuACK's GemmConfig for (tile_m, tile_n, cluster_m, cluster_n, pingpong[, max_swizzle_size])
    on SM90; the swizzle (how many tiles the scheduler groups for L2 reuse) defaults to QuACK's 8.
    One object per tile: QuACK's epilogue GEMMs key their launch cache by the config's identity,
    so a new one each call would take the slow host path every time."""
    from quack.gemm_config import GemmConfig

    tile_m, tile_n, cluster_m, cluster_n, pingpong, *swizzle = tile
    return GemmConfig(
        tile_m=tile_m,
        tile_n=tile_n,
        cluster_m=cluster_m,
        cluster_n=cluster_n,
        pingpong=pingpong,
        is_dynamic_persistent=False,
        device_capacity=9,
        **({"max_swizzle_size": swizzle[0]} if swizzle else {}),
    )


def _all_tiles() -> tuple[tuple, ...]:
    """Every tile a tuned index may mean, in index order (saved indices stay valid as long as this
    list does: `_saved_tiles`)."""
    return CANDIDATES + MORE_CANDIDATES + ROW_TILES


def _tile(index: int) -> tuple:
    """The tile a tuned index means."""
    return _all_tiles()[index]


def _run(index: int, op: str, kwargs: dict) -> Any:
    """One QuACK call with candidate `index`'s tile, -> what QuACK returns. `op`: "gemm"
    (gemm_tuned), "gated" (gemm_act with the SwiGLU epilogue) or "dgated" (gemm_dact with the
    SwiGLU's gradient in the epilogue)."""
    from quack import gemm_interface

    try:
        if op == "gemm":
            return gemm_interface.gemm_tuned.fn(**kwargs, config=gemm_config(_tile(index)))
        config = gemm_config(_tile(index))
        if op == "gated":
            return gemm_interface.gemm_act(**kwargs, activation="swiglu", tuned=False, config=config)
        return gemm_interface.gemm_dact(
            **kwargs, activation="swiglu", dynamic_scheduler=False, tuned=False, config=config
        )
    except Exception as error:  # a QuACK or CUTLASS-DSL failure, reported with the way around it
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in kwargs.items() if isinstance(v, Tensor))
        hint = ""
        if "semantic key" in str(error):
            # QuACK fingerprints the epilogue's functions for its compile cache and takes those
            # outside a site-packages directory for its own, which the CUTLASS DSL's are not.
            hint = (
                " QuACK and nvidia-cutlass-dsl must be installed under a site-packages directory "
                "(pip install, not a bare --target folder on PYTHONPATH)."
            )
        raise RuntimeError(
            f"QuACK's grouped GEMM ({op}) failed ({type(error).__name__}: {error}) on {shapes}, tile "
            f"{_tile(index)}. Set VLMOE_QUACK=0 (or wrap the call in "
            "vlmoe.moe.kernels.quack_gemm.disabled()) to run the expert matmuls on torch's grouped_mm"
            + (", or VLMOE_QUACK_FUSED=0 to keep the SwiGLU out of the GEMMs." if op != "gemm" else ".")
            + hint
        ) from error


def _gemm(direction: str, small_experts: bool, **kwargs: Any) -> None:
    _tuned(direction, "gemm", kwargs, small_experts)


def _candidates(op: str, kwargs: dict, small_experts: bool) -> list[int]:
    """The indices (into `_all_tiles()`) of the tiles this call may take; `small_experts`: a call
    of a layer the small-experts rule takes (`is_small_experts`), which adds MORE_CANDIDATES."""
    gathers = kwargs.get("A_idx") is not None
    more = MORE or small_experts
    tiles = set(CANDIDATES + (MORE_CANDIDATES if more else ()) + OP_CANDIDATES.get(op, ()))
    if FINE_ROWS and kwargs.get("cu_seqlens_m") is not None:  # only varlen-M rows are padded
        tiles.update(ROW_TILES)
    return [
        index
        for index, tile in enumerate(_all_tiles())
        if tile in tiles and not (gathers and tile[3] != 1)  # QuACK's gather needs cluster_n == 1
    ]


def _tuning_key(direction: str, candidates: list[int], kwargs: dict, small_experts: bool) -> str | None:
    """The problem's key where its tile is chosen by timing among `candidates`; None where the
    first candidate runs (tuning off, one candidate)."""
    if not TUNE or len(candidates) == 1:
        return None
    return _key(direction, kwargs, small_experts)


def _untimed(key: str | None) -> bool:
    """Whether the problem `key` has no chosen tile yet (here or on disk) and can be timed now."""
    if key is None:
        return False
    if key not in _chosen:
        _load_disk_cache()
    # Nothing is timed during CUDA-graph capture: the first candidate runs there.
    capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    return key not in _chosen and not capturing


def _tuned(direction: str, op: str, kwargs: dict, small_experts: bool) -> Any:
    """Run `op` with the tile chosen for this problem, timing the candidates on its first call;
    -> what QuACK returns."""
    candidates = _candidates(op, kwargs, small_experts)
    key = _tuning_key(direction, candidates, kwargs, small_experts)
    if _untimed(key):
        _announce_tuning()
        _start_compile_server()
        _chosen[key] = _time_candidates(candidates, op, kwargs, key)
        _save_disk_cache()
    if _recording is not None and key in _chosen and key not in _recording:
        _recording[key] = _record_problem(key, op, kwargs, small_experts)
    return _run(_chosen.get(key, candidates[0]), op, kwargs)


def _record_problem(key: str, op: str, kwargs: dict, small_experts: bool) -> list[int]:
    """The candidates problem `key` may take in a step, the chosen one first, each compiled (or
    loaded) with one call on these operands; those QuACK cannot run for it are left out."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return [_chosen[key]]
    with _switched("MORE", MORE or _recording_more):
        widened = _candidates(op, kwargs, small_experts)
    if kwargs.get("dx_out") is not None and kwargs.get("dx_out") is kwargs.get("PreAct"):
        # In place (the dgated backward over preact): every call after the first would read a
        # gradient as preact, so the candidates run on a scratch gradient.
        kwargs = {**kwargs, "dx_out": torch.empty_like(kwargs["dx_out"])}
    rejected: dict[int, RuntimeError] = {}
    _compile_candidates(widened, op, kwargs, rejected)
    chosen = _chosen[key]
    return [chosen] + [index for index in widened if index != chosen and index not in rejected]


def _key(direction: str, kwargs: dict, small_experts: bool) -> str:
    a, b = kwargs["A"], kwargs["B"]
    gathers = kwargs.get("A_idx") is not None
    if direction.startswith("grad_weight"):  # A # [O, S] ([I, T] for _t), B # [S, I] ([S, O])
        rows, dims = b.shape[0], (a.shape[0], b.shape[-1])
    else:  # A # [S or T, K], B # [E, K, N]
        rows, dims = (kwargs["A_idx"].shape[0] if gathers else a.shape[0]), (a.shape[-1], b.shape[-1])
    segments = kwargs.get("cu_seqlens_m", kwargs.get("cu_seqlens_k"))
    # Rows rounded up to a power of two: the problem's size, not this batch's routing.
    bucket = 1 << max(rows - 1, 1).bit_length()
    layout = "gather" if gathers else "sorted"
    if kwargs.get("concat_layout"):
        layout += "+interleaved"
    parts = [direction, layout, bucket, *dims, segments.shape[0] - 1]
    device = torch.cuda.get_device_name(a.device) if a.is_cuda else a.device.type
    parts += [str(a.dtype).removeprefix("torch."), device]
    if small_experts:
        parts.append(WIDE_KEY)
    if MORE:
        parts.append(MORE_KEY)
    if STEADY:
        parts.append(STEADY_KEY)
    if IN_STEP:
        parts.append(IN_STEP_KEY)
    if FINE_ROWS:
        parts.append(FINE_ROWS_KEY)
    return "/".join(str(part) for part in parts)


def _announce_tuning() -> None:
    """Say once per process why the first steps stall: without it, a first forward that compiles
    kernels for half a minute looks like a hang."""
    global _announced
    if not _announced:
        _announced = True
        logger.warning(
            "vlmoe: timing QuACK's tiles for new expert-matmul shapes; on first use QuACK also "
            "compiles its kernels (about half a minute on an H200). Both are cached (%s and QuACK's cache).",
            _cache_path(),
        )


def _time_candidates(candidates: list[int], op: str, kwargs: dict, key: str) -> int:
    """The candidate with the least median time on this very call's operands, timed in
    interleaved rounds (single calls, `_burst_times`; or steady spans, `_steady_times`): the
    clocks of a GPU that has just left idle, or heats up under the first candidates, weigh on all
    of them alike (timing each candidate's calls back to back picked by order as much as by
    tile, NOTES.md v18). What it spent is logged under the problem's `key` (`tuning_seconds`)."""
    start = time.perf_counter()
    rejected: dict[int, RuntimeError] = {}
    rounds = STEADY_ROUNDS if STEADY else BURST_ROUNDS
    with _tuning_progress(key, len(candidates), rounds) as advance:
        # and one warm-up call each
        compiling = _compile_candidates(candidates, op, kwargs, rejected, on_ready=advance)
        compiled = time.perf_counter()
        ran = [index for index in candidates if index not in rejected]
        if not ran:
            raise rejected[candidates[0]]
        if rejected:
            logger.warning(
                "vlmoe: QuACK cannot run tiles %s for %s (%s); the tuning chose among the other %d.",
                [_tile(index) for index in rejected],
                key,
                next(iter(rejected.values())).__cause__,
                len(ran),
            )
        times, calls = (
            _steady_times(ran, op, kwargs, advance) if STEADY else _burst_times(ran, op, kwargs, advance)
        )
    _tuning_log[key] = {
        "compile_s": compiled - start,
        "time_s": time.perf_counter() - compiled,
        "candidates": len(candidates),
        "rejected": len(rejected),
        "calls_per_timing": calls,
        **compiling,
    }
    chosen = min(ran, key=lambda index: statistics.median(times[index]))
    logger.info(
        "vlmoe: %s takes tile %s (of %d; compiled in %.1f s, timed in %.1f s)",
        key,
        _tile(chosen),
        len(ran),
        compiled - start,
        _tuning_log[key]["time_s"],
    )
    return chosen


def _progress_wanted() -> bool:
    """Whether first-use tuning shows its bar (`PROGRESS`; "auto": where its console is a terminal)."""
    if PROGRESS in ("0", "1"):
        return PROGRESS == "1"
    return progress_console().is_terminal


def progress_console() -> Any:
    """Where the tuning bars draw: the console a caller's live display shares (a training run's,
    `vlmoe.console.sharing`), so the bar stacks under its bar (rich >= 14; rich 13 refuses, and
    the tuning goes without one), else stderr, beside the log."""
    from vlmoe.console import shared_console

    return shared_console()


@contextlib.contextmanager
def _tuning_progress(key: str, kernels: int, rounds: int) -> Iterator[Callable[[], None]]:
    """A transient bar over one problem's tuning: `kernels` candidates to compile (or load), then
    `rounds` timing rounds; yields its advance function (a no-op without a bar). Where another
    live display holds the console and rich cannot stack them, there is no bar."""
    if not _progress_wanted():
        yield lambda: None
        return
    from rich.errors import LiveError
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    direction = key.split("/", 2)[:2]
    label = TextColumn(f"vlmoe: QuACK tiles for {'/'.join(direction)} [dim]({kernels} candidates)")
    columns = (label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    bar = Progress(*columns, console=progress_console(), transient=True)
    task = bar.add_task("tuning", total=kernels + rounds)
    try:
        bar.start()
    except LiveError:
        yield lambda: None
        return
    try:
        yield lambda: bar.advance(task)
    finally:
        bar.stop()


def _steady_times(
    ran: list[int], op: str, kwargs: dict, after_round: Callable[[], None] = lambda: None
) -> tuple[dict[int, list[float]], int]:
    """Each candidate's ms per call in STEADY_ROUNDS rounds, each round one span of back-to-back
    calls per candidate, after a warm-up that brings the GPU to the clocks it keeps under a
    sustained load -> (times, calls per span)."""

    def repeat(index: int, count: int) -> None:
        for _ in range(count):
            _run(index, op, kwargs)

    one_call = max(_elapsed_ms(lambda: repeat(ran[0], 1)), 1e-3)
    calls = min(max(math.ceil(STEADY_SPAN_MS / one_call), 1), 100)
    repeat(ran[0], min(math.ceil(STEADY_WARMUP_MS / one_call), 1000))  # queued ahead of the spans
    times: dict[int, list[float]] = {index: [] for index in ran}
    for _ in range(STEADY_ROUNDS):
        for index in ran:
            times[index].append(_elapsed_ms(lambda index=index: repeat(index, calls)) / calls)
        after_round()
    return times, calls


def _burst_times(
    ran: list[int], op: str, kwargs: dict, after_round: Callable[[], None] = lambda: None
) -> tuple[dict[int, list[float]], int]:
    """Each candidate's ms for one call, one call per candidate per round (the default)."""
    times: dict[int, list[float]] = {index: [] for index in ran}
    for _ in range(BURST_ROUNDS):
        for index in ran:
            times[index].append(_elapsed_ms(lambda index=index: _run(index, op, kwargs)))
        after_round()
    return times, 1


def _compile_candidates(
    candidates: list[int],
    op: str,
    kwargs: dict,
    rejected: dict[int, RuntimeError],
    on_ready: Callable[[], None] = lambda: None,
) -> dict[str, Any]:
    """Run every candidate once, which compiles its kernel or loads it from QuACK's disk cache;
    -> what `tuning_seconds` reports of it. A candidate whose kernel QuACK or the CUTLASS DSL
    refuses for this problem (a tile its epilogue, gather or layout cannot take) goes into
    `rejected` with its error, and the tuning chooses among the others.

    Compiling one QuACK kernel takes ~2 s of this process's CPU, a problem has up to four
    kernels to compile (five candidates, two differing only in a launch argument) and a layer
    six problems: one after another, 38-50 s of a first step's 43-56 (NOTES.md v26). QuACK's
    async compile (`quack.cache.async_compile`, what its own autotuner uses) ships a kernel
    missing from its cache to a pool of CPU worker processes and raises CompilePending before
    launching anything. So all the candidates go to the workers first; then each runs here in
    turn, with the pool suppressed, and QuACK's per-kernel file lock sorts it out: a kernel a
    worker has finished is loaded, one a worker is compiling is waited for (up to QuACK's 60 s
    lock timeout, past which it compiles here too), and one no worker has started compiles
    here. A kernel a worker failed on compiles here too, where a failure of its own rejects the
    candidate; a pool that cannot take work (no process can start) is given up for the
    process. The pool is QuACK's process-wide one (`pool_scope`): its workers stay up between
    problems, and a worker's first compile costs ~3x its later ones (a pool per problem measured
    no faster than one after another). A problem with one kernel to compile gains nothing from
    workers and compiles here."""
    kernels = {_tile(index)[:5] for index in candidates}  # the swizzle is a launch argument
    pool_api = _pool_api() if _pool_wanted() and len(kernels) > 1 else None
    if pool_api is not None and _pool_lock.acquire(blocking=False):
        try:
            return _hand_to_pool(candidates, op, kwargs, rejected, on_ready, *pool_api)
        finally:
            _pool_lock.release()
    # Here, one after another. Where another thread has QuACK's process-wide pool active
    # (nn.DataParallel's replicas tune in threads), this thread's kernels would be handed over
    # too and raise CompilePending here: the pool is suppressed (the other thread's calls
    # meanwhile compile in their process too: slower, not wrong).
    with pool_api[1]() if pool_api is not None else contextlib.nullcontext():
        for index in candidates:
            _run_or_reject(index, op, kwargs, rejected, on_ready)
    return {"on_workers": 0, "handing_s": 0.0, "after_s": [], "worker_failures": 0}


def _run_or_reject(
    index: int, op: str, kwargs: dict, rejected: dict[int, RuntimeError], on_ready: Callable[[], None]
) -> None:
    """`_run`, with a failure of the candidate's own kernel kept in `rejected` instead of raised;
    `on_ready` once the candidate is settled either way (the tuning's progress)."""
    try:
        _run(index, op, kwargs)
    except RuntimeError as error:
        rejected[index] = error
    on_ready()


def _hand_to_pool(
    candidates: list[int],
    op: str,
    kwargs: dict,
    rejected: dict[int, RuntimeError],
    on_ready: Callable[[], None],
    pending_error: Any,
    suppress_pool: Any,
    pool_scope: Any,
) -> dict[str, Any]:
    """`_compile_candidates` with QuACK's pool: every candidate handed over, then each run here."""
    handed: list[int] = []  # candidates whose kernel went to a worker (or another process had)
    left: list[int] = []  # candidates the pool could not take: compiled here
    after: list[float] = []
    start = time.perf_counter()
    handing, errors = 0.0, []
    with contextlib.ExitStack() as stack:
        try:
            pool = stack.enter_context(pool_scope())
        except (OSError, RuntimeError, NotImplementedError) as error:  # no process pool to be had here
            _give_up_pool(error)
            pool, left = None, list(candidates)
        if pool is not None:
            earlier = _pool_errors(pool)  # a pool joined (QuACK's pytest plugin's) may hold others'
            _set_server_preload()  # for a server QuACK's executor starts, if it has not yet
            for index in candidates:
                if left:  # the pool refused one: the rest compile here too
                    left.append(index)
                    continue
                try:
                    _run(index, op, kwargs)  # in QuACK's cache already: runs as it is
                except pending_error:
                    handed.append(index)
                except RuntimeError as error:
                    if _pool_side(error.__cause__):
                        _give_up_pool(error.__cause__)
                        left.append(index)
                    else:  # the kernel's own failure, before any handing over
                        rejected[index] = error
                        on_ready()
                else:
                    on_ready()
            handing = time.perf_counter() - start
            with suppress_pool():
                for index in handed:
                    _run_or_reject(index, op, kwargs, rejected, on_ready)
                    after.append(time.perf_counter() - start)
            errors = [error for error in _pool_errors(pool) if error not in earlier]
    for index in left:
        _run_or_reject(index, op, kwargs, rejected, on_ready)
    if errors:  # compiled here instead; say why, once per problem
        logger.warning(
            "vlmoe: QuACK's compile workers failed on %d kernels, compiled here instead: %s",
            len(errors),
            errors[0][1],
        )
    return {"on_workers": len(handed), "handing_s": handing, "after_s": after, "worker_failures": len(errors)}


def _pool_wanted() -> bool:
    """Whether to try QuACK's pool: asked for, not given up, and its compile server either running
    or startable from this thread. A backward's GEMMs are tuned on autograd's device thread, not
    the main one, and use the pool the forward's tuning started (a main-thread-only rule left
    every backward problem compiling one after another: 55 s first use, s16-run1). The server
    itself starts from the main thread only: it dies with the thread that started it
    (`vlmoe.compile_server`), and only the main thread surely lives as long as the process."""
    if not PARALLEL_COMPILE or _pool_unusable is not None:
        return False
    if threading.current_thread() is threading.main_thread():
        return True
    if not _forkserver_workers():
        return True  # workers spawned, no server
    from multiprocessing import forkserver

    # The process's forkserver, running once its pid is known (CPython's, 3.8 to 3.14).
    return getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None) is not None


def _forkserver_workers() -> bool:
    """Whether QuACK's workers fork from a compile server (its default), not spawned
    (QUACK_ASYNC_COMPILE_START=spawn: no server to start)."""
    return os.environ.get("QUACK_ASYNC_COMPILE_START", "forkserver") == "forkserver"


def _pool_side(error: BaseException | None) -> bool:
    """Whether an error raised while handing a kernel over is the pool's (no worker process could
    start, or the pool broke), not the kernel's."""
    from concurrent.futures import BrokenExecutor

    return isinstance(error, (OSError, EOFError, BrokenExecutor, NotImplementedError))


def _give_up_pool(error: BaseException) -> None:
    """The pool off for the rest of the process, said once: each further try would pay its
    failure again (a server that cannot start is waited for at every submission)."""
    global _pool_unusable
    if _pool_unusable is None:
        _pool_unusable = f"{type(error).__name__}: {error}"
        logger.warning(
            "vlmoe: QuACK's compile workers are unusable here (%s); the tile candidates compile in "
            "this process, one after another (VLMOE_QUACK_PARALLEL_COMPILE=0 skips the attempt).",
            _pool_unusable,
        )


def _pool_errors(pool: Any) -> list[tuple[str, str]]:
    """(kernel key, error) for each kernel QuACK's workers failed on in `pool`, so far."""
    return list(pool.stats().get("errors", []))


def _pool_api() -> tuple[Any, Any, Any] | None:
    """(CompilePending, suppress_pool, pool_scope) from QuACK's async compile module, or None
    where this QuACK has none. pool_scope activates a pool on QuACK's process-wide executor
    (up to QUACK_COMPILE_WORKERS worker processes, default 8, started as needed and idle for the
    rest of the process once the kernels are in) or joins the pool already active (QuACK's
    pytest plugin's). VLMOE_QUACK_PARALLEL_COMPILE=0 starts no process."""
    try:
        from quack.cache import async_compile
    except ImportError:
        return None
    return async_compile.CompilePending, async_compile.suppress_pool, async_compile.pool_scope


def _start_compile_server() -> None:
    """Start QuACK's compile server in the background, once per process, at the first problem
    to tune, where QuACK has compiled nothing yet. It is Python's forkserver with torch and the
    CUTLASS DSL imported (~13 s, QuACK's figure), which compile workers fork from; the first
    pool would otherwise wait for all of that import in its first worker's start. Nothing here
    waits: the layer's first problem (one kernel, compiled here) runs meanwhile, and the second
    waits for the rest (6-14 s, NOTES.md v26). Where QuACK's cache holds kernels already, the
    new problems most likely need none (its kernels do not depend on the sizes), and no server
    is started unless a pool needs one. The forkserver is the process's one: other code that
    starts processes through it later gets them from this server, with QuACK's preload's
    environment (no GPU visible, CUDA_VISIBLE_DEVICES=""); that is QuACK's pool's doing whenever
    it runs, and VLMOE_QUACK_PARALLEL_COMPILE=0 keeps both out of the process. A forkserver that
    other code started first serves the workers without vlmoe.compile_server: they then import
    QuACK themselves, and are not tied to this process's life."""
    global _compile_server_started
    if _compile_server_started or not _pool_wanted():
        return
    _compile_server_started = True
    if not _forkserver_workers() or _pool_api() is None:
        return
    from quack import cache as quack_cache

    if not getattr(quack_cache, "CACHE_ENABLED", True):  # QUACK_CACHE_ENABLED=0: QuACK uses no pool
        return

    try:
        if any(quack_cache.get_cache_path().glob("*/*.o")):  # <cache>/<QuACK's source fingerprint>/<kernel>.o
            return
    except OSError:  # no cache folder to look in: nothing is started ahead of need
        return
    from multiprocessing import forkserver

    _set_server_preload()
    try:
        forkserver.ensure_running()
    except OSError:  # no room for a process here: the pools start it themselves
        logger.debug("vlmoe: QuACK's compile server did not start early", exc_info=True)


def _set_server_preload() -> None:
    """COMPILE_SERVER_PRELOAD for the process's forkserver, for when it starts (QuACK's executor
    sets its own preload as it is made; nothing changes a server already running)."""
    import multiprocessing

    multiprocessing.get_context("forkserver").set_forkserver_preload(list(COMPILE_SERVER_PRELOAD))


def tuning_seconds() -> dict[str, dict[str, Any]]:
    """Per expert-matmul problem tuned in this process (its cache key): `compile_s`, seconds to
    compile or load its candidates' kernels; `time_s`, seconds timing them; `candidates`;
    `on_workers`, how many were handed to QuACK's compile workers (those not in its cache);
    `rejected`, how many QuACK could not run for this problem (the others were timed);
    `handing_s`, the seconds handing them over took (a first pool waits there for its compile
    server's imports); `after_s`, seconds from the handing's start to each handed candidate's
    kernel being ready here; `worker_failures`, kernels the workers failed on (compiled here).
    What a first step spent here."""
    return {key: dict(entry) for key, entry in _tuning_log.items()}


def _elapsed_ms(run) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _cache_path() -> Path:
    root = os.environ.get("VLMOE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vlmoe")
    return Path(root) / "quack_gemm.json"


def _load_disk_cache() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    for key, index in _read_disk_cache().items():
        _chosen.setdefault(key, index)


def _read_disk_cache() -> dict[str, int]:
    try:
        saved = json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    if saved.get("candidates") != _saved_tiles():
        return {}  # chosen among other candidates: indices that mean other tiles now
    return {key: int(index) for key, index in saved.get("chosen", {}).items()}


def _saved_tiles() -> list[list]:
    """The tiles a saved index means: the cache is read only where they are the same."""
    return [list(tile) for tile in _all_tiles()]


def _save_disk_cache() -> None:
    path = _cache_path()
    # Merged with what is on disk, so processes tuning side by side (one per GPU) keep each other's.
    # Choices under a probe (the extra candidates, the timing in steady spans) stay in this process.
    merged = {**_read_disk_cache(), **_chosen}
    probe_parts = {MORE_KEY, STEADY_KEY, IN_STEP_KEY, FINE_ROWS_KEY}
    chosen = {key: index for key, index in merged.items() if not probe_parts & set(key.split("/"))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = json.dumps({"candidates": _saved_tiles(), "chosen": chosen}, indent=1)
        # Atomic: a crash mid-write leaves the previous file, never half of one.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            handle.write(payload)
        os.replace(handle.name, path)
    except OSError:  # a read-only home: keep the in-process choice only
        pass
