"""vlmoe's QuACK path (`vlmoe.moe.kernels.quack_gemm`) without QuACK or a GPU.

A stand-in `quack` module (conftest.py's `fake_quack`) computes QuACK's documented varlen
semantics (its `gemm_ref`: varlen-M with an optional row gather of A, varlen-K) in float64, so
what is tested here is everything vlmoe does around the kernel: operand orientation, cu_seqlens,
the gather indices, the autograd functions that call it, the choice among configurations and its
cache. The kernel itself is tested on the GPU (test_quack_gemm_gpu.py)."""

import contextlib
import importlib
import json
import sys
import types

import pytest
import torch
from torch import nn

from tests.moe.helpers import SwiGLU, relative_error
from vlmoe.console import sharing
from vlmoe.moe import GLUExperts, MoEFeedForward, Routing, dispatch, reference_dispatch
from vlmoe.moe.kernels import quack_gemm
from vlmoe.moe.kernels import swiglu as swiglu_kernels

dispatch_module = importlib.import_module("vlmoe.moe.dispatch")


def _routing(tokens, num_experts, top_k, seed, empty_expert=None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=generator, dtype=torch.float64)
    if empty_expert is not None:
        logits[:, empty_expert] = -1e9
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    return Routing(indices, weights / weights.sum(-1, keepdim=True), probs, logits)


@pytest.mark.parametrize(
    ("fused", "gathers", "overwrite", "fused_backward"),
    [
        (True, True, True, False),
        (True, True, False, False),
        (True, True, True, True),
        (True, True, False, True),
        (False, True, True, False),
        (False, False, True, False),
    ],
)
@pytest.mark.parametrize("empty_expert", [None, 2])
def test_glu_experts_on_quack_match_the_reference_with_gradients(
    fake_quack, monkeypatch, fused, gathers, overwrite, fused_backward, empty_expert
):
    # fused: the SwiGLU in the first GEMM's epilogue (dispatch.combined_glu); else QuACK's plain
    # GEMMs around the SwiGLU (Triton's torch reference here), gathering in the first one or not.
    # fused_backward: the SwiGLU's gradient in the backward's first GEMM (QuACK's dgated).
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU", fused)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    monkeypatch.setattr(swiglu_kernels, "OVERWRITE_IN_BACKWARD", overwrite)
    torch.manual_seed(0)
    tokens, hidden, intermediate, num_experts, top_k = 37, 16, 24, 4, 2
    experts = GLUExperts(num_experts, hidden, intermediate, nn.SiLU()).double()
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.3)
    monkeypatch.setattr(experts, "gathers_token_rows", gathers)
    routing = _routing(tokens, num_experts, top_k, seed=1, empty_expert=empty_expert)
    # The fused path takes the combine weights as float32 row scales (the router's dtype on the
    # GPU) and returns their gradient in float32: float32 values here, and a float32 tolerance.
    weights = routing.combine_weights.float().double().requires_grad_()
    routing = Routing(routing.expert_indices, weights, routing.router_probs, routing.router_logits)
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(tokens, hidden, dtype=torch.float64)
    inputs = [x, weights, *experts.parameters()]

    out = dispatch(x, routing, experts, backend="grouped")
    grads = torch.autograd.grad(out, inputs, grad_out)
    assert any(call[0] == "gated" for call in fake_quack.calls) is fused
    assert any(call[0] == "dgated" for call in fake_quack.calls) is fused_backward
    fake_quack.calls.clear()
    ref = reference_dispatch(x, routing, experts)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)

    assert relative_error(out, ref) < 1e-12
    for grad, ref_grad, name in zip(grads, ref_grads, ["x", "weights", "gate_up", "down"], strict=True):
        assert relative_error(grad, ref_grad) < (1e-6 if name == "weights" and fused else 1e-12), name
    if empty_expert is not None:
        for grad in grads[2:]:
            assert grad[empty_expert].abs().max() == 0


@pytest.mark.parametrize("fused", [False, True])
def test_every_expert_matmul_goes_through_quack_and_the_first_gathers_in_its_loads(
    fake_quack, monkeypatch, fused
):
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU", fused)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    routing = _routing(20, 4, 2, seed=2)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    dispatch(x, routing, experts, backend="grouped").sum().backward()
    # (op, varlen-M, gathered): forward gate_up (gathered; fused: with the SwiGLU) and down;
    # backward of down (input grad, weight grad), then of gate_up (weight grad on re-gathered
    # rows, input grad). Fused, the three gate_up matmuls read gate and up paired in columns.
    assert [(op, m, g) for op, _, m, g in fake_quack.calls] == [
        ("gated" if fused else "gemm", True, True),
        ("gemm", True, False),
        ("gemm", True, False),
        ("gemm", False, False),
        ("gemm", False, False),
        ("gemm", True, False),
    ]
    paired = [("B",), None, None, None, ("out",), ("B",)]
    assert fake_quack.concat_layouts == (paired if fused else [None] * 6)


def test_fused_glu_experts_refuse_a_second_backward_over_their_overwritten_preact(fake_quack):
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    out = dispatch(x, _routing(20, 4, 2, seed=5), experts, backend="grouped")
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="OVERWRITE_IN_BACKWARD = False"):
        out.sum().backward()


def test_the_fused_backward_is_one_dgated_gemm_in_place_of_the_product_and_the_pass(fake_quack, monkeypatch):
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", True)
    monkeypatch.setattr(
        swiglu_kernels, "swiglu_pairs_backward", lambda *a, **k: pytest.fail("pairs pass ran")
    )
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    dispatch(x, _routing(20, 4, 2, seed=2), experts, backend="grouped").sum().backward()
    # Backward: the SwiGLU's gradient in the epilogue of the output gradient's product with down
    # (its rows gathered first, as down's weight gradient needs them), then as before.
    assert [op for op, *_ in fake_quack.calls] == ["gated", "gemm", "dgated", "gemm", "gemm", "gemm"]


