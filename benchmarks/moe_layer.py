"""MoE FFN and MoLE layer speed, forward + backward, bf16, one process on one GPU.

    python benchmarks/moe_layer.py [--quick]

Prints medians and ratios against named baselines; writes moe_layer.json. The headline is the
ratio to a dense SwiGLU FFN run on tokens x top_k rows (the same active FLOPs as the MoE).

Each method is first timed alone (median of --reps steps, and its peak memory). Then the methods
the performance issue's targets name are re-timed with their baseline in --rounds interleaved
rounds, and the "paired" column is the median of the per-round ratios: the layer as shipped
against the compiled dense-equivalent (target 1), plain LoRA and the MoLE layer against PEFT's
LoRA and MoCLE against a rank-128 LoRA (target 2).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    peak_memory_mib,
    print_table,
    round_ratios,
    span,
    time_cuda,
    time_rounds,
    v14_variant,
    write_json,
)
from plot_telemetry import picture
from telemetry import GpuSampler
from vlmoe.moe import MoEFeedForward, MoLELinear
from vlmoe.moe.kernels import quack_gemm, step_tuning

FFN_SHAPES = [(16384, 2048, 5632, 4, 2), (8192, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6)]
DTYPE = torch.bfloat16


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def build_ffn(
    tokens: int, hidden: int, intermediate: int, num_experts: int, top_k: int
) -> tuple[SwiGLU, MoEFeedForward, torch.Tensor, torch.Tensor]:
    """The dense SwiGLU, the MoE layer upcycled from it (distinct experts, a router spread enough
    for realistic routing), the layer's input and the dense-equivalent's (tokens x top_k rows)."""
    torch.manual_seed(0)
    dense = SwiGLU(hidden, intermediate).to("cuda", DTYPE)
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    x = torch.randn(tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    x_dense = torch.randn(tokens * top_k, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    moe = MoEFeedForward.from_dense(dense, num_experts, top_k, load_balance_coef=0.01, backend="grouped")
    with torch.no_grad():
        moe.experts.gate_up_proj.normal_(std=0.02)
        moe.experts.down_proj.normal_(std=0.02)
        moe.router.gate.weight.normal_(std=0.5)
    return dense, moe, x, x_dense


def _train_step(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor, around=None):
    """One fwd+bwd step of `module`; `around`: a context manager it runs inside (a switch of the
    layer's code)."""
    switch = around or contextlib.nullcontext

    def step() -> None:
        for p in module.parameters():
            p.grad = None
        x.grad = None
        with switch():
            module(x).backward(grad_out)

    return step


def _measure(
    name: str, module: nn.Module, x: torch.Tensor, reps: int, paired: dict | None = None, around=None
) -> dict:
    """One method's median step and peak memory, timed alone. With `paired`, its step is kept
    there (by name) for `_pair`'s interleaved rounds. `around`: a context manager each step
    runs inside (a switch of the layer's code for this method alone)."""
    try:
        with torch.no_grad():
            grad_out = torch.randn_like(module(x))
        step = _train_step(module, x, grad_out, around)
        ms = time_cuda(step, reps=reps)
        mem = peak_memory_mib(step)
        row = {"method": name, "ms": ms, "peak_mib": mem}
        if paired is not None:
            paired[name] = step
    except torch.OutOfMemoryError:
        row = {"method": name, "ms": float("nan"), "peak_mib": float("nan"), "note": "OOM"}
    torch.cuda.empty_cache()
    print(f"  {name}: {row['ms']:.3f} ms, peak {row['peak_mib']:.0f} MiB {row.get('note', '')}", flush=True)
    return row


def _pair(
    rows: list[dict], paired: dict, baseline: str, rounds: int, reps: int, sampler: GpuSampler | None = None
) -> dict[str, list[float]]:
    """Re-time the kept steps in `rounds` interleaved rounds and add to each of their rows the
    median and range of its per-round ratio to `baseline` (baseline ms / method ms): the reading
    the performance issue's targets are judged by, as a drift between two steps timed one after
    the other does not enter it. -> each kept step's ms per round. With `sampler`, each row also
    gets the GPU's mean SM clock and power in each of its rounds (`_print_round_clocks`)."""
    if rounds <= 0 or baseline not in paired:
        return {}
    windows: list[tuple[str, int, float, float]] = []
    with sampler or contextlib.nullcontext():
        times = time_rounds(paired, rounds, reps, windows=windows)
    for row in rows:
        if row["method"] in times:
            ratios = round_ratios(times[baseline], times[row["method"]])
            row.update(
                round_ms=times[row["method"]],
                paired_ratio=statistics.median(ratios),
                paired_range=span(ratios),
                paired_baseline=baseline,
            )
            if sampler is not None:
                clocks = [sampler.window(t0, t1) for name, _, t0, t1 in windows if name == row["method"]]
                row["round_clocks"] = [window.as_dict() if window else None for window in clocks]
    if sampler is not None:
        _print_round_clocks(rows, sampler)
    return times


def _print_round_clocks(rows: list[dict], sampler: GpuSampler) -> None:
    """Each paired method's ms, mean SM clock and power round by round, and how far its ms follow
    the clock (Pearson's r over the rounds; near -1: the spread is the clock's)."""
    print(f"  rounds with the GPU's clocks (power: {sampler.power_source}):", flush=True)
    for row in rows:
        clocks = row.get("round_clocks")
        if not clocks or None in clocks:
            continue
        cells = "  ".join(
            f"{ms:.2f} ms {c['sm_mhz']:.0f} MHz {c['power_w']:.0f} W"
            for ms, c in zip(row["round_ms"], clocks, strict=True)
        )
        mhz = [c["sm_mhz"] for c in clocks]
        capped = statistics.fmean(c["reason_share"].get("power-cap", 0.0) for c in clocks)
        follow = ""
        if len(set(mhz)) > 1 and len(set(row["round_ms"])) > 1:
            follow = f"; r(ms, MHz) = {statistics.correlation(row['round_ms'], mhz):+.2f}"
        print(f"    {row['method']}: power-capped {capped:.0%}{follow}\n      {cells}", flush=True)


V18_PAIRS = "vlmoe MoEFeedForward grouped, QuACK, v18 pairs backward (before v25)"


@contextlib.contextmanager
def _v18_pairs_backward():
    """The layer's SwiGLU backward on v18's kernel, gathers and reduction
    (`quack_fused_ops.v18_pairs_backward`): v25 against what it replaced, in the same rounds."""
    from quack_fused_ops import v18_pairs_backward
    from vlmoe.moe.kernels import swiglu as swiglu_kernels

    shipped = swiglu_kernels.swiglu_pairs_backward
    swiglu_kernels.swiglu_pairs_backward = v18_pairs_backward
    try:
        yield
    finally:
        swiglu_kernels.swiglu_pairs_backward = shipped


def _first_step_s(module: nn.Module, x: torch.Tensor, contiguous_grad: bool = False) -> float:
    """Wall seconds of one fwd+bwd step of `module` (out.sum()'s backward): on a first call, its
    compiling and tuning. `contiguous_grad`: a random output gradient instead, for SonicMoE,
    whose backward rejects out.sum()'s expanded one (QuACK's varlen GEMM wants its A k-major)."""
    start = time.perf_counter()
    out = module(x)
    if contiguous_grad:
        out.backward(torch.randn_like(out))
    else:
        out.sum().backward()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _ratio_in_rounds(
    results: list[dict], times: dict[str, list[float]], method: str, baseline: str, field: str, label: str
) -> None:
    """Onto `method`'s row: the median and range of baseline ms / method ms over the paired
    rounds, as `field` and in its note ("1.012x `label` (range)"). Nothing if either was not paired."""
    if method not in times or baseline not in times:
        return
    ratios = round_ratios(times[baseline], times[method])
    row = next(row for row in results if row["method"] == method)
    row.update({field: statistics.median(ratios), f"{field}_range": span(ratios)})
    row["note"] += f"; {statistics.median(ratios):.3f}x {label} ({span(ratios)})"


def _measure_sonic(moe: MoEFeedForward, top_k: int, x: torch.Tensor, reps: int, paired: dict) -> dict:
    """SonicMoE on the vlmoe layer's weights, paired with the others; its first step is QuACK's
    autotuner compiling and timing its configurations for each GEMM."""
    sonic = _SonicFFN(moe, top_k)
    first_s = _first_step_s(sonic, x, contiguous_grad=True)
    agreement = _agreement(moe, sonic, x)
    print(f"  SonicMoE first step {first_s:.1f} s; {agreement}", flush=True)
    row = _measure(SONIC, sonic, x, reps, paired)
    row["note"] = f"first step {first_s:.1f} s; {agreement}"
    return row


def _together(*switches):
    """A context-manager factory entering each of `switches` (factories themselves)."""

    @contextlib.contextmanager
    def around():
        with contextlib.ExitStack() as stack:
            for switch in switches:
                stack.enter_context(switch())
            yield

    return around


@dataclasses.dataclass(frozen=True)
class Probe:
    """The layer with one of its code paths switched (`around`, a context manager around each
    step), paired with the shipped one. `in_step`: after its first step, its tiles are ranked by
    the step's own time (`step_tuning.tune_in_step`, v29) before it is timed."""

    label: str
    around: Callable[[], contextlib.AbstractContextManager]
    in_step: bool = False


# --probe NAME
PROBES = {
    "more": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, tuned among the extra tile candidates too (s16-run5)",
        quack_gemm.more_tiles,
    ),
    "dgated": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, the SwiGLU's gradient in the backward GEMM (v27)",
        quack_gemm.swiglu_backward_fused,
    ),
    "pairs": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, the SwiGLU's gradient in the Triton pass (v17-v26)",
        lambda: quack_gemm.swiglu_backward_fused(False),
    ),
    "steady": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, tiles timed in steady spans (v28)",
        quack_gemm.tuning_in_steady_spans,
    ),
    "steady+more": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, the extra tile candidates too, timed in steady spans",
        _together(quack_gemm.more_tiles, quack_gemm.tuning_in_steady_spans),
    ),
    "dgated+more": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, the SwiGLU's gradient in the backward GEMM, extra tiles",
        _together(quack_gemm.swiglu_backward_fused, quack_gemm.more_tiles),
    ),
    "norule": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, without the small-experts rule (five tiles, pairs pass)",
        lambda: quack_gemm.small_experts_rule(False),
    ),
    "rows": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, varlen-M problems tuned among 128-row block tiles too (v30)",
        quack_gemm.row_tiles,
    ),
    "kgather": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, gate_up's weight gradient gathering x along K (v31)",
        lambda: quack_gemm.backward_gathers("x"),
    ),
    "kgather+grad": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, the backward reading x and the output gradient in place (v31)",
        lambda: quack_gemm.backward_gathers("all"),
    ),
    "instep": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, tiles (the extra ones too) ranked in the step (v29)",
        quack_gemm.in_step_probe,
        in_step=True,
    ),
    "instep+dgated": Probe(
        "vlmoe MoEFeedForward grouped, QuACK, the SwiGLU's gradient in the backward GEMM, tiles ranked in "
        "the step",
        _together(quack_gemm.in_step_probe, quack_gemm.swiglu_backward_fused),
        in_step=True,
    ),
}


