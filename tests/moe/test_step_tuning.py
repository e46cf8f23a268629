"""Tiles ranked inside the step (`vlmoe.moe.kernels.step_tuning`), on the QuACK stand-in
(conftest.py's `fake_quack`): which problems are recorded and with which candidates, how the
spans are interleaved and scored, what is kept (in-process and on disk), and that the step's
results stay exact while it is recorded. The timing itself is scripted: each span's time comes
from the tiles chosen while it runs."""

import json

import pytest
import torch
from torch import nn

from tests.moe.helpers import relative_error
from vlmoe.moe import GLUExperts, Routing, dispatch, reference_dispatch
from vlmoe.moe.kernels import quack_gemm, step_tuning
from vlmoe.moe.kernels import swiglu as swiglu_kernels

WEIGHT_GRAD_PAIRED = "grad_weight/sorted+interleaved"  # gate_up's weight gradient
FAST_TILE = (128, 128, 2, 1, True)  # one of the extra tiles (quack_gemm.MORE_CANDIDATES)


def _problem(tokens=40, hidden=16, intermediate=24, num_experts=4, top_k=2, seed=0):
    torch.manual_seed(seed)
    experts = GLUExperts(num_experts, hidden, intermediate, nn.SiLU()).double()
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.3)
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).float().double()
    routing = Routing(indices, weights, probs, logits)
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(tokens, hidden, dtype=torch.float64)
    return experts, routing, x, grad_out


def _step(experts, routing, x, grad_out):
    def step():
        for parameter in experts.parameters():
            parameter.grad = None
        x.grad = None
        dispatch(x, routing, experts, backend="grouped").backward(grad_out)

    return step


@pytest.fixture
def tuned(fake_quack, monkeypatch):
    """Tuning on, the first candidate the fastest when timed alone (so every problem starts there)."""
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(
        quack_gemm,
        "_elapsed_ms",
        lambda run: (run(), 1.0 if fake_quack.configs[-1].tile_n == 192 else 2.0)[1],
    )
    return fake_quack


class _ScriptedSpans:
    """A span's ms: `steps` x the sum over problems of the chosen tile's cost, where `costs` maps
    (key prefix, tile) to a cost and everything else costs 1. Records each span's choices."""

    def __init__(self, costs):
        self.costs, self.spans = costs, []

    def __call__(self, step, steps):
        chosen = {key: quack_gemm._tile(index) for key, index in quack_gemm._chosen.items()}
        self.spans.append((steps, chosen))
        total = 0.0
        for key, tile in chosen.items():
            total += next(
                (c for (prefix, t), c in self.costs.items() if key.startswith(prefix) and t == tile), 1.0
            )
        return steps * total


def test_a_tile_faster_in_the_step_replaces_the_choice_and_is_kept_on_disk(tuned, monkeypatch):
    experts, routing, x, grad_out = _problem()
    step = _step(experts, routing, x, grad_out)
    # gate_up's weight gradient runs 20% faster on an extra tile inside the step; forward's down
    # GEMM has a tile 0.2% faster, inside the margin; the others are best where they are.
    costs = {(WEIGHT_GRAD_PAIRED, FAST_TILE): 0.8, ("forward/sorted", quack_gemm.CANDIDATES[2]): 0.998}
    spans = _ScriptedSpans(costs)
    monkeypatch.setattr(step_tuning, "_span_ms", spans)

    choices = step_tuning.tune_in_step(step, rounds=3, span_ms=10.0, progress=False)

    by_key = {choice.key.split("/")[0] + "/" + choice.key.split("/")[1]: choice for choice in choices}
    assert len(choices) == 6 and len(by_key) == 6  # the six expert matmuls of one step
    changed = [choice for choice in choices if choice.changed]
    assert [choice.key.startswith(WEIGHT_GRAD_PAIRED) for choice in changed] == [True]
    (winner,) = changed
    assert winner.before == quack_gemm.CANDIDATES[0] and winner.after == FAST_TILE
    assert winner.scores[FAST_TILE] == pytest.approx(5.8 / 6.0)  # the step's six problems, one 20% faster
    assert winner.scores[winner.before] == 1.0 and winner.confirmed == pytest.approx(5.8 / 6.0)
    forward = by_key["forward/sorted"]
    assert not forward.changed and forward.scores[quack_gemm.CANDIDATES[2]] == pytest.approx(5.998 / 6.0)
    # Kept: in this process, and in the disk cache for later runs.
    assert quack_gemm._tile(quack_gemm._chosen[winner.key]) == FAST_TILE
    saved = json.loads(quack_gemm._cache_path().read_text())["chosen"]
    assert quack_gemm._tile(saved[winner.key]) == FAST_TILE
    # And the step now runs it: gate_up's weight gradient is the step's fifth GEMM.
    tuned.configs.clear()
    step()
    config = tuned.configs[4]
    assert (config.tile_m, config.tile_n, config.cluster_m, config.cluster_n, config.pingpong) == FAST_TILE
    assert "changed" not in step_tuning.summary(choices) and "->" in step_tuning.summary(choices)


