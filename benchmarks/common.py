"""Timing helpers for the benchmarks: CUDA-event medians and peak memory, one process."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_cuda(step: Callable[[], None], warmup: int = 5, reps: int = 20) -> float:
    """Median milliseconds of `step`, timed with CUDA events after warm-up.

    Steps run back to back with one synchronisation at the end, as in a training loop: the
    host queues the next step while the GPU runs this one, so host-side launch cost shows
    only where it exceeds the GPU work (as it would in training).
    """
    return statistics.median(step_times(step, warmup, reps))


def step_times(step: Callable[[], None], warmup: int, reps: int) -> list[float]:
    """Each of `reps` steps' milliseconds (CUDA events), queued back to back after `warmup`
    untimed ones and one synchronisation (`time_cuda`'s median is over these)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)
    ]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_rounds(
    steps: dict[str, Callable[[], None]],
    rounds: int,
    reps: int = 10,
    timer: Callable[..., float] = time_cuda,
    windows: list[tuple[str, int, float, float]] | None = None,
) -> dict[str, list[float]]:
    """Each step's median ms in each of `rounds` interleaved rounds (A B C, A B C, ...), after one
    warm-up round that is not kept. `windows`: where each kept timing's (step name, round from 0,
    host start and end time.perf_counter()) is appended, for the GPU's clocks in it (telemetry.py).

    Timed one after another, a method and its baseline can read different GPU clocks or a
    neighbour's noise (target 2's MoLE layer moved 11% between calls while PEFT's held, session 12);
    in rounds a drift weighs on every step alike, and `round_ratios` pairs each method with its
    baseline inside one round."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(rounds + 1):
        for name, step in steps.items():
            start = time.perf_counter()
            ms = timer(step, warmup=2, reps=reps)
            if round_index:
                times[name].append(ms)
                if windows is not None:
                    windows.append((name, round_index - 1, start, time.perf_counter()))
    return times


def round_ratios(baseline_ms: list[float], method_ms: list[float]) -> list[float]:
    """Baseline ms / method ms, round by round (above 1: the method is faster)."""
    return [baseline / method for baseline, method in zip(baseline_ms, method_ms, strict=True)]


def span(values: list[float]) -> str:
    """'min-max' of a list, two decimals, for a table cell."""
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def kernel_time(step: Callable[[], None], reps: int = 20, warmup: int = 3) -> tuple[float, float]:
    """(GPU kernel milliseconds, kernel launches) per `step`, from the profiler: the GPU's own
    time where the step alone is bound by the host (its launches take longer than its kernels)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3
    return total_ms / reps, sum(e.count for e in kernels) / reps


def peak_memory_mib(step: Callable[[], None]) -> float:
    """Peak memory one step allocates beyond what was already allocated."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def write_json(name: str, rows: list[dict]) -> Path:
    """Rows to $OUT/<name>.json (device runs) or benchmarks/results/<name>.json -> its path."""
    folder = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(folder, exist_ok=True)
    path = Path(folder) / f"{name}.json"
    with open(path, "w") as handle:
        json.dump(
            {
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "torch": torch.__version__,
                "rows": rows,
            },
            handle,
            indent=1,
        )
    return path


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for row in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))


@contextlib.contextmanager
def v14_variant(fold: bool, gather_inside: bool):
    """The layer with v14's two memory savings switched (NOTES.md v14): the combine weights applied
    in the SwiGLU kernel (else in the combine, which keeps y_sorted for their gradient), and the
    rows gathered inside the first matmul (else gathered first and kept by that matmul)."""
    from vlmoe.moe import GLUExperts

    folds, gathers = GLUExperts.folds_row_weights, GLUExperts.gathers_token_rows
    GLUExperts.folds_row_weights = lambda self: fold and folds(self)
    GLUExperts.gathers_token_rows = gather_inside
    try:
        yield
    finally:
        GLUExperts.folds_row_weights, GLUExperts.gathers_token_rows = folds, gathers