def _print_chosen(before: set[str]) -> None:
    """The tile each problem tuned since `before` (the keys chosen then) took, and what timing cost."""
    tuned = quack_gemm.tuning_seconds()
    for key in sorted(set(quack_gemm._chosen) - before):
        tile, log = quack_gemm._tile(quack_gemm._chosen[key]), tuned.get(key, {})
        timing = f", timed in {log['time_s']:.2f} s" if "time_s" in log else ""
        print(f"    chose {key}: {tile}, {log.get('rejected', 0)} rejected{timing}", flush=True)


def prepare_probe(probe: Probe, moe: MoEFeedForward, x: torch.Tensor) -> str:
    """The probe's first step (compiling and timing what its switch makes new: kernels, tiles) and,
    for an in-step probe, its tiles ranked in the step, all outside any timing; prints the tiles
    chosen and returns a note of what it cost."""
    before = set(quack_gemm._chosen)
    with probe.around():
        first_s = _first_step_s(moe, x)
    _print_chosen(before)
    note = f"first step {first_s:.1f} s"
    if probe.in_step:
        with torch.no_grad():
            grad_out = torch.randn_like(moe(x))
        start = time.perf_counter()
        choices = step_tuning.tune_in_step(_train_step(moe, x, grad_out, probe.around), progress=False)
        ranked_s = time.perf_counter() - start
        changed = sum(choice.changed for choice in choices)
        print(f"    ranked in the step in {ranked_s:.1f} s, {changed} of {len(choices)} changed:", flush=True)
        print(textwrap.indent(step_tuning.summary(choices), "      "), flush=True)
        note += f"; ranked in the step in {ranked_s:.1f} s ({changed} of {len(choices)} changed)"
    return note