@pytest.mark.parametrize("fused_backward", [True, False])
@pytest.mark.parametrize("mode", ["x", "all"])
def test_backward_gathers_read_token_rows_in_the_loads_and_match_the_reference(
    fake_quack, monkeypatch, mode, fused_backward
):
    # BACKWARD_GATHER "x": gate_up's weight gradient as its transpose, x gathered along K into an
    # M-major view of the result; "all": the output gradient also read in place, by the first
    # backward GEMM (varlen-M gather) and down's weight gradient (varlen-K gather).
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    spread = []
    real_spread = dispatch_module.spread_rows
    monkeypatch.setattr(
        dispatch_module, "spread_rows", lambda *a: spread.append(a[0].shape) or real_spread(*a)
    )
    torch.manual_seed(3)
    tokens, hidden, intermediate, num_experts, top_k = 29, 16, 24, 4, 2
    experts = GLUExperts(num_experts, hidden, intermediate, nn.SiLU()).double()
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.3)
    routing = _routing(tokens, num_experts, top_k, seed=4, empty_expert=1)
    weights = routing.combine_weights.float().double().requires_grad_()
    routing = Routing(routing.expert_indices, weights, routing.router_probs, routing.router_logits)
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(tokens, hidden, dtype=torch.float64)
    inputs = [x, weights, *experts.parameters()]
    with quack_gemm.backward_gathers(mode):
        grads = torch.autograd.grad(dispatch(x, routing, experts, backend="grouped"), inputs, grad_out)
    ref_grads = torch.autograd.grad(reference_dispatch(x, routing, experts), inputs, grad_out)
    for grad, ref_grad, name in zip(grads, ref_grads, ["x", "weights", "gate_up", "down"], strict=True):
        assert relative_error(grad, ref_grad) < (1e-6 if name == "weights" else 1e-12), name
    assert grads[2][1].abs().max() == 0 and grads[3][1].abs().max() == 0  # the empty expert's
    # (op, varlen-M, gathered) of the backward's calls, after the forward's two.
    first = ("dgated" if fused_backward else "gemm", True, mode == "all")
    assert [(op, m, g) for op, _, m, g in fake_quack.calls[2:]] == [
        first,
        ("gemm", False, mode == "all"),  # down's weight gradient
        ("gemm", False, True),  # gate_up's, x gathered along K
        ("gemm", True, False),  # gate_up's input gradient
    ]
    # No [S, I] copy of x in the backward, nor of the output gradient under "all".
    assert len(spread) == (0 if mode == "all" else 1)
    with pytest.raises(ValueError, match="BACKWARD_GATHER|mode must be one of"):
        quack_gemm.backward_gathers("both")


@pytest.mark.parametrize("overwrite", [True, False])
def test_tuning_the_fused_backward_in_place_times_on_a_scratch_gradient(fake_quack, monkeypatch, overwrite):
    # Tuning runs each candidate several times on one call's operands: written over preact, all
    # runs after the first would read a gradient as preact. The result must be the untuned one.
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", True)
    monkeypatch.setattr(swiglu_kernels, "OVERWRITE_IN_BACKWARD", overwrite)
    torch.manual_seed(7)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    routing = _routing(20, 4, 2, seed=7)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    untuned = torch.autograd.grad(
        dispatch(x, routing, experts, backend="grouped").sum(), [x, *experts.parameters()]
    )
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: (run(), run(), 1.0)[2])
    tuned = torch.autograd.grad(
        dispatch(x, routing, experts, backend="grouped").sum(), [x, *experts.parameters()]
    )
    for got, want in zip(tuned, untuned, strict=True):
        assert relative_error(got, want) < 1e-12
    assert any(key.startswith("swiglu_backward/sorted/") for key in quack_gemm._chosen)


def test_fused_tuning_times_the_gated_gemm_and_keeps_the_result(fake_quack, monkeypatch):
    torch.manual_seed(6)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    routing = _routing(20, 4, 2, seed=6)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    untuned = torch.autograd.grad(dispatch(x, routing, experts, backend="grouped").sum(), [x])
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: (run(), run(), 1.0)[2])
    tuned = torch.autograd.grad(dispatch(x, routing, experts, backend="grouped").sum(), [x])
    assert relative_error(tuned[0], untuned[0]) < 1e-12
    assert any(key.startswith("swiglu_forward/gather+interleaved/") for key in quack_gemm._chosen)


def test_capacity_dropped_rows_stay_out_of_the_quack_segments(fake_quack):
    torch.manual_seed(3)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    routing = _routing(30, 4, 2, seed=3)
    kept = torch.rand(30, 2, generator=torch.Generator().manual_seed(4)) > 0.3
    routing = Routing(
        routing.expert_indices,
        routing.combine_weights * kept,
        routing.router_probs,
        routing.router_logits,
        kept,
    )
    x = torch.randn(30, 16, dtype=torch.float64, requires_grad=True)
    out = dispatch(x, routing, experts, backend="grouped")
    # Dropped rows keep the weighted combine: the fused SwiGLU path (no drops) is not taken.
    assert "gated" not in {call[0] for call in fake_quack.calls}
    ref = reference_dispatch(x, routing, experts)
    assert relative_error(out, ref) < 1e-12
    (grad,) = torch.autograd.grad(out.square().sum(), [x])
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), [x])
    assert relative_error(grad, ref_grad) < 1e-12


def test_the_fastest_configuration_is_chosen_once_and_remembered_on_disk(
    fake_quack, monkeypatch, tmp_path, caplog
):
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    # Candidate 1 (tile_n 256) is the fastest on every problem.
    monkeypatch.setattr(
        quack_gemm, "_elapsed_ms", lambda run: (run(), 1.0 if fake_quack.calls[-1][1] == 256 else 2.0)[1]
    )
    x = torch.randn(40, 16, dtype=torch.float64)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    bounds = quack_gemm.cu_seqlens(torch.tensor([10, 25, 40]))
    wanted = torch.cat([x[:10] @ weight[0].T, x[10:25] @ weight[1].T, x[25:] @ weight[2].T])

    with caplog.at_level("WARNING", logger="vlmoe.moe.kernels.quack_gemm"):
        out = quack_gemm.experts_mm(x, weight, bounds)
        quack_gemm.experts_mm_grad_input(torch.randn(40, 8, dtype=torch.float64), weight, bounds)
    assert relative_error(out, wanted) < 1e-12
    # The first tuning of the process says why the step stalls, once.
    assert len(caplog.records) == 1 and "compiles its kernels" in caplog.records[0].getMessage()
    assert str(tmp_path / "quack_gemm.json") in caplog.records[0].getMessage()
    fake_quack.calls.clear()
    quack_gemm.experts_mm(x, weight, bounds)
    assert fake_quack.calls[-1][1] == 256  # the result comes from the chosen configuration
    saved = json.loads((tmp_path / "quack_gemm.json").read_text())
    assert saved["chosen"]["forward/sorted/64/16/8/3/float64/cpu"] == 1
    assert set(saved["chosen"].values()) == {1}

    # A new process: the choice is read back from disk and nothing is timed again.
    monkeypatch.setattr(quack_gemm, "_chosen", {})
    monkeypatch.setattr(quack_gemm, "_disk_loaded", False)
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: pytest.fail("timed again"))
    fake_quack.calls.clear()
    quack_gemm.experts_mm(x, weight, bounds)
    assert [call[1] for call in fake_quack.calls] == [256]


