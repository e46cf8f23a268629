"""Probe: each step of the fused SwiGLU experts (v17) against the steps it replaces.

    python benchmarks/quack_fused_ops.py [--reps 20]      # both paths, step by step
    python benchmarks/quack_fused_ops.py --epilogues      # QuACK's gated and dgated GEMMs
    python benchmarks/quack_fused_ops.py --tiles          # the fused path's GEMMs over 13 tiles
    python benchmarks/quack_fused_ops.py --tiles rows     # its varlen-M GEMMs by row block (v30)
    python benchmarks/quack_fused_ops.py --pairs          # the pairs SwiGLU backward's launches
    python benchmarks/quack_fused_ops.py --chosen         # does quack_gemm's tuning pick the best?
    python benchmarks/quack_fused_ops.py --gathers        # the backward's token rows read in place (v31)

`dispatch.combined_glu` puts the SwiGLU in the first GEMM's epilogue and pairs gate and up
columns (QuACK's concat_layout) through the backward. Per shape, every step of both paths is
timed alone, with each of quack_gemm's candidate tiles, beside one cuBLAS matmul of the same
FLOPs. `--epilogues` times QuACK's gated forward and its dgated backward (the SwiGLU gradient
in the epilogue, SonicMoE's design, which vlmoe measured and does not use: NOTES.md v17) over
more tiles, with and without the gather and the row reduction. `--tiles` times each GEMM of the
fused path over QuACK's SM90 tile space (and the default tile's swizzle), against the best of
quack_gemm's candidates: what a wider candidate list would gain, per step; `--tiles rows` times
the varlen-M GEMMs over tiles of coarse and fine row blocks (the rows QuACK pads at each
expert's end: `quack_gemm.ROW_TILES`) in interleaved rounds, kernels compiled on QuACK's
workers first. `--pairs` times the
pairs SwiGLU backward over launch shapes (NOTES.md v18, v25), in place as the layer runs it,
beside v18's path and the concat-layout kernel, with the bandwidth each reaches. `--chosen`
lets quack_gemm tune each GEMM of the fused path as the layer does, then times every candidate
again in interleaved rounds: how much its pick loses against the best of its own candidates.
`--gathers` times the backward's GEMMs that take token rows, fed a gathered copy (the shipped
path) against reading the rows in their loads (`quack_gemm.backward_gathers`), each tuned as the
layer tunes it, in interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_table, time_cuda, write_json
from vlmoe.moe.kernels import quack_gemm
from vlmoe.moe.kernels import swiglu as swiglu_kernels
from vlmoe.moe.kernels.swiglu import swiglu_backward_triton, swiglu_forward_triton, swiglu_pairs_backward

SHAPES = [(16384, 2048, 5632, 4, 2), (8192, 4096, 14336, 8, 2), (16384, 2048, 1408, 64, 6)]


def _problem(tokens, hidden, intermediate, num_experts, top_k):
    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    slot_experts = torch.rand(tokens, num_experts, device=dev).topk(top_k, dim=-1).indices.reshape(-1)
    _, sorted_slots = torch.sort(slot_experts.to(torch.int32), stable=True)
    counts = torch.bincount(slot_experts, minlength=num_experts)
    bounds = quack_gemm.cu_seqlens(counts.cumsum(0))  # [0, offsets...], as DispatchPlan.segment_bounds
    sorted_tokens = sorted_slots // top_k
    rows = tokens * top_k
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    gate_up = torch.randn(num_experts, 2 * intermediate, hidden, device=dev, dtype=dt) * 0.02
    down = torch.randn(num_experts, hidden, intermediate, device=dev, dtype=dt) * 0.02
    grad_tokens = torch.randn(tokens, hidden, device=dev, dtype=dt)
    row_scale = torch.rand(rows, device=dev)
    return dict(
        sorted_slots=sorted_slots.long(),
        x=x,
        gate_up=gate_up,
        down=down,
        bounds=bounds,
        sorted_tokens=sorted_tokens,
        grad_tokens=grad_tokens,
        row_scale=row_scale,
        rows=rows,
    )


def _steps(p):
    """(name, path, flops, step) for each call of the fused and the unfused path."""
    x, gate_up, down, bounds, tokens = p["x"], p["gate_up"], p["down"], p["bounds"], p["sorted_tokens"]
    rows, hidden, width = p["rows"], x.shape[1], gate_up.shape[1]
    scale, grad_tokens, slots = p["row_scale"], p["grad_tokens"], p["sorted_slots"]
    mm, grad_input, grad_weight = (
        quack_gemm.experts_mm,
        quack_gemm.experts_mm_grad_input,
        quack_gemm.experts_mm_grad_weight,
    )
    x_sorted = x.index_select(0, tokens)
    preact, hidden_rows = quack_gemm.experts_swiglu(x, gate_up, bounds, tokens)
    gate_up_rows = mm(x, gate_up, bounds, token_rows=tokens)
    grad_sorted = grad_tokens.index_select(0, tokens)
    grad_hidden = grad_input(grad_sorted, down, bounds)
    # The pairs pass runs in place as in the layer (timed on copies it may overwrite; v17's
    # reading cloned grad_hidden inside the step, which added one [S, F] copy to its time).
    pairs_preact, pairs_grad = preact.clone(), grad_hidden.clone()
    first = 2 * rows * hidden * width
    second = rows * hidden * width  # 2 * rows * hidden * F
    return [
        ("gate_up forward + SwiGLU (epilogue)", "fused", first,
         lambda: quack_gemm.experts_swiglu(x, gate_up, bounds, tokens)),
        ("gate_up forward (gathered)", "unfused", first, lambda: mm(x, gate_up, bounds, token_rows=tokens)),
        ("SwiGLU pass, row scale", "unfused", 0, lambda: swiglu_forward_triton(gate_up_rows, scale)),
        ("down forward", "both", second, lambda: mm(hidden_rows, down, bounds)),
        ("gather output gradient", "both", 0, lambda: grad_tokens.index_select(0, tokens)),
        ("down grad input", "both", second, lambda: grad_input(grad_sorted, down, bounds)),
        ("SwiGLU backward pass, pairs, w * hidden out", "fused", 0,
         lambda: swiglu_pairs_backward(pairs_preact, pairs_grad, scale, slots, out=pairs_preact)),
        ("SwiGLU backward pass", "unfused", 0,
         lambda: swiglu_backward_triton(gate_up_rows, grad_hidden, row_scale=scale)),
        ("down grad input + SwiGLU grad (dgated epilogue)", "dgated", second,
         lambda: quack_gemm.experts_swiglu_backward(grad_sorted, down, preact, scale, bounds)),
        ("down grad weight", "both", second, lambda: grad_weight(grad_sorted, hidden_rows, down, bounds)),
        ("gate_up grad weight (interleaved)", "fused", first,
         lambda: grad_weight(preact, x_sorted, gate_up, bounds, interleaved=True)),
        ("gate_up grad weight", "unfused", first,
         lambda: grad_weight(gate_up_rows, x_sorted, gate_up, bounds)),
        ("gate_up grad input (interleaved)", "fused", first,
         lambda: grad_input(preact, gate_up, bounds, interleaved=True)),
        ("gate_up grad input", "unfused", first, lambda: grad_input(gate_up_rows, gate_up, bounds)),
        ("re-gather x", "both", 0, lambda: x.index_select(0, tokens)),
    ]  # fmt: skip


EPILOGUE_TILES = [
    (128, 192, 2, 1, True),
    (128, 128, 2, 1, True),
    (128, 160, 2, 1, True),
    (128, 192, 1, 1, True),
    (128, 128, 1, 1, True),
    (256, 128, 2, 1, False),
    (256, 192, 2, 1, False),
    (128, 256, 2, 1, False),
]


def epilogue_variants(reps: int) -> list[dict]:
    """The SwiGLU epilogue GEMMs over more tiles than quack_gemm times, and dgated without its
    gather, without its row reduction, and on QuACK's dynamic scheduler: which one costs."""
    rows_out = []
    for shape in SHAPES:
        rows_out += _epilogue_variants_for(shape, reps)
        torch.cuda.empty_cache()
    write_json("quack_epilogue_variants", rows_out)
    return rows_out


