"""Tile choices ranked inside the step that runs them (`tune_in_step`; NOTES.md v29).

`quack_gemm` picks each expert-matmul problem's tile by timing its candidates alone, one call
each, on the problem's first call. On an H200 the layer then runs at the board's power cap
(~700 W, ~1450 MHz; NOTES.md session 18), where a step's time is its energy, and a GEMM's share
of the power depends on the memory-bound passes around it. So a tile that is fastest alone can
be slower in the step: the extra tiles (`quack_gemm.MORE_CANDIDATES`) gained 2-4% in the layer at
the 64-expert shape and lost 2% at the 4-expert one (s17-run1/2), and timing them alone at the
cap's clocks (v28) chose worse tiles still. What the layer's own ranking needs is the step's
time with each tile: this module times it.

For each problem the step meets (in the order it meets them), each candidate tile is set as the
problem's choice and the whole step is timed, in `rounds` interleaved rounds of one span of
back-to-back steps per candidate (the power controller's state weighs on all candidates of a
round alike); a candidate's score is the median over rounds of its span's time over the current
choice's in the same round. The best candidate replaces the current choice only where it
scores below `1 - margin` twice: in the ranking, and again in as many fresh rounds of the two
alone (the lowest of many noisy medians is biased low; s19-run1 took five tiles on scores of
0.985-0.995 that together gained 0.6%). One pass, problem by problem (coordinate
descent): a later problem is ranked with the earlier ones' new choices in place. The choices are
what `quack_gemm` keeps for those problems, in-process and in its disk cache, so later steps and
later runs take them with no further cost.

Opt-in and explicit: at the 64-expert shape it runs ~45 candidate spans per round (a minute or
two with the extra tiles' first compile), far over the first-use budget the default tuning keeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from vlmoe.console import shared_console
from vlmoe.moe.kernels import quack_gemm


@dataclasses.dataclass(frozen=True)
class StepChoice:
    """One problem's ranking in the step: `key` (quack_gemm's problem key), the tile it had
    (`before`) and has now (`after`), each candidate tile's score (median over rounds of its
    span's step time over `before`'s in the same round; `before` scores 1) and the best one's
    confirmation."""

    key: str
    before: tuple
    after: tuple
    scores: dict[tuple, float]
    # The ranking's best tile over `before` again, in fresh rounds of those two alone (None where
    # no tile ranked below 1 - margin): the best of many noisy scores is biased low, this is not.
    confirmed: float | None = None

    @property
    def changed(self) -> bool:
        return self.after != self.before


def tune_in_step(
    step: Callable[[], None],
    *,
    extra_tiles: bool = True,
    rounds: int = 5,
    span_ms: float = 100.0,
    warmup_ms: float = 300.0,
    margin: float = 0.005,
    progress: bool = True,
) -> list[StepChoice]:
    """Rank the tile candidates of every QuACK expert-matmul problem that `step` runs by the
    time of `step` itself, and keep the winners (in this process and in quack_gemm's disk cache).

    `step`: a zero-argument callable running one forward and backward on fixed inputs, the way
    training runs them (no optimiser step, or the tuning trains the model; gradients it leaves are
    overwritten or accumulated, either is fine). It runs a few hundred times. `extra_tiles`: also
    the tiles of `quack_gemm.MORE_CANDIDATES` (their kernels compile on first use). `rounds`,
    `span_ms`: interleaved rounds, each one span of about `span_ms` of back-to-back steps per
    candidate. `margin`: how much faster than the current choice a tile must score to replace it.
    Returns one `StepChoice` per problem ranked; [] where no step ran a tuned QuACK problem (no
    QuACK or no Hopper GPU, problems too small, tuning off: nothing to rank).
    """
    if rounds < 1 or span_ms <= 0 or not 0 <= margin < 1:
        raise ValueError(
            f"tune_in_step: rounds={rounds}, span_ms={span_ms}, margin={margin}; "
            "rounds must be >= 1, span_ms > 0 and 0 <= margin < 1"
        )
    step()  # the problems' first use: compiled and tuned the usual way (quack_gemm._tuned)
    with quack_gemm.recording_problems(extra_tiles) as problems:
        step()
    problems = {key: candidates for key, candidates in problems.items() if len(candidates) > 1}
    if not problems:
        return []
    one_step = max(_span_ms(step, 1), 1e-3)
    steps = min(max(math.ceil(span_ms / one_step), 1), 1000)
    _span_ms(step, min(math.ceil(warmup_ms / one_step), 1000))  # to the clocks of a sustained load
    choices = []
    # The bar's total counts each problem's confirmation too (2 spans a round), run or not.
    total = sum(len(candidates) + 2 for candidates in problems.values()) * rounds
    with _progress(progress, total) as advance:
        for key, candidates in problems.items():
            choices.append(_rank(key, candidates, step, steps, rounds, margin, advance))
    quack_gemm._save_disk_cache()
    return choices


def _rank(
    key: str,
    candidates: list[int],
    step: Callable[[], None],
    steps: int,
    rounds: int,
    margin: float,
    advance: Callable[[], None],
) -> StepChoice:
    """Problem `key`'s candidates (the current choice first) timed in the step; the winner kept."""
    before = candidates[0]
    ratios: dict[int, list[float]] = {index: [] for index in candidates}
    try:
        for round_index in range(rounds):
            # Each round starts at another candidate, so none always runs right after the switch.
            shift = round_index % len(candidates)
            spans = {}
            for index in candidates[shift:] + candidates[:shift]:
                quack_gemm._chosen[key] = index
                spans[index] = _span_ms(step, steps)
                advance()
            for index in candidates:
                ratios[index].append(spans[index] / spans[before])
        scores = {index: statistics.median(values) for index, values in ratios.items()}
        best = min(candidates, key=scores.__getitem__)
        confirmed = None
        if scores[best] < 1.0 - margin:
            # With many candidates the lowest median is partly the spans' noise (the winner's curse):
            # the best one is timed again against the current choice, in as many rounds again.
            confirmed = statistics.median(
                _ratio_in_round(key, best, before, step, steps, advance, best_first=bool(round_index % 2))
                for round_index in range(rounds)
            )
        else:
            for _ in range(2 * rounds):  # the bar counts the confirmation's spans either way
                advance()
        after = best if confirmed is not None and confirmed < 1.0 - margin else before
    finally:
        quack_gemm._chosen[key] = before  # an interrupted ranking leaves the problem as it was
    quack_gemm._chosen[key] = after
    return StepChoice(
        key=key,
        before=quack_gemm._tile(before),
        after=quack_gemm._tile(after),
        scores={quack_gemm._tile(index): score for index, score in scores.items()},
        confirmed=confirmed,
    )


def _ratio_in_round(
    key: str,
    index: int,
    before: int,
    step: Callable[[], None],
    steps: int,
    advance: Callable[[], None],
    best_first: bool,
) -> float:
    """One round of two spans, `index`'s and `before`'s (in the order `best_first` says): the ratio."""
    spans = {}
    for tile in (index, before) if best_first else (before, index):
        quack_gemm._chosen[key] = tile
        spans[tile] = _span_ms(step, steps)
        advance()
    return spans[index] / spans[before]


def _span_ms(step: Callable[[], None], steps: int) -> float:
    """Milliseconds of `steps` back-to-back calls of `step`, by CUDA events (host time off CUDA)."""
    if not torch.cuda.is_available():
        start = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar over the timed spans (when `enabled`); yields its advance function."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    label = TextColumn("vlmoe: ranking tiles in the step")
    columns = (label, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=shared_console(), transient=True) as bar:
        task = bar.add_task("spans", total=total)
        yield lambda: bar.advance(task)


def summary(choices: list[StepChoice]) -> str:
    """One line per problem: its key, the tile before -> after, and the winner's score."""
    lines = []
    for choice in choices:
        mark = "->" if choice.changed else "=="
        score = choice.scores[choice.after]
        best = min(choice.scores, key=choice.scores.__getitem__)
        again = "" if choice.confirmed is None else f"; {best} {choice.confirmed:.3f} again"
        lines.append(f"{choice.key}: {choice.before} {mark} {choice.after} ({score:.3f} of before{again})")
    return "\n".join(lines)