def test_the_candidates_are_timed_in_interleaved_rounds_that_start_at_another_each_time(tuned, monkeypatch):
    experts, routing, x, grad_out = _problem()
    spans = _ScriptedSpans({})
    monkeypatch.setattr(step_tuning, "_span_ms", spans)
    # One step costs 6 (six problems at cost 1): span_ms 30 -> 5 steps a span; warm-up 300 ms -> 50.
    choices = step_tuning.tune_in_step(
        _step(experts, routing, x, grad_out), rounds=3, span_ms=30.0, progress=False
    )
    calibration, warm_up, *timed = spans.spans
    assert calibration[0] == 1 and warm_up[0] == 50 and {steps for steps, _ in timed} == {5}
    assert len(timed) == 3 * sum(len(choice.scores) for choice in choices)  # no confirmation: all level
    first = choices[0]
    count = len(first.scores)
    order = [chosen[first.key] for _, chosen in timed[: 3 * count]]
    rounds = [order[i : i + count] for i in range(0, len(order), count)]
    assert all(sorted(r) == sorted(rounds[0]) for r in rounds) and len(set(rounds[0])) == count
    assert [r[0] for r in rounds] == [rounds[0][0], rounds[0][1], rounds[0][2]]  # each starts further on
    assert not any(choice.changed for choice in choices)  # all level: nothing moves


def test_a_tile_that_ranks_first_by_chance_is_not_taken_when_timed_again(tuned, monkeypatch):
    experts, routing, x, grad_out = _problem()
    step = _step(experts, routing, x, grad_out)
    scripted = _ScriptedSpans({})
    lucky = {"spans": 0}

    def span(step, steps):
        # FAST_TILE on gate_up's weight gradient reads 5% fast in the ranking's spans, then level:
        # the noise that makes the lowest of many medians low.
        ms = scripted(step, steps)
        chosen = scripted.spans[-1][1]
        if any(k.startswith(WEIGHT_GRAD_PAIRED) and t == FAST_TILE for k, t in chosen.items()):
            lucky["spans"] += 1
            return ms * (0.95 if lucky["spans"] <= 3 else 1.0)
        return ms

    monkeypatch.setattr(step_tuning, "_span_ms", span)
    choices = step_tuning.tune_in_step(step, rounds=3, span_ms=10.0, progress=False)
    (weight_grad,) = [choice for choice in choices if choice.key.startswith(WEIGHT_GRAD_PAIRED)]
    assert weight_grad.scores[FAST_TILE] == pytest.approx(0.95)  # ranked first...
    assert weight_grad.confirmed == pytest.approx(1.0) and not weight_grad.changed  # ...but not again
    assert all(choice.confirmed is None for choice in choices if choice is not weight_grad)
    assert "again" in step_tuning.summary([weight_grad])
    assert quack_gemm._tile(quack_gemm._chosen[weight_grad.key]) == weight_grad.before