def test_tuning_times_the_candidates_in_interleaved_rounds_and_picks_by_median(fake_quack, monkeypatch):
    # Candidate 1 (tile_n 256) is slow once, in the first round (a GPU leaving idle), and the
    # fastest in every other: the median sees through it, and every round times each candidate.
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    timed = []

    def elapsed(run):
        run()
        timed.append(fake_quack.configs[-1])
        first_round = len(timed) <= len(quack_gemm.CANDIDATES)
        return (50.0 if first_round else 1.0) if timed[-1].tile_n == 256 else 2.0

    monkeypatch.setattr(quack_gemm, "_elapsed_ms", elapsed)
    x = torch.randn(40, 16, dtype=torch.float64)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    quack_gemm.experts_mm(x, weight, quack_gemm.cu_seqlens(torch.tensor([10, 25, 40])))
    count = len(quack_gemm.CANDIDATES)
    assert len(timed) == 7 * count
    rounds = [
        [(c.tile_m, c.tile_n, c.cluster_n, c.max_swizzle_size) for c in timed[i : i + count]]
        for i in range(0, len(timed), count)
    ]
    assert all(r == rounds[0] for r in rounds) and len(set(rounds[0])) == count
    assert list(quack_gemm._chosen.values()) == [1]


def test_tuning_in_steady_spans_times_interleaved_rounds_after_a_warm_up_under_keys_that_stay_here(
    fake_quack, monkeypatch
):
    # The probe (NOTES.md v28): inside quack_gemm.tuning_in_steady_spans().
    # The GPU is first kept busy (the warm-up: back-to-back calls, untimed), then each round times
    # one span of back-to-back calls per candidate. Candidate 1 (tile_n 256) is slow once, in the
    # first round, and the fastest in every other: the median sees through it.
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    spans = []  # (calls in the span, tile) for each timed span

    def elapsed(run):
        before = len(fake_quack.configs)
        run()
        tiles = {(c.tile_m, c.tile_n, c.cluster_n, c.max_swizzle_size) for c in fake_quack.configs[before:]}
        assert len(tiles) == 1  # a span runs one candidate
        spans.append((len(fake_quack.configs) - before, *tiles))
        if len(spans) == 1:
            return 2.5  # the calibration call: 2.5 ms a call
        first_round = len(spans) <= 1 + len(quack_gemm.CANDIDATES)
        per_call = (50.0 if first_round else 1.0) if fake_quack.configs[-1].tile_n == 256 else 2.0
        return per_call * spans[-1][0]

    monkeypatch.setattr(quack_gemm, "_elapsed_ms", elapsed)
    x = torch.randn(40, 16, dtype=torch.float64)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    calls_before_timing = len(fake_quack.configs)
    with quack_gemm.tuning_in_steady_spans():
        quack_gemm.experts_mm(x, weight, quack_gemm.cu_seqlens(torch.tensor([10, 25, 40])))
    count = len(quack_gemm.CANDIDATES)
    calibration, *timed = spans
    assert calibration[0] == 1
    span_calls = 4  # ceil(STEADY_SPAN_MS 10 / 2.5 ms)
    assert len(timed) == quack_gemm.STEADY_ROUNDS * count and {n for n, _ in timed} == {span_calls}
    rounds = [[tile for _, tile in timed[i : i + count]] for i in range(0, len(timed), count)]
    assert all(r == rounds[0] for r in rounds) and len(set(rounds[0])) == count
    # Every call: one warm-up call per candidate while compiling, the calibration, 80 warm-up
    # calls (STEADY_WARMUP_MS 200 / 2.5 ms) and the spans, then the problem's own call.
    warm_up = 200 // 2.5
    assert len(fake_quack.configs) - calls_before_timing == count + 1 + warm_up + len(timed) * span_calls + 1
    assert list(quack_gemm._chosen.values()) == [1]
    (key,) = quack_gemm._chosen
    assert key.endswith("/steady") and quack_gemm.tuning_seconds()[key]["calls_per_timing"] == span_calls
    assert not json.loads(quack_gemm._cache_path().read_text())["chosen"]


def test_the_gather_never_times_configurations_it_cannot_run(fake_quack, monkeypatch):
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: (run(), 1.0)[1])
    x = torch.randn(12, 16, dtype=torch.float64)
    weight = torch.randn(2, 8, 16, dtype=torch.float64)
    token_rows = torch.tensor([0, 3, 3, 5, 7, 11, 1, 2])
    out = quack_gemm.experts_mm(x, weight, torch.tensor([0, 5, 8], dtype=torch.int32), token_rows=token_rows)
    wanted = torch.cat([x[token_rows[:5]] @ weight[0].T, x[token_rows[5:]] @ weight[1].T])
    assert relative_error(out, wanted) < 1e-12
    assert fake_quack.configs and all(config.cluster_n == 1 for config in fake_quack.configs)
    # It still times more than one: the default tile at QuACK's swizzle and at swizzle 1.
    assert {config.max_swizzle_size for config in fake_quack.configs} == {8, 1}


def test_usable_only_for_large_aligned_half_precision_cuda_problems(monkeypatch):
    monkeypatch.setattr(quack_gemm, "_available", True)
    weight = torch.empty(4, 512, 256, dtype=torch.bfloat16)
    rows = torch.empty(2048, 256, dtype=torch.bfloat16)
    # No CUDA tensor here: the CPU never takes the path, whatever else holds.
    assert not quack_gemm.usable(weight, rows)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert quack_gemm.usable(weight, rows)
    assert not quack_gemm.usable(weight, rows[:100])  # launch-bound: grouped_mm
    assert quack_gemm.usable(weight, rows[:100], rows=4096)  # 100 token rows, 4096 gathered
    assert not quack_gemm.usable(weight.float(), rows.float())
    assert not quack_gemm.usable(weight.half(), rows.half())  # grouped_mm's dtype only
    # Asked before an autocast cast: the dtype the matmul will run in, not the operands' own.
    assert quack_gemm.usable(weight.float(), rows.float(), dtype=torch.bfloat16)
    assert not quack_gemm.usable(weight, rows, dtype=torch.float32)
    assert not quack_gemm.usable(weight.float(), rows)  # operands that disagree, no dtype given
    assert not quack_gemm.usable(torch.empty(4, 64, 256, dtype=torch.bfloat16), rows)  # a LoRA factor
    assert not quack_gemm.usable(torch.empty(4, 516, 260, dtype=torch.bfloat16), rows)  # unaligned
    monkeypatch.setattr(quack_gemm, "ENABLED", False)
    assert not quack_gemm.usable(weight, rows)
    monkeypatch.setattr(quack_gemm, "ENABLED", True)
    monkeypatch.setattr(quack_gemm, "_available", False)
    assert not quack_gemm.usable(weight, rows)


def test_quack_is_unavailable_without_the_package():
    # CI installs no QuACK and has no GPU: the probe says no, and dispatch never reaches it.
    assert quack_gemm.available() is (torch.cuda.is_available() and quack_gemm._probe())


def test_cu_seqlens_prepends_zero_in_int32():
    got = quack_gemm.cu_seqlens(torch.tensor([3, 3, 9]))
    assert got.dtype == torch.int32 and got.tolist() == [0, 3, 3, 9]