def _measure_probe(probe: Probe, moe: MoEFeedForward, x: torch.Tensor, reps: int, paired: dict) -> dict:
    """The layer with the probe's switch on for each step, paired with the others."""
    note = prepare_probe(probe, moe, x)
    agreement = _agreement(moe, moe, x, around=probe.around)
    print(f"    {agreement}", flush=True)
    row = _measure(probe.label, moe, x, reps, paired, around=probe.around)
    row["note"] = f"{note}; {agreement}"
    return row


def _mixtral_block(hidden, intermediate, num_experts, top_k, implementation, source: MoEFeedForward):
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_local_experts=num_experts,
        num_experts_per_tok=top_k,
        num_attention_heads=max(1, hidden // 128),
        num_key_value_heads=max(1, hidden // 128),
    )
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).to("cuda", DTYPE)
    with torch.no_grad():  # same weights as the vlmoe layer
        block.gate.weight.copy_(source.router.gate.weight)
        block.experts.gate_up_proj.copy_(source.experts.gate_up_proj)
        block.experts.down_proj.copy_(source.experts.down_proj)
    return block


SONIC = "SonicMoE MoE (sonic-moe, QuACK autotuned)"


def _sonic_unavailable() -> str | None:
    """Why SonicMoE cannot run here, or None. It needs a Hopper or Blackwell GPU and its package,
    installed without its pins (torch <= 2.9.1, nvidia-cutlass-dsl 4.4.2) beside QuACK's
    (`fetch_quack_wheels.sh`): its kernels are QuACK's GEMMs plus its own top-k and gather-sum."""
    if torch.cuda.get_device_capability()[0] < 9:
        return "needs compute capability >= 9"
    try:
        import sonicmoe  # noqa: F401
    except Exception as error:  # not installed, or its imports do not match this QuACK/CUTLASS
        return f"{type(error).__name__}: {error}"
    return None