def _epilogue_variants_for(shape, reps: int) -> list[dict]:
    from quack.gemm_interface import gemm_act, gemm_dact

    rows_out = []
    p = _problem(*shape)
    x, gate_up, down, tokens = p["x"], p["gate_up"], p["down"], p["sorted_tokens"]
    cu = p["bounds"]
    a_idx = tokens.to(torch.int32)
    preact, _ = quack_gemm.experts_swiglu(x, gate_up, p["bounds"], tokens)
    grad_sorted = p["grad_tokens"].index_select(0, tokens)
    dx, post = torch.empty_like(preact), preact.new_empty(preact.shape[0], preact.shape[1] // 2)
    hidden = post.clone()

    def dgated(tile, gather=True, reduce=True, dynamic=False):
        a = p["grad_tokens"] if gather else grad_sorted
        return gemm_dact(
            a, down, preact, activation="swiglu", dx_out=dx, postact_out=post,
            colvec_scale=p["row_scale"], colvec_reduce=reduce, cu_seqlens_m=cu,
            A_idx=a_idx if gather else None, dynamic_scheduler=dynamic, tuned=False,
            config=quack_gemm.gemm_config(tile),
        )  # fmt: skip

    def gated(tile):
        return gemm_act(
            x, gate_up.transpose(-2, -1), activation="swiglu", preact_out=dx, postact_out=hidden,
            cu_seqlens_m=cu, A_idx=a_idx, concat_layout=("B",), tuned=False,
            config=quack_gemm.gemm_config(tile),
        )  # fmt: skip

    slot_weights, sorted_slots = p["row_scale"], p["sorted_slots"]

    def v26(tile):  # the shipped backward up to preact: the plain GEMM, then the pairs pass
        with _tile_pinned(tile):
            grad_hidden = quack_gemm.experts_mm_grad_input(grad_sorted, down, cu)
        return swiglu_pairs_backward(preact, grad_hidden, slot_weights, sorted_slots, out=dx)

    variants = []
    for tile in EPILOGUE_TILES:
        variants.append((f"dgated {tile}", lambda tile=tile: dgated(tile)))
    for tile in ((128, 128, 2, 1, True), (128, 192, 2, 1, True), (128, 256, 1, 2, False)):
        variants.append((f"v27: dgated pre-gathered {tile}", lambda tile=tile: dgated(tile, gather=False)))
        variants.append((f"v26: plain GEMM {tile} + pairs pass", lambda tile=tile: v26(tile)))
    base = EPILOGUE_TILES[0]
    variants += [
        ("dgated, rows pre-gathered (no A_idx)", lambda: dgated(base, gather=False)),
        ("dgated, no row reduction", lambda: dgated(base, reduce=False)),
        ("dgated, dynamic scheduler", lambda: dgated(base, dynamic=True)),
        ("dgated, pre-gathered, no reduction", lambda: dgated(base, gather=False, reduce=False)),
    ]
    variants += [(f"gated {tile}", lambda tile=tile: gated(tile)) for tile in EPILOGUE_TILES]
    for name, step in variants:
        try:
            ms = time_cuda(step, reps=reps)
        except Exception as error:  # a tile this epilogue refuses
            print(f"{shape} {name}: {type(error).__name__} {str(error)[:120]}", flush=True)
            ms = float("nan")
        rows_out.append({"shape": str(shape), "variant": name, "ms": ms})
        print(f"{shape} {name}: {ms:.3f} ms", flush=True)
    return rows_out


# QuACK's SM90 tile space (quack.gemm_config: cooperative 256 x n and 128 x 224/256, pingpong
# 128 x n, clusters 2x1 and 1x2), then the default tile at other swizzles (a runtime argument).
SWEEP_TILES = [
    (128, 192, 2, 1, True),
    (128, 192, 1, 2, True),
    (128, 160, 2, 1, True),
    (128, 128, 2, 1, True),
    (128, 208, 1, 2, True),
    (128, 256, 2, 1, False),
    (128, 256, 1, 2, False),
    (128, 224, 2, 1, False),
    (256, 128, 2, 1, False),
    (256, 128, 1, 2, False),
    (256, 160, 2, 1, False),
    (256, 192, 2, 1, False),
    (256, 208, 2, 1, False),
    (128, 192, 2, 1, True, 1),
    (128, 192, 2, 1, True, 4),
    (128, 192, 2, 1, True, 16),
]
GEMM_STEPS = (
    "gate_up forward + SwiGLU (epilogue)",
    "down forward",
    "down grad input",
    "down grad weight",
    "gate_up grad weight (interleaved)",
    "gate_up grad input (interleaved)",
)


def _tile_name(tile) -> str:
    m, n, cm, cn, pp, *swizzle = tile
    return f"{m}x{n} {cm}x{cn} {'pp' if pp else 'coop'}" + (f" swz{swizzle[0]}" if swizzle else "")


@contextlib.contextmanager
def _tile_pinned(tile):
    """quack_gemm held to `tile` inside the block: its only candidate, so nothing is tuned."""
    saved = quack_gemm.CANDIDATES
    quack_gemm.CANDIDATES = (tile,)
    try:
        yield
    finally:
        quack_gemm.CANDIDATES = saved


def _time_with_tile(step, tile, reps: int) -> tuple[float, str | None]:
    """(median ms, None) of `step` with quack_gemm held to `tile`, or (NaN, the error) where the
    problem refuses that tile (QuACK's gather takes cluster_n 1 only: no candidate is left)."""
    with _tile_pinned(tile):
        try:
            return time_cuda(step, reps=reps), None
        except (RuntimeError, IndexError) as error:  # _run reports every QuACK failure as RuntimeError
            return float("nan"), f"{type(error).__name__}: {str(error)[:80]}"


def tile_sweep(reps: int) -> None:
    """Each GEMM of the fused path over SWEEP_TILES; the gain of its best over the best candidate."""
    quack_gemm.TUNE = False
    candidates = quack_gemm.CANDIDATES
    results, summary = [], []
    for shape in SHAPES:
        problem = _problem(*shape)
        gain_total = 0.0
        for name, _, _, step in _steps(problem):
            if name not in GEMM_STEPS:
                continue
            times = {}
            for tile in SWEEP_TILES:
                times[tile], error = _time_with_tile(step, tile, reps)
                if error:
                    print(f"{shape} {name} {_tile_name(tile)}: {error}", flush=True)
            valid = {t: ms for t, ms in times.items() if ms == ms}
            best = min(valid, key=valid.__getitem__)
            picked = min((valid[t] for t in candidates if t in valid), default=float("nan"))
            results.append(
                {"shape": str(shape), "step": name, **{_tile_name(t): v for t, v in times.items()}}
            )
            gain = picked - valid[best]
            summary.append(
                [str(shape), name, f"{picked:.3f}", _tile_name(best), f"{valid[best]:.3f}", f"{gain:.3f}"]
            )
            gain_total += gain
            print(" | ".join(summary[-1]), "|", " ".join(f"{ms:.3f}" for ms in times.values()), flush=True)
        summary.append([str(shape), "TOTAL gain", "", "", "", f"{gain_total:.3f}"])
        del problem
        torch.cuda.empty_cache()
    print("tiles, in order:", "; ".join(_tile_name(t) for t in SWEEP_TILES))
    print_table(
        "The fused path's GEMMs over QuACK's tile space, ms (best of quack_gemm's candidates vs best of all)",
        ["shape", "step", "candidates' best", "best tile", "its ms", "gain ms"],
        summary,
    )
    write_json("quack_tiles", results)


# (BLOCK, num_warps) of the one-row-a-program kernel; v18's 2-D tiles (rows x 128 to 512, 8 and
# 16 warps) measured no faster (NOTES.md) and are gone.
# `--tiles rows`: every tile the small-experts rule tunes a varlen-M problem among (the 64-expert
# shape's), quack_gemm.ROW_TILES, and for reference two without an M cluster (a 64-row block and a
# 128-row one) of the kind s21-run1's sweep measured 2-60% slower.
ROW_SWEEP_TILES = [
    *quack_gemm.CANDIDATES,
    *quack_gemm.MORE_CANDIDATES,
    *quack_gemm.ROW_TILES,
    (64, 256, 1, 1, True),
    (128, 256, 1, 1, False),
]
# The varlen-M steps (each expert's last row block padded) and the small-experts backward's GEMM.
ROW_STEPS = (
    "gate_up forward + SwiGLU (epilogue)",
    "down forward",
    "down grad input",
    "down grad input + SwiGLU grad (dgated epilogue)",
    "gate_up grad input (interleaved)",
)


def _row_block(tile) -> int:
    """The rows QuACK's varlen-M scheduler hands an expert at a time with this tile: tile_m x cluster_m."""
    return tile[0] * tile[2]


def _padding(block: int, counts: torch.Tensor) -> float:
    """The fraction of rows computed past the experts' ends when each takes whole blocks of `block` rows."""
    return ((counts + block - 1) // block * block).sum().item() / counts.sum().item() - 1


def _compile_on_workers(step, tiles) -> None:
    """Every kernel of `step` over `tiles` compiled at once on QuACK's compile workers, by letting
    quack_gemm tune the step among them (v26's pool; a tile QuACK refuses is left out with a
    warning), so the sweep's timing loads kernels instead of compiling one after another."""
    saved = quack_gemm.CANDIDATES, quack_gemm.MORE_CANDIDATES, quack_gemm.ROW_TILES, quack_gemm.TUNE
    quack_gemm.CANDIDATES, quack_gemm.MORE_CANDIDATES, quack_gemm.ROW_TILES = tuple(tiles), (), ()
    quack_gemm.TUNE = True
    try:
        quack_gemm._chosen.clear()
        step()
    finally:
        quack_gemm.CANDIDATES, quack_gemm.MORE_CANDIDATES, quack_gemm.ROW_TILES, quack_gemm.TUNE = saved
        quack_gemm._chosen.clear()


def row_block_sweep(reps: int, rounds: int = 5) -> None:
    """The varlen-M GEMMs (and the dgated backward) over tiles of coarse and fine row blocks, each
    tile's median over interleaved rounds, with the padding its row block computes."""
    import os
    import tempfile

    os.environ["VLMOE_CACHE_DIR"] = tempfile.mkdtemp()  # the sweep's tunings stay out of the user's cache
    quack_gemm._disk_loaded = True
    quack_gemm.TUNE = False
    results, summary = [], []
    for shape in SHAPES:
        problem = _problem(*shape)
        counts = problem["bounds"].diff().cpu()
        print(f"{shape}: padding by row block " + ", ".join(
            f"{block}: {_padding(block, counts):.2%}" for block in (64, 128, 192, 256)
        ), flush=True)  # fmt: skip
        steps = {name: step for name, _, _, step in _steps(problem) if name in ROW_STEPS}
        for name, step in steps.items():
            _compile_on_workers(step, ROW_SWEEP_TILES)
            times = {tile: [] for tile in ROW_SWEEP_TILES}
            for _ in range(rounds):
                for tile in ROW_SWEEP_TILES:
                    ms, error = _time_with_tile(step, tile, reps)
                    times[tile].append(ms)
                    if error and len(times[tile]) == 1:
                        print(f"{shape} {name} {_tile_name(tile)}: {error}", flush=True)
            medians = {tile: statistics.median(v) for tile, v in times.items() if v[0] == v[0]}
            best = min(medians, key=medians.__getitem__)
            coarse = min((t for t in medians if _row_block(t) > 128), key=medians.__getitem__, default=None)
            for tile in ROW_SWEEP_TILES:
                ms = medians.get(tile, float("nan"))
                results.append({
                    "shape": str(shape), "step": name, "tile": _tile_name(tile), "ms": ms,
                    "rounds_ms": times[tile], "padding": _padding(_row_block(tile), counts),
                })  # fmt: skip
            coarse_ms = medians.get(coarse, float("nan"))
            summary.append([
                str(shape), name, _tile_name(coarse) if coarse else "-", f"{coarse_ms:.3f}",
                _tile_name(best), f"{medians[best]:.3f}", f"{_padding(_row_block(best), counts):.1%}",
                f"{coarse_ms - medians[best]:.3f}",
            ])  # fmt: skip
            every = " ".join(f"{medians.get(t, float('nan')):.3f}" for t in ROW_SWEEP_TILES)
            print(" | ".join(summary[-1]), "|", every, flush=True)
        del problem, steps
        torch.cuda.empty_cache()
    print("tiles, in order:", "; ".join(_tile_name(t) for t in ROW_SWEEP_TILES))
    print_table(
        "Varlen-M GEMMs by row block, ms (median of interleaved rounds): the best tile of a row block over "
        "128 rows (tile_m x cluster_m) against the best of all",
        ["shape", "step", "best coarse", "its ms", "best tile", "its ms", "its padding", "gain ms"],
        summary,
    )
    write_json("quack_row_tiles", results)


def tuning_check(reps: int, rounds: int = 3) -> None:
    """quack_gemm's own pick per GEMM of the fused path against every candidate re-timed."""
    quack_gemm.TUNE = True
    quack_gemm._disk_loaded = True  # tune here and now, not from a cache file
    candidates = quack_gemm.CANDIDATES
    table = []
    for shape in SHAPES:
        problem = _problem(*shape)
        for name, _, _, step in _steps(problem):
            if name not in GEMM_STEPS:
                continue
            quack_gemm._chosen.clear()  # _steps ran some of these already: tune each one afresh
            step()  # the first call tunes, as in the layer
            keys = list(quack_gemm._chosen)
            picked = candidates[quack_gemm._chosen[keys[0]]] if keys else None
            times = {tile: [] for tile in candidates}
            for _ in range(rounds):
                for tile in candidates:
                    times[tile].append(_time_with_tile(step, tile, reps)[0])
            medians = {tile: statistics.median(v) for tile, v in times.items() if v[0] == v[0]}
            best = min(medians, key=medians.__getitem__)
            picked_ms = medians.get(picked, float("nan"))
            label = _tile_name(picked) if picked else "-"
            row = [label, f"{picked_ms:.3f}", _tile_name(best), f"{medians[best]:.3f}"]
            table.append([str(shape), name, *row, f"{picked_ms - medians[best]:.3f}"])
            print(" | ".join(table[-1]), flush=True)
        del problem
        torch.cuda.empty_cache()
    print_table(
        "quack_gemm's tuning: its pick against every candidate, re-timed (median of interleaved rounds)",
        ["shape", "step", "picked", "its ms", "best candidate", "its ms", "loss ms"],
        table,
    )


def _gather_pairs(p):
    """(name, copied first, read in place) for the backward's GEMMs that take token rows, each
    side the whole of what it runs: the copy to expert order is part of the first."""
    x, gate_up, down, bounds, tokens = p["x"], p["gate_up"], p["down"], p["bounds"], p["sorted_tokens"]
    scale, grad_tokens = p["row_scale"], p["grad_tokens"]
    # Tuned as the layer tunes them: the small-experts rule's tiles where it takes the layer.
    small = {"small_experts": quack_gemm.is_small_experts(down)}
    preact, _ = quack_gemm.experts_swiglu(x, gate_up, bounds, tokens, **small)
    grad_preact = preact.clone()  # the values do not matter, only the layout

    def dgated_then_down(gathered: bool):
        if gathered:
            out = quack_gemm.experts_swiglu_backward(
                grad_tokens, down, preact, scale, bounds, token_rows=tokens, **small
            )
            quack_gemm.experts_mm_grad_weight(grad_tokens, out[1], down, bounds, token_rows=tokens, **small)
        else:
            grad_rows = grad_tokens.index_select(0, tokens)
            out = quack_gemm.experts_swiglu_backward(grad_rows, down, preact, scale, bounds, **small)
            quack_gemm.experts_mm_grad_weight(grad_rows, out[1], down, bounds, **small)

    return [
        (
            "gate_up grad weight: x re-gathered / gathered along K",
            lambda: quack_gemm.experts_mm_grad_weight(
                grad_preact, x.index_select(0, tokens), gate_up, bounds, interleaved=True, **small
            ),
            lambda: quack_gemm.experts_mm_grad_weight_gathered_x(
                grad_preact, x, tokens, gate_up, bounds, interleaved=True, **small
            ),
        ),
        (
            "dgated + down grad weight: output gradient gathered / read in place",
            lambda: dgated_then_down(False),
            lambda: dgated_then_down(True),
        ),
    ]


def gather_check(reps: int, rounds: int = 5) -> None:
    """Each of `_gather_pairs`, tuned as the layer tunes it (the small-experts rule where it
    applies), then timed side by side in interleaved rounds."""
    table = []
    for shape in SHAPES:
        problem = _problem(*shape)
        for name, copied, in_place in _gather_pairs(problem):
            copied(), in_place()  # tune and compile, outside the timing
            times = {"copied": [], "in place": []}
            for _ in range(rounds):
                times["copied"].append(time_cuda(copied, reps=reps))
                times["in place"].append(time_cuda(in_place, reps=reps))
            a, b = (statistics.median(v) for v in times.values())
            ratios = sorted(c / i for c, i in zip(times["copied"], times["in place"], strict=True))
            spread = f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"
            table.append([str(shape), name, f"{a:.3f}", f"{b:.3f}", f"{a - b:+.3f}", spread])
            print(" | ".join(table[-1]), flush=True)
        del problem
        torch.cuda.empty_cache()
    print_table(
        "the backward's token rows copied first against read in the GEMMs' loads, ms (median of rounds)",
        ["shape", "GEMMs", "copied", "in place", "saved", "copied / in place per round"],
        table,
    )


# (ROWS, BLOCK, num_warps) of the v25 kernel; swiglu_kernels.PAIRS_LAUNCH is the default.
PAIRS_LAUNCHES = [(1, 512, 4), (1, 256, 2), (2, 512, 4), (2, 256, 4), (4, 128, 4), (8, 128, 4), (8, 128, 8),
                  (16, 128, 8), (4, 256, 8), (1, 2048, 8)]  # fmt: skip


def pairs_launches(reps: int) -> None:
    """The pairs SwiGLU backward in place (as `combined_glu` runs it) over launch shapes, beside
    the v18 kernel with the two gathers and the reduction around it that the layer ran before
    v25 (`v18_pairs_backward`). Bandwidth: the 6 [S, F] bf16 units it moves (preact 2 in, 2
    out, grad_hidden 1 in, 1 out); the concat-layout kernel moves 5."""
    table = []
    for shape in SHAPES:
        table += _pairs_rows(shape, reps)
        torch.cuda.empty_cache()
    print_table(
        "SwiGLU backward kernels, in place", ["shape", "kernel (ROWS, BLOCK, warps)", "ms", "TB/s"], table
    )


def _pairs_rows(shape, reps: int) -> list[list[str]]:
    tokens, _, width, _, top_k = shape
    rows = tokens * top_k
    torch.manual_seed(0)
    preact = torch.randn(rows, 2 * width, device="cuda", dtype=torch.bfloat16)
    grad_hidden = torch.randn(rows, width, device="cuda", dtype=torch.bfloat16)
    slot_weights = torch.rand(rows, device="cuda")
    sorted_slots = torch.randperm(rows, device="cuda")
    unit = rows * width * 2  # bytes of one [S, F] bf16 tensor
    steps = {"v18 kernel + gathers + reduction (before v25)": lambda: v18_pairs_backward(
        preact, grad_hidden, slot_weights, sorted_slots, out=preact
    )}  # fmt: skip
    for launch in [*PAIRS_LAUNCHES, None]:
        label = f"v25 {launch}" if launch else f"v25 {swiglu_kernels.PAIRS_LAUNCH} (default)"
        steps[label] = lambda launch=launch: swiglu_pairs_backward(
            preact, grad_hidden, slot_weights, sorted_slots, out=preact, launch=launch
        )
    # Interleaved rounds: every launch once per round, the median over rounds.
    times: dict[str, list[float]] = {label: [] for label in steps}
    for _ in range(5):
        for label, step in steps.items():
            times[label].append(time_cuda(step, reps=reps))
    out = []
    for label, values in times.items():
        ms = statistics.median(values)
        out.append([str(shape), label, f"{ms:.3f}", f"{6 * unit / ms / 1e9:.2f}"])
    ms = time_cuda(
        lambda: swiglu_backward_triton(preact, grad_hidden, out=preact, row_scale=slot_weights), reps=reps
    )
    out.append([str(shape), "concat layout kernel, in place", f"{ms:.3f}", f"{5 * unit / ms / 1e9:.2f}"])
    return out


if swiglu_kernels.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _v18_pairs_kernel(
        preact_words, row_scale, grad_hidden, grad_words, grad_scale_parts, size, BLOCK: tl.constexpr
    ):
        # The v18 kernel as the layer ran it until v25 (a named baseline, kept here only): one
        # program per (row, column block), a partial weight gradient per block.
        row = tl.program_id(0).to(tl.int64)
        block = tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        inside = cols < size
        words = tl.load(preact_words + row * size + cols, mask=inside, other=0)
        gate = (words << 16).to(tl.float32, bitcast=True)
        up = (words & -65536).to(tl.float32, bitcast=True)
        grad = tl.load(grad_hidden + row * size + cols, mask=inside, other=0.0).to(tl.float32)
        scale = tl.load(row_scale + row).to(tl.float32)
        hidden = gate * tl.sigmoid(gate) * up
        tl.store(grad_scale_parts + row * tl.num_programs(1) + block, tl.sum(grad * hidden, axis=0))
        grad_gate, grad_up = swiglu_kernels._swiglu_grads(gate, up, grad * scale)
        gate_bits = grad_gate.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        up_bits = grad_up.to(tl.bfloat16).to(tl.int16, bitcast=True).to(tl.int32) << 16
        tl.store(grad_words + row * size + cols, gate_bits | up_bits, mask=inside)
        tl.store(
            grad_hidden + row * size + cols, (hidden * scale).to(grad_hidden.dtype.element_ty), mask=inside
        )


def v18_pairs_backward(preact, grad_hidden, slot_weights, sorted_slots, out=None, launch=None):
    """v18's path with `swiglu_pairs_backward`'s signature (so the layer can run it, moe_layer.py
    --v18-pairs): the weights gathered to row order (v18 did it in the forward), the kernel with
    v18's blocks (of 1024 and 512 columns, the one that pads a row least, 1024 on a tie), the
    per-block sums reduced, the gradient put back in slot order (v18: an index_select by
    slot_rows; here its inverse, an index_copy)."""
    rows, size = grad_hidden.shape
    grad_preact = torch.empty_like(preact) if out is None else out
    row_scale = slot_weights.index_select(0, sorted_slots)
    block = min((1024, 512), key=lambda block: (triton.cdiv(size, block) * block, -block))
    blocks = triton.cdiv(size, block)
    parts = preact.new_empty(rows, blocks, dtype=torch.float32)
    _v18_pairs_kernel[(rows, blocks)](
        preact.view(torch.int32),
        row_scale,
        grad_hidden,
        grad_preact.view(torch.int32),
        parts,
        size,
        BLOCK=block,
    )
    grad_slot_weights = torch.empty_like(slot_weights, dtype=torch.float32)
    return grad_preact, grad_slot_weights.index_copy_(0, sorted_slots, parts.sum(dim=1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--epilogues", action="store_true", help="only the epilogue GEMMs' variants")
    parser.add_argument(
        "--tiles", nargs="?", const="space", choices=("space", "rows"),
        help="the fused path's GEMMs over QuACK's tile space, or (rows) the varlen-M ones by row block",
    )  # fmt: skip
    parser.add_argument("--pairs", action="store_true", help="the pairs SwiGLU backward's launch shapes")
    parser.add_argument("--chosen", action="store_true", help="quack_gemm's tuning against a re-timing")
    parser.add_argument("--gathers", action="store_true", help="the backward's token rows read in place")
    parser.add_argument("--shape", type=int, action="append", choices=range(1, len(SHAPES) + 1))
    args = parser.parse_args()
    if args.shape:
        SHAPES[:] = [SHAPES[n - 1] for n in args.shape]
    if args.pairs:  # Triton only: no QuACK needed
        pairs_launches(args.reps)
        return
    assert quack_gemm.available(), "needs QuACK and a Hopper GPU"
    if args.epilogues:
        epilogue_variants(args.reps)
        return
    if args.tiles == "rows":
        row_block_sweep(min(args.reps, 10))
        return
    if args.tiles:
        tile_sweep(min(args.reps, 10))
        return
    if args.chosen:
        tuning_check(min(args.reps, 10))
        return
    if args.gathers:
        gather_check(min(args.reps, 10))
        return
    quack_gemm.TUNE = False
    candidates = quack_gemm.CANDIDATES
    results, table = [], []
    for shape in SHAPES:
        problem = _problem(*shape)
        a = torch.randn(problem["rows"], 4096, device="cuda", dtype=torch.bfloat16)
        for name, path, flops, step in _steps(problem):
            row = {"shape": str(shape), "step": name, "path": path}
            if flops:
                # One cuBLAS matmul of the same FLOPs: rows x 4096 times 4096 x n.
                n = max(8, round(flops / (2 * problem["rows"] * 4096) / 8) * 8)
                b = torch.randn(4096, n, device="cuda", dtype=torch.bfloat16)
                row["cublas_ms"] = time_cuda(lambda a=a, b=b: a @ b, reps=args.reps)
                for index, tile in enumerate(candidates):
                    row[f"tile{index}_ms"], error = _time_with_tile(step, tile, args.reps)
                    if error:
                        row[f"tile{index}_error"] = error
                best = min(v for k, v in row.items() if k.startswith("tile") and k.endswith("_ms") and v == v)
                row["ms"], row["vs_cublas"] = best, row["cublas_ms"] / best
            else:
                row["ms"] = time_cuda(step, reps=args.reps)
            results.append(row)
            cells = [f"{row.get(f'tile{i}_ms', float('nan')):.3f}" for i in range(len(candidates))]
            ratio = f"{row['vs_cublas']:.2f}" if "vs_cublas" in row else ""
            table.append([row["shape"], path, name, f"{row['ms']:.3f}", *cells, ratio])
            print(" | ".join(table[-1]), flush=True)
        for path in ("fused", "unfused"):
            total = sum(r["ms"] for r in results if r["shape"] == str(shape) and r["path"] in (path, "both"))
            table.append(
                [str(shape), path, "TOTAL (best tiles)", f"{total:.3f}", *[""] * len(candidates), ""]
            )
        del problem
        torch.cuda.empty_cache()
    tiles = [_tile_name(tile) for tile in candidates]
    print_table(
        "QuACK calls of fused and unfused SwiGLU experts, ms (best tile; vs cuBLAS: its ms, same FLOPs / ms)",
        ["shape", "path", "step", "ms", *tiles, "vs cuBLAS"],
        table,
    )
    write_json("quack_fused_ops", results)


if __name__ == "__main__":
    main()