def test_a_quack_failure_names_the_switch_that_avoids_it(fake_quack, monkeypatch):
    def broken(**kwargs):
        raise ValueError("cannot implement")

    monkeypatch.setattr(fake_quack, "fn", broken)
    x = torch.randn(8, 16, dtype=torch.float64)
    weight = torch.randn(2, 8, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"cannot implement.*A=\(8, 16\).*VLMOE_QUACK=0"):
        quack_gemm.experts_mm(x, weight, torch.tensor([0, 3, 8], dtype=torch.int32))


def test_disabled_restores_the_switch(monkeypatch):
    monkeypatch.setattr(quack_gemm, "ENABLED", True)
    with quack_gemm.disabled():
        assert not quack_gemm.ENABLED
    assert quack_gemm.ENABLED


def test_the_disk_cache_keeps_other_processes_choices_and_ignores_other_candidates(
    fake_quack, tmp_path, monkeypatch
):
    path = tmp_path / "quack_gemm.json"
    # The saved indices mean every tile group (the dgated GEMM takes one of MORE_CANDIDATES).
    candidates = [list(c) for c in quack_gemm.CANDIDATES + quack_gemm.MORE_CANDIDATES + quack_gemm.ROW_TILES]
    path.write_text(json.dumps({"candidates": candidates, "chosen": {"another/gpu": 2}}))
    quack_gemm._chosen["this/process"] = 1
    quack_gemm._save_disk_cache()
    assert json.loads(path.read_text())["chosen"] == {"another/gpu": 2, "this/process": 1}

    v29 = [list(c) for c in quack_gemm.CANDIDATES + quack_gemm.MORE_CANDIDATES]
    for other in ([[64, 64, 1, 1, True]], [list(c) for c in quack_gemm.CANDIDATES], v29):  # v26's, v29's
        path.write_text(json.dumps({"candidates": other, "chosen": {"old/tiles": 0}}))
        quack_gemm._chosen.clear()
        monkeypatch.setattr(quack_gemm, "_disk_loaded", False)
        quack_gemm._load_disk_cache()
        assert quack_gemm._chosen == {}


class _CompilePending(BaseException):
    def __init__(self, sha):
        super().__init__(sha)
        self.sha = sha


class _FakePool(list):
    """The kernels submitted to it, and QuACK's CompilePool.stats() errors: (key, message)."""

    def __init__(self):
        super().__init__()
        self.errors = []

    def stats(self):
        return {"submitted": len(self), "errors": list(self.errors)}


class _FakeAsyncCompile:
    """quack.cache.async_compile's interface over a stand-in kernel cache: with a pool active and
    not suppressed, a call whose kernel (its tile, without the swizzle, a launch argument) is not
    compiled yet is submitted and raises CompilePending; otherwise it compiles in the calling
    process (QuACK's jit_cache). Workers deliver the kernels in `workers_finish` at once, fail
    on those in `workers_fail` and never start the others, so those compile here."""

    CompilePending = _CompilePending

    def __init__(self, fake_quack, workers_finish):
        self.broken = False  # no worker process can start: handing a kernel over raises
        self.scope_fails = False  # no process pool at all: entering the scope raises
        self.workers_fail = set()
        self.events = []
        self.compiled = set()
        self.workers_finish = workers_finish
        self.active = None
        self.suppressed = 0
        self.activations = []
        for name in ("fn", "gemm_act", "gemm_dact"):
            setattr(fake_quack, name, self._compiling(getattr(fake_quack, name)))

    def _compiling(self, call):
        def wrapper(*args, config=None, **kwargs):
            kernel = (config.tile_m, config.tile_n, config.cluster_m, config.cluster_n, config.pingpong)
            if kernel not in self.compiled:
                if self.active is not None and not self.suppressed:
                    if self.broken:
                        raise OSError("[Errno 11] Resource temporarily unavailable")
                    if kernel not in self.active:
                        self.active.append(kernel)
                        self.events.append(("submit", kernel))
                        if kernel[1] in self.workers_finish:
                            self.compiled.add(kernel)
                            self.events.append(("worker", kernel))
                        elif kernel[1] in self.workers_fail:
                            self.active.errors.append((str(kernel), "DSLRuntimeError: no such layout"))
                    raise _CompilePending(str(kernel))
                self.compiled.add(kernel)
                self.events.append(("here", kernel))
            return call(*args, config=config, **kwargs)

        return wrapper

    @contextlib.contextmanager
    def pool_scope(self):
        if self.scope_fails:
            raise OSError("[Errno 38] Function not implemented")  # multiprocessing's semaphores
        if self.active is not None:  # QuACK's: the pool already active is joined and left active
            yield self.active
            return
        self.active = _FakePool()
        self.activations.append(self.active)
        try:
            yield self.active
        finally:
            self.active = None

    @contextlib.contextmanager
    def suppress_pool(self):
        self.suppressed += 1
        try:
            yield
        finally:
            self.suppressed -= 1


@pytest.fixture
def compile_pool(fake_quack, monkeypatch, tmp_path):
    fake = _FakeAsyncCompile(fake_quack, workers_finish={256})
    cache = types.ModuleType("quack.cache")
    cache.async_compile = fake
    kernels = tmp_path / "quack"
    cache.get_cache_path = lambda: kernels.mkdir(exist_ok=True) or kernels
    monkeypatch.setitem(sys.modules, "quack.cache", cache)
    monkeypatch.setitem(sys.modules, "quack.cache.async_compile", fake)
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "PARALLEL_COMPILE", True)
    monkeypatch.setattr(quack_gemm, "_tuning_log", {})
    monkeypatch.setattr(quack_gemm, "_compile_server_started", True)  # tested on its own below
    monkeypatch.setattr(quack_gemm, "_pool_unusable", None)
    monkeypatch.setattr(
        quack_gemm, "_elapsed_ms", lambda run: (run(), 3.0 if fake_quack.calls[-1][1] == 192 else 1.0)[1]
    )
    return fake


def _three_experts(rows=40):
    """experts_mm over three experts of 10, 15 and rows - 25 rows -> (its output, the product wanted)."""
    x = torch.randn(rows, 16, dtype=torch.float64)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    out = quack_gemm.experts_mm(x, weight, quack_gemm.cu_seqlens(torch.tensor([10, 25, rows])))
    return out, torch.cat([x[:10] @ weight[0].T, x[10:25] @ weight[1].T, x[25:] @ weight[2].T])