class _SonicFFN(nn.Module):
    """SonicMoE's MoE module holding the vlmoe layer's weights, so both route the same tokens to
    the same experts (both take the softmax over the top-k logits). Returns the output only: its
    balance loss is computed in its forward, as vlmoe's is, and neither gets a gradient here."""

    def __init__(self, source: MoEFeedForward, top_k: int) -> None:
        super().__init__()
        from sonicmoe import MoE
        from sonicmoe.enums import ActivationType

        num_experts, two_ff, hidden = source.experts.gate_up_proj.shape
        self.moe = MoE(
            num_experts=num_experts,
            num_experts_per_tok=top_k,
            hidden_size=hidden,
            intermediate_size=two_ff // 2,
            activation_function=ActivationType.SWIGLU,
            add_bias=False,
            std=0.02,
        ).to("cuda", DTYPE)
        with torch.no_grad():  # SonicMoE interleaves gate and up rows; vlmoe stacks [gate; up]
            gate, up = source.experts.gate_up_proj.chunk(2, dim=1)
            self.moe.c_fc.weight[:, 0::2].copy_(gate)
            self.moe.c_fc.weight[:, 1::2].copy_(up)
            self.moe.c_proj.weight.copy_(source.experts.down_proj)
            self.moe.router.weight.copy_(source.router.gate.weight)

    def forward(self, x):
        return self.moe(x)[0]


