"""The benchmarks' timing bookkeeping (benchmarks/common.py), with a scripted clock: which step
runs when, which rounds are kept, and how ratios pair up. No timing is asserted."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from common import round_ratios, span, time_rounds


def test_time_rounds_interleaves_and_drops_the_warmup_round():
    calls: list[str] = []
    clock = iter([100.0, 200.0, 1.0, 2.0, 3.0, 6.0, 5.0, 10.0])  # round 0 (warm-up) first

    def timer(step, warmup, reps):
        step()
        assert (warmup, reps) == (2, 7)
        return next(clock)

    steps = {"base": lambda: calls.append("base"), "method": lambda: calls.append("method")}
    times = time_rounds(steps, rounds=3, reps=7, timer=timer)
    assert calls == ["base", "method"] * 4  # A B, A B, ...: every round holds both
    assert times == {"base": [1.0, 3.0, 5.0], "method": [2.0, 6.0, 10.0]}
    assert round_ratios(times["base"], times["method"]) == [0.5, 0.5, 0.5]


def test_round_ratios_pair_within_a_round():
    # A drift that slows both steps in round 2 leaves its ratio unchanged.
    assert round_ratios([4.0, 8.0], [5.0, 10.0]) == pytest.approx([0.8, 0.8])
    with pytest.raises(ValueError):
        round_ratios([1.0], [1.0, 2.0])


def test_span():
    assert span([1.234, 0.9, 1.01]) == "0.90-1.23"
    assert span([]) == "-"