def test_the_candidates_kernels_go_to_quack_compile_workers_first_and_each_compiles_once(
    compile_pool, fake_quack
):
    x = torch.randn(40, 16, dtype=torch.float64)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    bounds = quack_gemm.cu_seqlens(torch.tensor([10, 25, 40]))
    out = quack_gemm.experts_mm(x, weight, bounds)

    wanted = torch.cat([x[:10] @ weight[0].T, x[10:25] @ weight[1].T, x[25:] @ weight[2].T])
    assert relative_error(out, wanted) < 1e-12
    kernels = {tile[:5] for tile in quack_gemm.CANDIDATES}
    assert len(kernels) == 4 < len(quack_gemm.CANDIDATES)  # two candidates differ in the swizzle only
    # Every kernel was handed to the workers before any compiled here, in one pool scope, left
    # when the problem's kernels were in.
    kinds = [kind for kind, _ in compile_pool.events]
    assert kinds.index("here") > max(i for i, kind in enumerate(kinds) if kind == "submit")
    assert {kernel for kind, kernel in compile_pool.events if kind == "submit"} == kernels
    assert len(compile_pool.activations) == 1 and compile_pool.active is None
    # Each kernel compiled once: the workers' (the 256-wide tiles), the others here.
    compiled = [kernel for kind, kernel in compile_pool.events if kind in ("worker", "here")]
    assert sorted(compiled) == sorted(kernels)
    assert {kernel[1] for kind, kernel in compile_pool.events if kind == "worker"} == {256}
    # The tuning then timed every candidate as before and chose among them all.
    (key,) = quack_gemm._chosen
    assert quack_gemm.CANDIDATES[quack_gemm._chosen[key]][1] != 192
    entry = quack_gemm.tuning_seconds()[key]
    assert entry["candidates"] == 5 and entry["on_workers"] == 5
    assert entry["compile_s"] >= entry["handing_s"] >= 0 and entry["time_s"] >= 0


def test_one_kernel_to_compile_or_the_switch_off_compiles_in_this_process(
    compile_pool, fake_quack, monkeypatch
):
    # The gather takes cluster_n 1 only: two candidates, one kernel (they differ in the swizzle).
    x = torch.randn(12, 16, dtype=torch.float64)
    weight = torch.randn(2, 8, 16, dtype=torch.float64)
    token_rows = torch.tensor([0, 3, 3, 5, 7, 11, 1, 2])
    quack_gemm.experts_mm(x, weight, torch.tensor([0, 5, 8], dtype=torch.int32), token_rows=token_rows)
    assert compile_pool.activations == [] and [kind for kind, _ in compile_pool.events] == ["here"]

    monkeypatch.setattr(quack_gemm, "PARALLEL_COMPILE", False)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    quack_gemm.experts_mm(
        torch.randn(40, 16, dtype=torch.float64), weight, quack_gemm.cu_seqlens(torch.tensor([10, 25, 40]))
    )
    assert compile_pool.activations == []
    assert all(kind == "here" for kind, _ in compile_pool.events) and len(compile_pool.events) == 4


def test_a_pool_that_cannot_start_workers_is_given_up_and_every_kernel_compiles_here(
    compile_pool, fake_quack, caplog
):
    compile_pool.broken = True
    with caplog.at_level("WARNING", logger="vlmoe.moe.kernels.quack_gemm"):
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    assert sorted(kernel for _, kernel in compile_pool.events) == sorted(
        {t[:5] for t in quack_gemm.CANDIDATES}
    )
    assert {kind for kind, _ in compile_pool.events} == {"here"}
    (entry,) = quack_gemm.tuning_seconds().values()
    assert entry["on_workers"] == 0 and entry["worker_failures"] == 0
    # Said once, and the pool is not tried again in this process.
    (said,) = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert "Resource temporarily unavailable" in said and "VLMOE_QUACK_PARALLEL_COMPILE=0" in said
    compile_pool.events.clear()
    _three_experts(rows=3000)  # another problem (size bucket)
    assert len(compile_pool.activations) == 1 and {kind for kind, _ in compile_pool.events} <= {"here"}


def test_no_process_pool_on_the_machine_leaves_every_kernel_to_compile_here(compile_pool, fake_quack, caplog):
    compile_pool.scope_fails = True
    with caplog.at_level("WARNING", logger="vlmoe.moe.kernels.quack_gemm"):
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    assert {kind for kind, _ in compile_pool.events} == {"here"} and len(compile_pool.events) == 4
    assert "Function not implemented" in quack_gemm._pool_unusable
    assert sum("unusable" in r.getMessage() for r in caplog.records) == 1


def test_a_kernel_a_worker_failed_on_compiles_here_and_is_reported(compile_pool, fake_quack, caplog):
    compile_pool.workers_finish, compile_pool.workers_fail = set(), {256}
    # Errors a joined pool held already are not this problem's.
    joined = compile_pool.active = _FakePool()
    joined.errors.append(("an earlier kernel", "an earlier error"))
    with caplog.at_level("WARNING", logger="vlmoe.moe.kernels.quack_gemm"):
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    (entry,) = quack_gemm.tuning_seconds().values()
    assert entry["worker_failures"] == 1 and entry["on_workers"] == 5
    (said,) = [r.getMessage() for r in caplog.records if "failed on" in r.getMessage()]
    assert "failed on 1 kernels" in said and "no such layout" in said
    # The 256-wide kernel too compiled here; the pool stays in use for the next problem.
    assert (128, 256, 1, 2, False) in {kernel for kind, kernel in compile_pool.events if kind == "here"}
    assert quack_gemm._pool_unusable is None and compile_pool.active is joined


def test_a_kernels_own_failure_while_handing_over_raises_with_the_switch_that_avoids_it(
    compile_pool, fake_quack, monkeypatch
):
    def broken(**kwargs):
        raise ValueError("cannot implement")

    monkeypatch.setattr(fake_quack, "fn", broken)
    with pytest.raises(RuntimeError, match=r"cannot implement.*VLMOE_QUACK=0"):
        _three_experts()
    assert quack_gemm._pool_unusable is None and compile_pool.active is None


def _rejecting_tile_n(fake_quack, monkeypatch, tile_n):
    """QuACK refusing every kernel `tile_n` wide, as it refuses a tile a layout cannot take."""
    inner = fake_quack.fn

    def picky(*args, config=None, **kwargs):
        if config.tile_n == tile_n:
            raise ValueError(f"config rejected: tile_n {tile_n} cannot take this layout")
        return inner(*args, config=config, **kwargs)

    monkeypatch.setattr(fake_quack, "fn", picky)


@pytest.mark.parametrize("parallel", [True, False])
def test_a_tile_quack_cannot_run_for_a_problem_is_left_out_of_the_tuning(
    compile_pool, fake_quack, monkeypatch, caplog, parallel
):
    # The 256-wide tile would win (the 192-wide ones time 3 ms, the others 1 ms); QuACK refuses
    # it for this problem, so the tuning times the other four and picks the 128-wide one.
    monkeypatch.setattr(quack_gemm, "PARALLEL_COMPILE", parallel)
    _rejecting_tile_n(fake_quack, monkeypatch, 256)
    with caplog.at_level("WARNING", logger="vlmoe.moe.kernels.quack_gemm"):
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    (key,) = quack_gemm._chosen
    assert quack_gemm.CANDIDATES[quack_gemm._chosen[key]][:2] == (256, 128)
    entry = quack_gemm.tuning_seconds()[key]
    assert entry["candidates"] == 5 and entry["rejected"] == 1
    (said,) = [r.getMessage() for r in caplog.records if "cannot run" in r.getMessage()]
    assert "(128, 256, 1, 2, False)" in said and key in said and "tile_n 256" in said
    # Later calls run the chosen tile and never the refused one.
    fake_quack.calls.clear()
    _three_experts()
    assert {call[1] for call in fake_quack.calls} == {128}