def _agreement(reference: nn.Module, other: nn.Module, x: torch.Tensor, around=None) -> str:
    """How closely `other` computes `reference`'s output and its gradient of x for one random
    output gradient: per row, the median relative error and the share of rows within 2% (a row
    whose routing flips on a near-tie differs by far more). `around`: a context manager the
    other's forward and backward run in (a probe: then `other` may be `reference` itself)."""
    grad_out = torch.randn_like(x)  # the FFN maps d to d
    results = []
    for module, switch in ((reference, contextlib.nullcontext), (other, around or contextlib.nullcontext)):
        xi = x.detach().clone().requires_grad_()
        with switch():
            out = module(xi)
            out.backward(grad_out)
        results.append((out.detach().float(), xi.grad.float()))
        for p in module.parameters():
            p.grad = None
    parts = []
    for label, want, got in zip(("rows", "x grad rows"), results[0], results[1], strict=True):
        errors = (got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-12)
        median, close = errors.median().item(), (errors < 0.02).float().mean().item()
        parts.append(f"{label} vs vlmoe: median rel. error {median:.1e}, {close:.1%} within 2%")
    return "; ".join(parts)


class _As3D(nn.Module):
    """Mixtral's block wants [batch, seq, hidden]."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x.unsqueeze(0)).squeeze(0)


def _compiled_rows(moe: MoEFeedForward, x: torch.Tensor, reps: int) -> list[dict]:
    """The grouped layer under torch.compile, default and max-autotune (Inductor then times its
    Triton grouped-GEMM templates against aten's CUTLASS grouped_mm per matmul). The note holds
    the first step's wall time: compilation plus autotuning."""
    rows = []
    for mode in ("default", "max-autotune-no-cudagraphs"):
        torch._dynamo.reset()
        compiled = torch.compile(moe, mode=mode)
        first_s = _first_step_s(compiled, x)
        row = _measure(f"vlmoe MoEFeedForward grouped, torch.compile {mode}", compiled, x, reps)
        row["note"] = f"first step {first_s:.0f} s"
        rows.append(row)
        print(f"    {row['note']}", flush=True)
    torch._dynamo.reset()
    return rows


DENSE_EAGER = "dense SwiGLU on tokens x k (eager)"
SHIPPED = "vlmoe MoEFeedForward grouped, QuACK, SwiGLU in GEMM epilogue"
DENSE_COMPILED = "dense SwiGLU on tokens x k (torch.compile)"


def bench_ffn(
    shapes,
    reps: int,
    baselines: bool = True,
    autotune: bool = False,
    variants: bool = False,
    rounds: int = 0,
    v18_pairs: bool = False,
    sonic: bool = False,
    headline: bool = False,
    probes: tuple[str, ...] = (),
    sampler: GpuSampler | None = None,
) -> list[dict]:
    rows = []
    sonic_missing = _sonic_unavailable() if sonic else None
    if sonic_missing:
        print(f"SonicMoE not run: {sonic_missing}", flush=True)
    for tokens, hidden, intermediate, num_experts, top_k in shapes:
        dense, moe, x, x_dense = build_ffn(tokens, hidden, intermediate, num_experts, top_k)
        shape = f"({tokens}, {hidden}, {intermediate}, {num_experts}, {top_k})"
        print(f"shape {shape}", flush=True)
        # Paired in rounds: both dense baselines and the layer as shipped (no context switched on).
        paired: dict = {}
        results = [_measure(DENSE_EAGER, dense, x_dense, reps, paired)]
        compiled = torch.compile(dense)
        results.append(_measure(DENSE_COMPILED, compiled, x_dense, reps, paired))
        if quack_gemm.available():
            # First step's wall time: QuACK compiling its kernels and timing its candidate tiles.
            before = set(quack_gemm._chosen)
            first_s = _first_step_s(moe, x)
            _print_chosen(before)
            results.append(_measure(SHIPPED, moe, x, reps, paired))
            results[-1]["note"] = f"first step {first_s:.1f} s"
            if sonic and not sonic_missing:
                results.append(_measure_sonic(moe, top_k, x, reps, paired))
            for probe in probes:
                results.append(_measure_probe(PROBES[probe], moe, x, reps, paired))
        if quack_gemm.available() and not headline:
            with quack_gemm.swiglu_unfused():
                moe(x).sum().backward()  # tiles of the unfused problems timed outside the measurement
                results.append(
                    _measure("vlmoe MoEFeedForward grouped, QuACK GEMMs, SwiGLU pass", moe, x, reps)
                )
            with quack_gemm.rows_spread_first():
                moe(x).sum().backward()  # this layout's tiles timed outside the measurement
                results.append(
                    _measure(
                        "vlmoe MoEFeedForward grouped, QuACK, rows spread before the gated GEMM", moe, x, reps
                    )
                )
            if v18_pairs:
                results.append(_measure(V18_PAIRS, moe, x, reps, paired, around=_v18_pairs_backward))
            with quack_gemm.disabled():
                results.append(_measure("vlmoe MoEFeedForward grouped, grouped_mm", moe, x, reps))
        if not quack_gemm.available():
            results.append(_measure("vlmoe MoEFeedForward grouped", moe, x, reps, paired))
        if variants:
            for fold, gather_inside in ((False, False), (True, False), (False, True)):
                with v14_variant(fold, gather_inside):
                    weights = "in SwiGLU" if fold else "in combine"
                    rows_kept = "gathered inside" if gather_inside else "gathered first"
                    name = f"vlmoe grouped, weights {weights}, rows {rows_kept}"
                    results.append(_measure(name, moe, x, reps))
        if not headline:
            # The same layer with the counts read to the host once and one cuBLAS matmul per expert.
            moe.backend = "segments"
            results.append(_measure("vlmoe MoEFeedForward segments", moe, x, reps))
            moe.backend = "grouped"
        if autotune:
            results += _compiled_rows(moe, x, reps)
        times = _pair(results, paired, DENSE_COMPILED, rounds, max(reps // 2, 5), sampler)
        for probe in probes:
            label = PROBES[probe].label
            _ratio_in_rounds(results, times, label, SHIPPED, "over_shipped", "the shipped layer")
        _ratio_in_rounds(results, times, SHIPPED, SONIC, "over_sonic", "SonicMoE")
        del paired
        if not baselines:
            for row in results:
                row.update(shape=shape, ratio_to_dense=results[0]["ms"] / row["ms"])
            rows += results
            continue
        reference = MoEFeedForward.from_dense(dense, num_experts, top_k, backend="reference")
        reference.load_state_dict(moe.state_dict())
        results.append(_measure("vlmoe MoEFeedForward reference loop", reference, x, reps))
        for implementation in ("eager", "grouped_mm", "batched_mm"):
            try:
                block = _As3D(_mixtral_block(hidden, intermediate, num_experts, top_k, implementation, moe))
                results.append(_measure(f"transformers Mixtral block ({implementation})", block, x, reps))
                del block
            except Exception as error:  # an implementation this transformers lacks
                results.append(
                    {
                        "method": f"transformers Mixtral block ({implementation})",
                        "ms": float("nan"),
                        "peak_mib": float("nan"),
                        "note": type(error).__name__,
                    }
                )
            torch.cuda.empty_cache()
        baseline = results[0]["ms"]
        for row in results:
            row.update(shape=shape, ratio_to_dense=baseline / row["ms"])
        rows += results
        del moe, reference, dense, compiled
        torch.cuda.empty_cache()
    return rows


class _PeftLoRA(nn.Module):
    """PEFT's LoRA. By default PEFT keeps adapters of a bf16 layer in float32
    (autocast_adapter_dtype=True); `bf16_adapters` keeps them bf16 like vlmoe's."""

    def __init__(self, base: nn.Linear, rank: int, bf16_adapters: bool = True) -> None:
        super().__init__()
        from peft import LoraConfig, get_peft_model

        holder = nn.Sequential()
        holder.add_module("proj", base)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"])
        self.model = get_peft_model(holder, config, autocast_adapter_dtype=not bf16_adapters)

    def forward(self, x):
        return self.model(x)


class _PreviousDense(nn.Module):
    """The dense MoLE path before v7, for a same-process comparison: gated low-rank product,
    then the [T, out] scaling and sum as separate passes."""

    def __init__(self, mole: MoLELinear) -> None:
        super().__init__()
        self.mole = mole

    def forward(self, x):
        from vlmoe.moe.dispatch import gate_matrix

        mole, experts = self.mole, self.mole.experts
        gates = gate_matrix(mole.route(x)).to(x.dtype)
        low = x @ experts.lora_A.reshape(-1, x.shape[-1]).t()
        low = (low.view(x.shape[0], experts.num_experts, experts.rank) * gates.unsqueeze(-1)).flatten(1)
        stacked_B = experts.lora_B.permute(1, 0, 2).reshape(experts.lora_B.shape[1], -1)
        return mole.base(x) + low @ stacked_B.t() * experts.scaling


class _PreviousPlain(nn.Module):
    """Plain LoRA as `MoLELinear` computed it before session 12, as PEFT does: the second
    matmul, then the scaling and the sum as separate passes over [T, out]."""

    def __init__(self, plain: MoLELinear) -> None:
        super().__init__()
        self.plain = plain

    def forward(self, x):
        return self.plain.base(x) + self.plain.universal.expert_forward(0, x)


PEFT_R64 = "PEFT LoRA r=64 (bf16 adapters)"
PEFT_R128 = "PEFT LoRA r=128, bf16 (= two r=64 LoRAs)"


def bench_mole(
    reps: int, tokens: int = 16384, fan_in: int = 4096, fan_out: int = 11008, rounds: int = 0
) -> list[dict]:
    torch.manual_seed(0)
    x = torch.randn(tokens, fan_in, device="cuda", dtype=DTYPE, requires_grad=True)

    def base():
        linear = nn.Linear(fan_in, fan_out, bias=False).to("cuda", DTYPE)
        linear.weight.requires_grad_(False)
        return linear

    # Paired in rounds: PEFT's LoRA with the plain LoRA and the MoLE layer target 2 names.
    paired: dict = {}
    rows = [_measure(PEFT_R64, _PeftLoRA(base(), 64), x, reps, paired)]
    rows.append(
        _measure("PEFT LoRA r=64 (PEFT default: fp32 adapters)", _PeftLoRA(base(), 64, False), x, reps)
    )
    previous = MoLELinear(base(), num_experts=4, rank=64, alpha=128, top_k=1, backend="dense")
    with torch.no_grad():
        previous.experts.lora_B.normal_(std=0.02)
        previous.router.gate.weight.normal_(std=0.5)
    rows.append(
        _measure(
            "vlmoe MoLE 4 experts r=64 top-1 (dense, previous version)", _PreviousDense(previous), x, reps
        )
    )
    # Plain LoRA (attention's in LLaVA-MoLE and MoCLE): against PEFT's, the same computation.
    plain = MoLELinear.plain(base(), rank=64, alpha=128)
    with torch.no_grad():
        plain.universal.lora_B.normal_(std=0.02)
    rows.append(_measure("vlmoe plain LoRA r=64", plain, x, reps, paired))
    previous_plain = _PreviousPlain(plain)
    rows.append(_measure("vlmoe plain LoRA r=64 (previous: scaling, sum apart)", previous_plain, x, reps))
    for backend in ("dense", "grouped", "reference"):
        mole = MoLELinear(base(), num_experts=4, rank=64, alpha=128, top_k=1, backend=backend)
        with torch.no_grad():
            mole.experts.lora_B.normal_(std=0.02)
            mole.router.gate.weight.normal_(std=0.5)
        name = f"vlmoe MoLE 4 experts r=64 top-1 ({backend})"
        rows.append(_measure(name, mole, x, reps, paired if backend == "dense" else None))
    baseline = rows[0]["ms"]
    for row in rows:
        row.update(shape=f"MoLE {tokens}x{fan_in}->{fan_out}", ratio_to_baseline=baseline / row["ms"])
    _pair(rows, paired, PEFT_R64, rounds, max(reps // 2, 5))

    paired = {}
    cluster_rows = [_measure(PEFT_R128, _PeftLoRA(base(), 128), x, reps, paired)]
    mocle = MoLELinear(
        base(), num_experts=4, rank=64, alpha=128, router_input="cluster", num_clusters=64, universal=True
    )
    mocle.cluster_ids = torch.randint(0, 64, (tokens,), device="cuda")
    cluster_rows.append(_measure("vlmoe MoCLE 4 experts r=64 + universal (auto)", mocle, x, reps, paired))
    for row in cluster_rows:
        row.update(
            shape=f"MoCLE {tokens}x{fan_in}->{fan_out}", ratio_to_baseline=cluster_rows[0]["ms"] / row["ms"]
        )
    _pair(cluster_rows, paired, PEFT_R128, rounds, max(reps // 2, 5))
    return rows + cluster_rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    parser.add_argument("--ffn-only", action="store_true", help="MoE FFN vs dense only, no other baselines")
    parser.add_argument("--variants", action="store_true", help="add the layer without v14's memory savings")
    parser.add_argument("--mole-only", action="store_true", help="only the LoRA-expert layers")
    parser.add_argument("--reps", type=int, default=20, help="timed steps per measurement (median)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds re-timing each target's method with its baseline (0: none)",
    )
    parser.add_argument(
        "--v18-pairs", action="store_true", help="add the layer on v18's SwiGLU backward (NOTES.md v25)"
    )
    parser.add_argument(
        "--shape",
        type=int,
        action="append",
        choices=range(1, len(FFN_SHAPES) + 1),
        help="only this FFN shape (1-3, the issue's order; repeatable); default all",
    )
    parser.add_argument(
        "--sonic",
        action="store_true",
        help="add SonicMoE (sonic-moe) on the same weights, paired with the others, where it imports",
    )
    parser.add_argument(
        "--probe",
        action="append",
        default=[],
        choices=sorted(PROBES),
        help="add the layer with a code path switched, paired with the shipped one: more (tuned among "
        "quack_gemm.MORE_CANDIDATES too), dgated / pairs (the SwiGLU's gradient in the backward GEMM, or "
        "in the Triton pass), dgated+more, steady (tiles timed in spans of back-to-back calls after a "
        "warm-up, at sustained clocks), steady+more, instep / instep+dgated (after the first step, each "
        "problem's tiles, the extra ones too, ranked by the whole step's time: step_tuning.tune_in_step), "
        "norule (the small-experts rule off: the layer before session 19); repeatable",
    )
    parser.add_argument(
        "--headline",
        action="store_true",
        help="only the dense baselines, the layer as shipped (and SonicMoE): no variants of the layer",
    )
    parser.add_argument(
        "--autotune", action="store_true", help="add the layer under torch.compile (+ max-autotune)"
    )
    parser.add_argument(
        "--telemetry",
        action="store_true",
        help="sample the GPU's SM clock and power (NVML, nvidia-ml-py) in the FFN's paired rounds",
    )
    args = parser.parse_args()
    shapes = [FFN_SHAPES[n - 1] for n in args.shape] if args.shape else FFN_SHAPES
    if args.quick:
        shapes = [(2048, 256, 512, 4, 2), (2048, 256, 256, 16, 4)]
    reps = 5 if args.quick else args.reps
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    ffn_rows = (
        []
        if args.mole_only
        else bench_ffn(
            shapes,
            reps,
            baselines=not args.ffn_only,
            autotune=args.autotune,
            variants=args.variants,
            rounds=args.rounds,
            v18_pairs=args.v18_pairs,
            sonic=args.sonic,
            headline=args.headline,
            probes=tuple(args.probe),
            sampler=GpuSampler.open() if args.telemetry else None,
        )
    )
    mole_shape = (2048, 256, 512) if args.quick else ()
    mole_rows = [] if args.ffn_only else bench_mole(reps, *mole_shape, rounds=args.rounds)
    json_path = write_json("moe_layer", ffn_rows + mole_rows)
    if args.telemetry:  # each round's ms against its clock, per shape
        print(picture(json_path), flush=True)

    def fmt(row, ratio_key):
        note = row.get("note", "")
        return [
            row["shape"],
            row["method"],
            f"{row['ms']:.3f}",
            f"{row[ratio_key]:.2f}",
            f"{row['peak_mib']:.0f}",
            f"{row['paired_ratio']:.3f} ({row['paired_range']})" if "paired_ratio" in row else "",
            note,
        ]

    header = ["shape (T, d, ff, E, k)", "method", "median ms", "ratio", "peak MiB", "paired (range)", "note"]
    print_table(
        "MoE FFN, fwd+bwd, ratio = eager dense-equivalent ms / method ms; paired = compiled dense ms /"
        " method ms, median of interleaved rounds",
        header,
        [fmt(r, "ratio_to_dense") for r in ffn_rows],
    )
    print_table(
        "LoRA experts, fwd+bwd, ratio = baseline ms / method ms (paired: median of interleaved rounds)",
        header,
        [fmt(r, "ratio_to_baseline") for r in mole_rows],
    )


if __name__ == "__main__":
    main()