@pytest.mark.parametrize("extra_tiles", [True, False])
def test_recording_lists_each_problems_candidates_with_the_choice_first(tuned, extra_tiles):
    experts, routing, x, grad_out = _problem()
    step = _step(experts, routing, x, grad_out)
    step()
    before = dict(quack_gemm._chosen)
    with quack_gemm.recording_problems(extra_tiles) as problems:
        step()
    assert set(problems) == set(before)
    tiles = quack_gemm.CANDIDATES + quack_gemm.MORE_CANDIDATES
    for key, candidates in problems.items():
        assert candidates[0] == before[key] and len(set(candidates)) == len(candidates)
        more = {index for index in candidates if tiles[index] in quack_gemm.MORE_CANDIDATES}
        assert bool(more) is extra_tiles
        if "/gather" in key:  # QuACK's gather takes cluster_n 1 only
            assert all(tiles[index][3] == 1 for index in candidates)
        else:
            assert len(candidates) == len(tiles if extra_tiles else quack_gemm.CANDIDATES)
    assert quack_gemm._recording is None  # closed with the block
    with (
        quack_gemm.recording_problems(),
        pytest.raises(RuntimeError, match="already open"),
        quack_gemm.recording_problems(),
    ):
        pass


@pytest.mark.parametrize("fused_backward", [False, True])
def test_a_recorded_step_is_still_exact_even_where_its_backward_writes_in_place(
    tuned, monkeypatch, fused_backward
):
    # Recording runs every candidate once on the call's own operands; the dgated backward writes
    # preact's gradient over preact, so its candidates must run on a scratch output.
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    monkeypatch.setattr(swiglu_kernels, "OVERWRITE_IN_BACKWARD", True)
    experts, routing, x, grad_out = _problem(seed=3)
    inputs = [x, *experts.parameters()]
    torch.autograd.grad(dispatch(x, routing, experts, backend="grouped"), inputs, grad_out)  # tuned
    with quack_gemm.recording_problems() as problems:
        out = dispatch(x, routing, experts, backend="grouped")
        grads = torch.autograd.grad(out, inputs, grad_out)
    assert any(key.startswith("swiglu_backward") for key in problems) is fused_backward
    ref = reference_dispatch(x, routing, experts)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    assert relative_error(out, ref) < 1e-12
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad, ref_grad) < 1e-12


def test_probe_keys_stay_in_this_process_and_leave_the_shipped_choices_alone(tuned, monkeypatch):
    experts, routing, x, grad_out = _problem()
    step = _step(experts, routing, x, grad_out)
    step()
    shipped = dict(quack_gemm._chosen)
    monkeypatch.setattr(step_tuning, "_span_ms", _ScriptedSpans({(WEIGHT_GRAD_PAIRED, FAST_TILE): 0.5}))
    with quack_gemm.in_step_probe():
        choices = step_tuning.tune_in_step(step, rounds=1, progress=False)
    assert all(choice.key.endswith("/instep") for choice in choices)
    assert any(choice.changed for choice in choices)
    assert {key: index for key, index in quack_gemm._chosen.items() if key in shipped} == shipped
    saved = json.loads(quack_gemm._cache_path().read_text())["chosen"]
    assert set(saved) == set(shipped)


def test_an_interrupted_ranking_leaves_the_choice_as_it_was(tuned, monkeypatch):
    experts, routing, x, grad_out = _problem()
    step = _step(experts, routing, x, grad_out)
    step()
    before = dict(quack_gemm._chosen)
    calls = []

    def span(step, steps):
        calls.append(steps)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return float(steps)

    monkeypatch.setattr(step_tuning, "_span_ms", span)
    with pytest.raises(KeyboardInterrupt):
        step_tuning.tune_in_step(step, progress=False)
    assert quack_gemm._chosen == before and quack_gemm._recording is None


def test_nothing_to_rank_without_tuned_problems_and_bad_arguments_are_named(fake_quack, monkeypatch):
    experts, routing, x, grad_out = _problem()
    monkeypatch.setattr(step_tuning, "_span_ms", lambda step, steps: pytest.fail("timed"))
    # quack_gemm.TUNE is off (the fixture's default): every problem takes the first tile.
    assert step_tuning.tune_in_step(_step(experts, routing, x, grad_out), progress=False) == []
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        step_tuning.tune_in_step(lambda: None, rounds=0)
    with pytest.raises(ValueError, match="margin"):
        step_tuning.tune_in_step(lambda: None, margin=1.5)


def test_the_host_timer_runs_the_step_that_many_times():
    calls = []
    ms = step_tuning._span_ms(lambda: calls.append(1), 7)
    assert len(calls) == 7 and ms >= 0.0