def test_when_quack_can_run_no_candidate_the_first_ones_error_is_raised(
    compile_pool, fake_quack, monkeypatch
):
    for tile_n in (128, 192, 256):
        _rejecting_tile_n(fake_quack, monkeypatch, tile_n)
    first = r"tile_n 192 cannot take.*tile \(128, 192, 2, 1, True\).*VLMOE_QUACK=0"
    with pytest.raises(RuntimeError, match=first):
        _three_experts()
    assert quack_gemm._chosen == {}


def test_more_tiles_tune_among_nine_under_keys_that_stay_in_the_process(
    compile_pool, fake_quack, monkeypatch
):
    # The probe for the tiles QuACK's autotuner chose for SonicMoE (NOTES.md session 16): inside
    # the block a problem times the five candidates and the four extra ones under a key of its
    # own; the choice is not written to the disk cache, whose indices mean the five.
    times = {160: 0.5, 192: 3.0}  # ms by tile width: the 256 x 160 tile wins where it may run
    monkeypatch.setattr(
        quack_gemm, "_elapsed_ms", lambda run: (run(), times.get(fake_quack.calls[-1][1], 1.0))[1]
    )
    out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    with quack_gemm.more_tiles():
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    (shipped,) = [key for key in quack_gemm._chosen if not key.endswith("/more")]
    (more,) = [key for key in quack_gemm._chosen if key.endswith("/more")]
    assert more == shipped + "/more"
    assert quack_gemm._tile(quack_gemm._chosen[more]) == (256, 160, 2, 1, False)
    assert quack_gemm._chosen[shipped] < len(quack_gemm.CANDIDATES)
    assert quack_gemm.tuning_seconds()[more]["candidates"] == 9
    assert quack_gemm.tuning_seconds()[shipped]["candidates"] == 5
    saved = json.loads(quack_gemm._cache_path().read_text())
    assert set(saved["chosen"]) == {shipped}
    # Outside the block the shipped choice runs again, nothing is tuned anew.
    fake_quack.calls.clear()
    _three_experts()
    assert len(quack_gemm._chosen) == 2 and 160 not in {call[1] for call in fake_quack.calls}


def _fine_row_problems(fake_quack, monkeypatch):
    """The three expert matmuls over uneven experts, the gathered forward among them, tuned with
    64-row tiles timing fastest -> ({direction: key}, tuning_seconds())."""
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    last_m = lambda: fake_quack.configs[-1].tile_m  # noqa: E731
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: (run(), 0.5 if last_m() == 64 else 1.0)[1])
    x = torch.randn(40, 16, dtype=torch.float64)
    weight = torch.randn(3, 8, 16, dtype=torch.float64)
    bounds = quack_gemm.cu_seqlens(torch.tensor([10, 25, 40]))
    rows = torch.randperm(40)
    forward = quack_gemm.experts_mm(x, weight, bounds, token_rows=rows)
    grad_input = quack_gemm.experts_mm_grad_input(forward, weight, bounds)
    grad_weight = quack_gemm.experts_mm_grad_weight(forward, x[rows], weight, bounds)
    xs = x[rows]
    segments = [slice(0, 10), slice(10, 25), slice(25, 40)]
    wanted = torch.cat([xs[s] @ weight[e].T for e, s in enumerate(segments)])
    assert relative_error(forward, wanted) < 1e-12
    wanted_grad = torch.cat([wanted[s] @ weight[e] for e, s in enumerate(segments)])
    assert relative_error(grad_input, wanted_grad) < 1e-12
    assert relative_error(grad_weight, torch.stack([wanted[s].T @ xs[s] for s in segments])) < 1e-12
    tuned = quack_gemm.tuning_seconds()
    return {key.split("/")[0]: key for key in tuned}, tuned


def test_row_tiles_join_varlen_m_problems_only_and_stay_in_the_process(compile_pool, fake_quack, monkeypatch):
    # The probe for QuACK's padding of each expert's last row block (tile_m x cluster_m rows):
    # inside `row_tiles()` the varlen-M problems (forward, input gradient) also time ROW_TILES,
    # the gathered one those with cluster_n 1 only; the varlen-K weight gradient keeps its five.
    # The choices stay in this process, under keys of their own.
    with quack_gemm.row_tiles():
        keys, tuned = _fine_row_problems(fake_quack, monkeypatch)
    assert all(key.endswith("/" + quack_gemm.FINE_ROWS_KEY) for key in tuned)
    gather_ok = [t for t in quack_gemm.ROW_TILES if t[3] == 1]
    assert 0 < len(gather_ok) < len(quack_gemm.ROW_TILES)
    # Two of the five candidates take the gather.
    assert tuned[keys["forward"]]["candidates"] == 2 + len(gather_ok)
    assert tuned[keys["grad_input"]]["candidates"] == 5 + len(quack_gemm.ROW_TILES)
    assert tuned[keys["grad_weight"]]["candidates"] == 5
    for direction in ("forward", "grad_input"):  # the 64-row tile times fastest here
        assert quack_gemm._tile(quack_gemm._chosen[keys[direction]]) == (64, 256, 2, 1, True)
    assert quack_gemm._tile(quack_gemm._chosen[keys["grad_weight"]]) in quack_gemm.CANDIDATES
    path = quack_gemm._cache_path()
    assert not path.exists() or not json.loads(path.read_text())["chosen"]
    # The tile groups do not overlap: each tile has one index.
    tiles = quack_gemm._all_tiles()
    assert len(set(tiles)) == len(tiles)


def _in_a_thread(run):
    import threading

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()


def test_another_thread_uses_the_pool_once_the_compile_server_runs(compile_pool, fake_quack, monkeypatch):
    # A backward's GEMMs are tuned on autograd's device thread: they use the pool the forward's
    # tuning (on the main thread) started the server for.
    from multiprocessing import forkserver

    monkeypatch.setattr(forkserver._forkserver, "_forkserver_pid", 12345)
    _in_a_thread(_three_experts)
    assert len(quack_gemm._chosen) == 1 and len(compile_pool.activations) == 1
    assert "submit" in {kind for kind, _ in compile_pool.events}


def test_only_the_main_thread_starts_the_compile_server(compile_pool, fake_quack, monkeypatch):
    # The server dies with the thread that started it: a thread that may end (a DataParallel
    # replica's) does not start it, and compiles here.
    from multiprocessing import forkserver

    monkeypatch.setattr(forkserver._forkserver, "_forkserver_pid", None)
    monkeypatch.delenv("QUACK_ASYNC_COMPILE_START", raising=False)
    _in_a_thread(_three_experts)
    assert len(quack_gemm._chosen) == 1 and compile_pool.activations == []
    assert {kind for kind, _ in compile_pool.events} == {"here"}


def test_a_thread_compiles_here_while_another_has_the_pool_active(compile_pool, fake_quack):
    # QuACK's pool is process-wide: while another thread hands kernels over (its lock held, its
    # pool active), this one's kernels compile here with the pool suppressed instead of raising
    # CompilePending.
    other_threads_pool = compile_pool.active = _FakePool()
    assert quack_gemm._pool_lock.acquire(blocking=False)
    try:
        out, wanted = _three_experts()
    finally:
        quack_gemm._pool_lock.release()
    assert relative_error(out, wanted) < 1e-12
    assert {kind for kind, _ in compile_pool.events} == {"here"} and compile_pool.suppressed == 0
    assert compile_pool.active is other_threads_pool and other_threads_pool == []
    (entry,) = quack_gemm.tuning_seconds().values()
    assert entry["on_workers"] == 0


def test_the_compile_server_starts_once_at_the_first_problem_to_tune(compile_pool, fake_quack, monkeypatch):
    import multiprocessing
    from multiprocessing import forkserver

    started, preloads = [], []

    class Context:
        def set_forkserver_preload(self, modules):
            preloads.append(modules)

    monkeypatch.setattr(quack_gemm, "_compile_server_started", False)
    monkeypatch.setattr(
        multiprocessing, "get_context", lambda method: Context() if method == "forkserver" else None
    )
    monkeypatch.setattr(forkserver, "ensure_running", lambda: started.append(True))
    x = torch.randn(40, 16, dtype=torch.float64)
    for rows in (40, 2000):  # two problems to tune (different size buckets)
        x = torch.randn(rows, 16, dtype=torch.float64)
        weight = torch.randn(3, 8, 16, dtype=torch.float64)
        quack_gemm.experts_mm(x, weight, quack_gemm.cu_seqlens(torch.tensor([10, 25, rows])))
    assert len(quack_gemm._chosen) == 2
    # (the preload is also set at each pool's start, for a server QuACK's executor would start)
    assert started == [True] and preloads and all(p == ["vlmoe.compile_server"] for p in preloads)

    # A machine where QuACK has compiled before: its kernels serve any size, so no server
    # is started ahead of need.
    from quack.cache import get_cache_path

    (get_cache_path() / "fingerprint").mkdir()
    (get_cache_path() / "fingerprint" / "kernel.o").write_bytes(b"")
    monkeypatch.setattr(quack_gemm, "_compile_server_started", False)
    quack_gemm._start_compile_server()
    assert started == [True]

    # QuACK told to spawn its workers: there is no server to start.
    (get_cache_path() / "fingerprint" / "kernel.o").unlink()
    monkeypatch.setattr(quack_gemm, "_compile_server_started", False)
    monkeypatch.setenv("QUACK_ASYNC_COMPILE_START", "spawn")
    quack_gemm._start_compile_server()
    assert started == [True]


def test_the_fused_backward_tunes_among_the_candidates_and_its_own_128x128_tile(fake_quack, monkeypatch):
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", True)

    def elapsed(run):
        run()
        config = fake_quack.configs[-1]
        return 1.0 if (config.tile_m, config.tile_n) == (128, 128) else 2.0

    monkeypatch.setattr(quack_gemm, "_elapsed_ms", elapsed)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    dispatch(x, _routing(20, 4, 2, seed=8), experts, backend="grouped").sum().backward()
    tuned = quack_gemm.tuning_seconds()
    (backward,) = [key for key in tuned if key.startswith("swiglu_backward/")]
    assert tuned[backward]["candidates"] == len(quack_gemm.CANDIDATES) + 1
    assert quack_gemm._tile(quack_gemm._chosen[backward]) == (128, 128, 2, 1, True)
    # Every other problem keeps the five (those without a gather, which takes cluster_n 1 only):
    # the 128 x 128 tile is the dgated GEMM's alone.
    assert all(
        entry["candidates"] == len(quack_gemm.CANDIDATES)
        for key, entry in tuned.items()
        if key != backward and "/gather" not in key
    )
    assert (
        json.loads(quack_gemm._cache_path().read_text())["chosen"][backward] == quack_gemm._chosen[backward]
    )


@pytest.mark.parametrize(
    ("small_experts_ff", "fused_env"), [(2048, None), (16, None), (2048, False), (0, True)]
)
def test_the_small_experts_rule_picks_the_dgated_backward_and_the_extra_tiles(
    fake_quack, monkeypatch, small_experts_ff, fused_env
):
    # F = 24: under the rule at 2048, not at 16 (or 0, the rule off). FUSE_SWIGLU_BACKWARD, where
    # set (VLMOE_QUACK_FUSED_BACKWARD), decides the backward for every layer; the tiles stay the rule's.
    monkeypatch.setattr(quack_gemm, "SMALL_EXPERTS_FF", small_experts_ff)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_env)
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    timed = []
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: (run(), timed.append(1), 1.0)[2])
    torch.manual_seed(8)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    for parameter in experts.parameters():
        nn.init.normal_(parameter, std=0.3)
    routing = _routing(20, 4, 2, seed=8)
    x = torch.randn(20, 16, dtype=torch.float64, requires_grad=True)
    inputs = [x, *experts.parameters()]
    grads = torch.autograd.grad(dispatch(x, routing, experts, backend="grouped").sum(), inputs)
    small = small_experts_ff >= 24
    dgated = small if fused_env is None else fused_env
    assert any(op == "dgated" for op, *_ in fake_quack.calls) is dgated
    assert len(quack_gemm._chosen) == 6
    assert all(key.endswith("/wide") is small for key in quack_gemm._chosen)
    tiles = {(c.tile_m, c.tile_n, c.cluster_m, c.cluster_n, c.pingpong) for c in fake_quack.configs}
    # (the dgated GEMM's own 128 x 128 tile, OP_CANDIDATES, is timed by every dgated call)
    extra = {tile[:5] for tile in quack_gemm.MORE_CANDIDATES} - set(quack_gemm.CANDIDATES)
    extra -= set(quack_gemm.OP_CANDIDATES["dgated"])
    assert bool(tiles & extra) is small
    # The rule's choices are the layer's own: saved for later runs (the `more` probe's are not).
    saved = json.loads(quack_gemm._cache_path().read_text())["chosen"]
    assert set(saved) == set(quack_gemm._chosen)
    reference = reference_dispatch(x, routing, experts)
    for got, want in zip(grads, torch.autograd.grad(reference.sum(), inputs), strict=True):
        assert relative_error(got, want) < 1e-6


@pytest.mark.parametrize(
    ("fused_backward", "gathers", "tuned_first"),
    [(False, "none", "eager"), (True, "none", "compiled"), (True, "all", "eager")],
)
def test_the_compiled_layer_is_one_graph_whose_gemms_take_the_tuned_tiles(
    fake_quack, monkeypatch, fused_backward, gathers, tuned_first
):
    # Each QuACK call is a custom op under torch.compile whose body is the eager call: the tile
    # tuned for its problem (here the 256-wide ones, the fastest), timed once whether the
    # first step ran eagerly or compiled, where tracing QuACK's own ops took its default tile.
    # The small-experts rule's keys, the dgated backward and the backward's gathers too.
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "SMALL_EXPERTS_FF", 2048)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    monkeypatch.setattr(quack_gemm, "BACKWARD_GATHER", gathers)
    timed = []

    def elapsed(run):
        run()
        timed.append(fake_quack.configs[-1].tile_n)
        return 1.0 if timed[-1] == 256 else 2.0

    monkeypatch.setattr(quack_gemm, "_elapsed_ms", elapsed)
    torch.manual_seed(0)
    layer = MoEFeedForward.from_dense(SwiGLU(16, 24).double(), 4, 2, backend="grouped")
    for parameter in layer.parameters():
        nn.init.normal_(parameter, std=0.3)
    x = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    inputs = [x, *layer.parameters()]

    def step(module):
        out = module(x)
        return out, torch.autograd.grad(
            out, inputs, torch.randn_like(out, generator=torch.Generator().manual_seed(1))
        )

    torch._dynamo.reset()
    compiled_layer = torch.compile(layer, backend="aot_eager", fullgraph=True)  # one graph, or it raises
    first, second = (compiled_layer, layer) if tuned_first == "compiled" else (layer, compiled_layer)
    first_out, first_grads = step(first)
    # (a gathered problem's 256-wide tile is 2x1: QuACK's gather takes no N cluster)
    assert len(quack_gemm._chosen) == 6
    assert {quack_gemm._tile(index)[1] for index in quack_gemm._chosen.values()} == {256}
    assert all(key.endswith("/wide") for key in quack_gemm._chosen)
    timings = len(timed)
    fake_quack.calls.clear()
    second_out, second_grads = step(second)
    assert len(timed) == timings  # nothing timed again
    ops = [op for op, *_ in fake_quack.calls]
    assert ops == ["gated", "gemm", "dgated" if fused_backward else "gemm", "gemm", "gemm", "gemm"]
    assert {tile_n for _, tile_n, *_ in fake_quack.calls} == {256}
    gathered = [g for *_, g in fake_quack.calls]
    assert gathered == ([True, False, True, True, True, False] if gathers == "all" else [True] + [False] * 5)
    assert relative_error(second_out, first_out) < 1e-12
    for got, want in zip(second_grads, first_grads, strict=True):
        assert relative_error(got, want) < 1e-12


def test_the_small_experts_rule_can_be_switched_off_for_a_block(fake_quack, monkeypatch):
    monkeypatch.setattr(quack_gemm, "SMALL_EXPERTS_FF", 2048)
    experts = GLUExperts(4, 16, 24, nn.SiLU()).double()
    assert quack_gemm.is_small_experts(experts.down_proj)
    with quack_gemm.small_experts_rule(False):
        assert not quack_gemm.is_small_experts(experts.down_proj)
        assert not quack_gemm.fuse_swiglu_backward(experts.down_proj)
        with quack_gemm.swiglu_backward_fused():
            assert quack_gemm.fuse_swiglu_backward(experts.down_proj)
    assert quack_gemm.SMALL_EXPERTS_FF == 2048 and quack_gemm.fuse_swiglu_backward(experts.down_proj)


def _terminal(terminal=True):
    """A console kept in a string, a terminal or not."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=terminal, width=140, color_system=None)


@pytest.fixture
def untimed(monkeypatch):
    monkeypatch.setattr(quack_gemm, "TUNE", True)
    monkeypatch.setattr(quack_gemm, "_elapsed_ms", lambda run: (run(), 1.0)[1])  # no CUDA events here


@pytest.mark.parametrize("pool", [False, True])
def test_first_use_tuning_shows_a_bar_over_the_kernels_then_the_rounds(
    fake_quack, monkeypatch, request, pool
):
    if pool:
        request.getfixturevalue("compile_pool")  # the kernels handed to QuACK's workers first
    request.getfixturevalue("untimed")
    monkeypatch.setattr(quack_gemm, "PROGRESS", "1")
    advances = []
    real = quack_gemm._tuning_progress

    @contextlib.contextmanager
    def counted(key, kernels, rounds):
        with real(key, kernels, rounds) as advance:
            yield lambda: (advances.append(key), advance())

    monkeypatch.setattr(quack_gemm, "_tuning_progress", counted)
    with sharing(_terminal()) as console:
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    # Each candidate once as its kernel is ready, then each of the 7 rounds: the bar ends full.
    assert len(advances) == len(quack_gemm.CANDIDATES) + quack_gemm.BURST_ROUNDS
    drawn = console.file.getvalue()
    assert "QuACK tiles for forward/sorted" in drawn and "(5 candidates)" in drawn
    assert "12/12" in drawn


def test_tuning_bars_draw_only_on_a_terminal_unless_forced(fake_quack, monkeypatch, untimed):
    monkeypatch.setattr(quack_gemm, "PROGRESS", "auto")
    with sharing(_terminal(False)) as console:
        assert not quack_gemm._progress_wanted()
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12 and console.file.getvalue() == ""
    with sharing(_terminal()):
        assert quack_gemm._progress_wanted()
        monkeypatch.setattr(quack_gemm, "PROGRESS", "0")
        assert not quack_gemm._progress_wanted()
    monkeypatch.setattr(quack_gemm, "PROGRESS", "1")
    with sharing(_terminal(False)):
        assert quack_gemm._progress_wanted()


@pytest.mark.parametrize("refuses", [False, True])
def test_a_tuning_bar_inside_a_training_bar_stacks_on_its_console(fake_quack, monkeypatch, untimed, refuses):
    # A training run shares its console (vlmoe.train's run_recipe): the first step's tuning bar
    # stacks under the stage's bar there (rich >= 14). Where rich refuses a second live display
    # (rich 13), the problem is tuned all the same, with no bar.
    from rich.errors import LiveError
    from rich.progress import Progress

    monkeypatch.setattr(quack_gemm, "PROGRESS", "auto")
    console = _terminal()
    if not refuses and not hasattr(console, "_live_stack"):
        pytest.skip("rich < 14 keeps one live display a console")
    started = []
    real_start = Progress.start

    def start(self):
        if refuses:
            raise LiveError("Only one live display may be active at once")
        real_start(self)
        started.append((self.console, len(console._live_stack)))

    with sharing(console), Progress(console=console) as stage_bar, pytest.MonkeyPatch.context() as patch:
        stage_bar.add_task("stage 1/3 align", total=10)
        patch.setattr(Progress, "start", start)
        out, wanted = _three_experts()
    assert relative_error(out, wanted) < 1e-12
    assert len(quack_gemm._chosen) == 1
    assert "stage 1/3 align" in console.file.getvalue()
    # The tuning's bar went live on the training's console, second on its stack.
    assert started == ([] if refuses else [(console, 2)])
