"""The expert matmuls on QuACK's kernels (bf16, Hopper) against float64 per-expert loops, and the
MoE layer on them against the float64 reference dispatch, eager and under torch.compile, with
the SwiGLU in the first GEMM's epilogue (the default for SwiGLU experts) and without.
Skipped without a GPU, and where QuACK is not installed (`pip install vlmoe[quack]`)."""

import contextlib
import copy
import dataclasses
import itertools

import pytest
import torch
from torch import nn

from tests.moe.helpers import SwiGLU, randomize_, relative_error
from vlmoe.moe import GLUExperts, MoEFeedForward, Routing, dispatch, record_routing, reference_dispatch
from vlmoe.moe.kernels import quack_gemm
from vlmoe.moe.kernels import swiglu as swiglu_kernels

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not quack_gemm.available(), reason="needs QuACK (quack-kernels) and a Hopper GPU"),
]


@pytest.fixture(autouse=True)
def small_problems_too(monkeypatch, tmp_path):
    # The size thresholds keep small problems on grouped_mm; here every problem takes QuACK.
    monkeypatch.setattr(quack_gemm, "MIN_ROWS", 0)
    monkeypatch.setattr(quack_gemm, "MIN_DIM", 0)
    # The small-experts rule off (every layer here is small, and its extra tiles would compile for
    # each shape): the tests that want it set it.
    monkeypatch.setattr(quack_gemm, "SMALL_EXPERTS_FF", 0)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", None)
    monkeypatch.setattr(quack_gemm, "_chosen", {})
    monkeypatch.setattr(quack_gemm, "_disk_loaded", False)
    monkeypatch.setenv("VLMOE_CACHE_DIR", str(tmp_path))


def _segments(counts):
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    return list(itertools.pairwise(bounds))


@pytest.mark.parametrize(
    ("counts", "fan_in", "fan_out"),
    [
        ([300, 0, 517, 183, 1], 256, 512),  # an empty expert, a one-row expert
        ([64] * 16, 384, 264),
        ([2048, 2048], 1024, 2816),
    ],
)
@pytest.mark.parametrize("tune", [True, False])
def test_the_three_expert_matmuls_match_float64_loops(counts, fan_in, fan_out, tune, monkeypatch):
    monkeypatch.setattr(quack_gemm, "TUNE", tune)
    torch.manual_seed(len(counts))
    rows = sum(counts)
    tokens = rows // 2 + 1
    x_tokens = torch.randn(tokens, fan_in, device="cuda", dtype=torch.bfloat16)
    token_rows = torch.randint(0, tokens, (rows,), device="cuda")
    x = x_tokens[token_rows]
    grad = torch.randn(rows, fan_out, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(len(counts), fan_out, fan_in, device="cuda", dtype=torch.bfloat16) / fan_in**0.5
    bounds = quack_gemm.cu_seqlens(torch.tensor(counts, device="cuda").cumsum(0))

    forward = quack_gemm.experts_mm(x, weight, bounds)
    gathered = quack_gemm.experts_mm(x_tokens, weight, bounds, token_rows=token_rows)
    grad_x = quack_gemm.experts_mm_grad_input(grad, weight, bounds)
    grad_w = quack_gemm.experts_mm_grad_weight(grad, x, weight, bounds)

    x64, grad64, w64 = x.double(), grad.double(), weight.double()
    for expert, (start, end) in enumerate(_segments(counts)):
        want = x64[start:end] @ w64[expert].T
        if end > start:
            assert relative_error(forward[start:end], want) < 1e-2
            assert relative_error(gathered[start:end], want) < 1e-2
            assert relative_error(grad_x[start:end], grad64[start:end] @ w64[expert]) < 1e-2
            assert relative_error(grad_w[expert], grad64[start:end].T @ x64[start:end]) < 1e-2
        else:
            assert grad_w[expert].abs().max() == 0


@pytest.mark.parametrize("tune", [True, False])
def test_the_backward_gemms_that_gather_token_rows_match_float64_loops(tune, monkeypatch):
    # quack_gemm.BACKWARD_GATHER's GEMMs: the weight gradient gathering the output gradient along K
    # (A_idx on A = grad.T), gate_up's as its transpose with x gathered along K into an M-major view
    # of the result (plain and with paired columns), the input gradient and the dgated GEMM
    # reading the output gradient's token rows in their loads. Over an empty and a one-row expert.
    monkeypatch.setattr(quack_gemm, "TUNE", tune)
    torch.manual_seed(5)
    counts, hidden, intermediate = [300, 0, 517, 183, 1], 256, 384
    rows, experts = sum(counts), len(counts)
    tokens = rows // 2 + 1
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    x_tokens = torch.randn(tokens, hidden, **bf16)
    grad_tokens = torch.randn(tokens, hidden, **bf16)
    token_rows = torch.randint(0, tokens, (rows,), device="cuda")
    grad_preact = torch.randn(rows, 2 * intermediate, **bf16)
    scaled_hidden = torch.randn(rows, intermediate, **bf16)
    preact = torch.randn(rows, 2 * intermediate, **bf16)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, **bf16) / hidden**0.5
    down = torch.randn(experts, hidden, intermediate, **bf16) / intermediate**0.5
    row_weights = torch.rand(rows, device="cuda")
    bounds = quack_gemm.cu_seqlens(torch.tensor(counts, device="cuda").cumsum(0))

    grad_down = quack_gemm.experts_mm_grad_weight(
        grad_tokens, scaled_hidden, down, bounds, token_rows=token_rows
    )
    grad_gate_up = quack_gemm.experts_mm_grad_weight_gathered_x(
        grad_preact, x_tokens, token_rows, gate_up, bounds, interleaved=True
    )
    weight_like = torch.empty(experts, intermediate, hidden, **bf16)  # [E, F, I], unpaired
    plain = quack_gemm.experts_mm_grad_weight_gathered_x(
        scaled_hidden, x_tokens, token_rows, weight_like, bounds
    )
    grad_hidden = quack_gemm.experts_mm_grad_input(grad_tokens, down, bounds, token_rows=token_rows)
    dgated = quack_gemm.experts_swiglu_backward(
        grad_tokens, down, preact, row_weights, bounds, token_rows=token_rows
    )
    pre_gathered = quack_gemm.experts_swiglu_backward(
        grad_tokens[token_rows], down, preact, row_weights, bounds
    )
    assert grad_gate_up.shape == gate_up.shape and grad_gate_up.is_contiguous()

    x64, g64 = x_tokens.double()[token_rows], grad_tokens.double()[token_rows]
    gp64, h64 = grad_preact.double(), scaled_hidden.double()
    for e, (start, end) in enumerate(_segments(counts)):
        seg = slice(start, end)
        if end == start:
            for grad in (grad_down, grad_gate_up, plain):
                assert grad[e].abs().max() == 0
            continue
        assert relative_error(grad_down[e], g64[seg].T @ h64[seg]) < 1e-2
        # gate j in preact column 2j, up j in 2j + 1; the gradient comes back as [gate; up] rows.
        stacked = torch.cat([gp64[seg, ::2], gp64[seg, 1::2]], dim=1)
        assert relative_error(grad_gate_up[e], stacked.T @ x64[seg]) < 1e-2
        assert relative_error(plain[e], h64[seg].T @ x64[seg]) < 1e-2
        assert relative_error(grad_hidden[seg], g64[seg] @ down[e].double()) < 1e-2
    for got, want in zip(dgated, pre_gathered, strict=True):
        assert relative_error(got.double(), want.double()) < 1e-2


@pytest.mark.parametrize("tile", quack_gemm.ROW_TILES, ids=lambda tile: "x".join(map(str, tile[:4])))
def test_each_fine_row_block_tile_runs_every_varlen_m_problem_exactly(tile, monkeypatch):
    # quack_gemm.ROW_TILES (64-row pingpong tiles, 128-row ones without an M cluster) pinned as
    # the only candidate: the plain, gathered, input-gradient, gated and dgated GEMMs against
    # float64 over experts of 0, 1, 63, 64, 65 and a few hundred rows, so the padded last
    # blocks, empty experts and ragged ends all occur. The gather runs where the tile has
    # cluster_n 1 (QuACK's gather takes no other).
    monkeypatch.setattr(quack_gemm, "CANDIDATES", (tile,))
    monkeypatch.setattr(quack_gemm, "TUNE", False)
    torch.manual_seed(sum(tile))
    counts, hidden, intermediate = [300, 0, 1, 63, 64, 65, 517], 256, 256
    rows, experts = sum(counts), len(counts)
    tokens = rows // 2 + 1
    x_tokens = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16)
    token_rows = torch.randint(0, tokens, (rows,), device="cuda")
    x = x_tokens[token_rows]
    bf16 = dict(device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(experts, 2 * intermediate, hidden, **bf16) / hidden**0.5
    down = torch.randn(experts, hidden, intermediate, **bf16) / intermediate**0.5
    grad_rows = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    row_weights = torch.rand(rows, device="cuda")
    bounds = quack_gemm.cu_seqlens(torch.tensor(counts, device="cuda").cumsum(0))
    gathers = tile[3] == 1

    forward = quack_gemm.experts_mm(x, down.transpose(-2, -1).contiguous(), bounds)
    grad_x = quack_gemm.experts_mm_grad_input(grad_rows, down, bounds)
    preact, hidden_rows = quack_gemm.experts_swiglu(x, gate_up, bounds, None)
    if gathers:
        gathered = quack_gemm.experts_swiglu(x_tokens, gate_up, bounds, token_rows)
        for got, want in zip(gathered, (preact, hidden_rows), strict=True):
            assert torch.equal(got, want)
    grad_preact, scaled_hidden, grad_row_weights = quack_gemm.experts_swiglu_backward(
        grad_rows, down, preact, row_weights, bounds
    )
    assert {quack_gemm._tile(0)} == {tile}

    x64, g64, p64, w64 = x.double(), grad_rows.double(), preact.double(), row_weights.double().unsqueeze(-1)
    for e, (start, end) in enumerate(_segments(counts)):
        if end == start:
            continue
        rows_ = slice(start, end)
        assert relative_error(forward[rows_], x64[rows_] @ down[e].double()) < 1e-2
        assert relative_error(grad_x[rows_], g64[rows_] @ down[e].double()) < 1e-2
        pairs = x64[rows_] @ gate_up[e].double().T  # [gate; up] stacked, QuACK pairs them
        gate, up = pairs[:, :intermediate], pairs[:, intermediate:]
        assert relative_error(preact[rows_, ::2], gate) < 1e-2
        assert relative_error(preact[rows_, 1::2], up) < 1e-2
        assert relative_error(hidden_rows[rows_], torch.nn.functional.silu(gate) * up) < 1e-2
        acc = g64[rows_] @ down[e].double()
        gate, up = p64[rows_, ::2], p64[rows_, 1::2]
        sig = torch.sigmoid(gate)
        grad_gate = acc * w64[rows_] * up * sig * (1 + gate * (1 - sig))
        assert relative_error(grad_preact[rows_, ::2], grad_gate) < 1e-2
        assert relative_error(grad_preact[rows_, 1::2], acc * w64[rows_] * gate * sig) < 1e-2
        assert relative_error(scaled_hidden[rows_], w64[rows_] * gate * sig * up) < 1e-2
        assert relative_error(grad_row_weights[rows_], (acc * gate * sig * up).sum(-1)) < 1e-2


def _layer(tokens, hidden, intermediate, num_experts, top_k, capacity):
    dense = SwiGLU(hidden, intermediate)
    moe = MoEFeedForward.from_dense(dense, num_experts, top_k, capacity_factor=capacity, backend="grouped")
    randomize_(moe, seed=tokens, std=0.1)
    reference = MoEFeedForward.from_dense(
        dense, num_experts, top_k, capacity_factor=capacity, backend="reference"
    )
    reference.load_state_dict(moe.state_dict())
    return moe.cuda().bfloat16(), reference.double()


def _fixed_routing(moe, reference, x):
    with record_routing(reference), torch.no_grad():
        reference(x.double())
    routing = reference.last_routing
    reference.router.forward = lambda *args, **kwargs: routing
    on_cuda = dataclasses.replace(
        routing,
        **{
            field.name: getattr(routing, field.name).cuda()
            for field in dataclasses.fields(routing)
            if field.init and isinstance(getattr(routing, field.name), torch.Tensor)
        },
    )
    moe.router.forward = lambda *args, **kwargs: on_cuda


@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "num_experts", "top_k", "capacity"),
    [
        (512, 64, 96, 4, 2, None),
        (700, 256, 320, 8, 2, None),
        (300, 64, 128, 16, 6, None),
        (256, 64, 96, 4, 2, 1.0),
    ],
)
def test_moe_layer_on_quack_matches_the_float64_reference(
    tokens, hidden, intermediate, num_experts, top_k, capacity
):
    torch.manual_seed(tokens)
    moe, reference = _layer(tokens, hidden, intermediate, num_experts, top_k, capacity)
    x = torch.randn(tokens, hidden)
    grad_out = torch.randn(tokens, hidden)
    _fixed_routing(moe, reference, x)
    xr = x.double().requires_grad_()
    ref = reference(xr)
    ref_grads = torch.autograd.grad(ref, [xr, *reference.experts.parameters()], grad_out.double())
    xc = x.cuda().bfloat16().requires_grad_()
    out = moe(xc)
    grads = torch.autograd.grad(out, [xc, *moe.experts.parameters()], grad_out.cuda().bfloat16())
    assert relative_error(out.cpu(), ref) < 2e-2
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad.cpu(), ref_grad) < 2e-2


@pytest.mark.parametrize(
    ("fused_backward", "backward_gather"),
    [(False, "none"), (True, "none"), (None, "none"), (True, "all"), (False, "x")],
)  # fused_backward None: by the small-experts rule
def test_moe_layer_on_quack_compiles_to_one_graph_and_matches_eager(
    fused_backward, backward_gather, monkeypatch
):
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    monkeypatch.setattr(quack_gemm, "BACKWARD_GATHER", backward_gather)
    if fused_backward is None:  # the rule's default width: this layer (F = 320) falls under it
        monkeypatch.setattr(quack_gemm, "SMALL_EXPERTS_FF", 2048)
    torch._dynamo.reset()
    torch.manual_seed(0)
    moe, _ = _layer(1024, 256, 320, 8, 2, None)
    x = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16)
    eager_x = x.clone().requires_grad_()
    eager = moe(eager_x)
    eager.float().square().sum().backward()
    eager_grads = [eager_x.grad, *(p.grad.clone() for p in moe.experts.parameters())]
    if fused_backward is None:  # eager: tuned among the extra tiles too, keys of the rule's own
        assert quack_gemm._chosen and all(key.endswith("/wide") for key in quack_gemm._chosen)
        assert any(key.startswith("swiglu_backward/") for key in quack_gemm._chosen)
    moe.zero_grad()
    compiled = torch.compile(moe, fullgraph=True)
    compiled_x = x.clone().requires_grad_()
    out = compiled(compiled_x)
    out.float().square().sum().backward()
    grads = [compiled_x.grad, *(p.grad for p in moe.experts.parameters())]
    assert relative_error(out, eager) < 2e-2
    for grad, eager_grad in zip(grads, eager_grads, strict=True):
        assert relative_error(grad, eager_grad) < 2e-2


@pytest.mark.parametrize(
    ("tokens", "hidden", "intermediate", "num_experts", "top_k"),
    [
        (512, 64, 96, 4, 2),
        (700, 256, 320, 8, 2),
        (300, 64, 128, 16, 6),
    ],
)
@pytest.mark.parametrize(
    ("overwrite", "spread_first", "fused_backward", "backward_gather"),
    [
        (True, False, False, "none"),
        (False, False, False, "none"),
        (True, True, False, "none"),
        (True, False, True, "none"),
        (False, False, True, "none"),
        (True, False, True, "x"),
        (True, False, True, "all"),
        (True, False, False, "all"),
    ],
)
def test_swiglu_in_the_gemm_epilogue_matches_the_float64_reference_with_every_gradient(
    tokens, hidden, intermediate, num_experts, top_k, overwrite, spread_first, fused_backward,
    backward_gather, monkeypatch,
):  # fmt: skip
    # dispatch.combined_glu: the SwiGLU inside QuACK's first GEMM, gate and up paired through
    # the backward, the combine weights as row scales with their own gradient; one expert left
    # without tokens. spread_first: the token rows copied to expert order before the GEMM
    # (quack_gemm.rows_spread_first) instead of gathered in its loads. fused_backward: the
    # SwiGLU's gradient in the backward's first GEMM (QuACK's dgated). backward_gather: which
    # token rows the backward's GEMMs read in place (quack_gemm.BACKWARD_GATHER).
    monkeypatch.setattr(swiglu_kernels, "OVERWRITE_IN_BACKWARD", overwrite)
    monkeypatch.setattr(quack_gemm, "GATHER_IN_LOADS", not spread_first)
    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    monkeypatch.setattr(quack_gemm, "BACKWARD_GATHER", backward_gather)
    calls = []
    fused = quack_gemm.experts_swiglu
    monkeypatch.setattr(
        quack_gemm, "experts_swiglu", lambda *args, **kwargs: calls.append(1) or fused(*args, **kwargs)
    )
    torch.manual_seed(tokens + top_k)
    reference = GLUExperts(num_experts, hidden, intermediate, nn.SiLU()).double()
    for parameter in reference.parameters():
        nn.init.normal_(parameter, std=hidden**-0.5)
    experts = copy.deepcopy(reference).cuda().bfloat16()
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    logits[:, 1] = -1e9
    probs = logits.softmax(-1)
    weights, indices = probs.topk(top_k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).float()
    x = torch.randn(tokens, hidden, dtype=torch.float64)
    grad_out = torch.randn(tokens, hidden, dtype=torch.float64)

    w64 = weights.double().requires_grad_()
    x64 = x.clone().requires_grad_()
    ref = reference_dispatch(x64, Routing(indices, w64, probs, logits), reference)
    ref_grads = torch.autograd.grad(ref, [x64, w64, *reference.parameters()], grad_out)
    wc = weights.cuda().requires_grad_()
    xc = x.cuda().bfloat16().requires_grad_()
    routing = Routing(indices.cuda(), wc, probs.cuda(), logits.cuda())
    out = dispatch(xc, routing, experts, backend="grouped")
    grads = torch.autograd.grad(out, [xc, wc, *experts.parameters()], grad_out.cuda().bfloat16())

    assert calls, "the fused path did not run"
    assert relative_error(out.cpu(), ref) < 2e-2
    for grad, ref_grad, name in zip(grads, ref_grads, ["x", "weights", "gate_up", "down"], strict=True):
        assert relative_error(grad.cpu(), ref_grad) < 2e-2, name
    for grad in grads[2:]:
        assert grad[1].abs().max() == 0  # the expert without tokens


@pytest.mark.parametrize("tune", [True, False])
def test_the_swiglu_gradient_in_the_gemm_epilogue_matches_float64_in_place_and_not(tune, monkeypatch):
    # quack_gemm.experts_swiglu_backward (QuACK's dgated) against its formulas in float64: written
    # over preact (tile by tile, each tile's pairs read first) and to a tensor of its own, equal
    # bit for bit; tuned, the in-place call times its candidates on a scratch output.
    monkeypatch.setattr(quack_gemm, "TUNE", tune)
    torch.manual_seed(11)
    counts, hidden, intermediate = [700, 0, 517, 831, 256], 512, 384
    rows = sum(counts)
    grad_rows = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    down = torch.randn(len(counts), hidden, intermediate, device="cuda", dtype=torch.bfloat16) / hidden**0.5
    preact = torch.randn(rows, 2 * intermediate, device="cuda", dtype=torch.bfloat16)
    row_weights = torch.rand(rows, device="cuda")
    bounds = quack_gemm.cu_seqlens(torch.tensor(counts, device="cuda").cumsum(0))

    # In place first: tuned, that call is the one timing the candidates (on a scratch output).
    overwritten = preact.clone()
    own = quack_gemm.experts_swiglu_backward(
        grad_rows, down, overwritten, row_weights, bounds, out=overwritten
    )
    apart = quack_gemm.experts_swiglu_backward(grad_rows, down, preact, row_weights, bounds)
    assert own[0].data_ptr() == overwritten.data_ptr()
    assert any(key.startswith("swiglu_backward/") for key in quack_gemm._chosen) is tune
    for got, want in zip(own, apart, strict=True):
        assert torch.equal(got, want)

    gate, up = preact.double()[:, ::2], preact.double()[:, 1::2]
    acc = torch.cat(
        [grad_rows[start:end].double() @ down[e].double() for e, (start, end) in enumerate(_segments(counts))]
    )
    weight = row_weights.double().unsqueeze(-1)
    sig = torch.sigmoid(gate)
    grad_gate = acc * weight * up * sig * (1 + gate * (1 - sig))
    grad_up = acc * weight * gate * sig
    grad_preact, scaled_hidden, grad_row_weights = apart
    assert relative_error(grad_preact[:, ::2], grad_gate) < 1e-2
    assert relative_error(grad_preact[:, 1::2], grad_up) < 1e-2
    assert relative_error(scaled_hidden, weight * gate * sig * up) < 1e-2
    assert grad_row_weights.dtype == torch.float32
    assert relative_error(grad_row_weights, (acc * gate * sig * up).sum(-1)) < 1e-2


def test_swiglu_in_the_gemm_epilogue_and_the_swiglu_pass_agree():
    # The same layer, fused (v17) and unfused (QuACK's plain GEMMs around the Triton SwiGLU).
    torch.manual_seed(1)
    moe, _ = _layer(2048, 256, 512, 8, 2, None)
    x = torch.randn(2048, 256, device="cuda", dtype=torch.bfloat16)
    results = []
    for unfuse in (False, True):
        moe.zero_grad()
        xi = x.clone().requires_grad_()
        with quack_gemm.swiglu_unfused() if unfuse else contextlib.nullcontext():
            out = moe(xi)
            out.float().square().sum().backward()
        results.append([out, xi.grad, *(p.grad.clone() for p in moe.parameters() if p.grad is not None)])
    for fused, unfused in zip(*results, strict=True):
        assert relative_error(fused, unfused) < 2e-2


_COLD_START = """
import json, torch
from vlmoe.moe.kernels import quack_gemm
quack_gemm.MIN_ROWS = 0
torch.manual_seed(7)
counts = [700, 0, 517, 831]
x = torch.randn(sum(counts), 512, device="cuda", dtype=torch.bfloat16)
weight = torch.randn(len(counts), 768, 512, device="cuda", dtype=torch.bfloat16) / 512**0.5
bounds = quack_gemm.cu_seqlens(torch.tensor(counts, device="cuda").cumsum(0))
out = quack_gemm.experts_mm(x, weight, bounds).double()
want, start = [], 0
for expert, count in enumerate(counts):
    want.append(x[start : start + count].double() @ weight[expert].double().T)
    start += count
error = ((out - torch.cat(want)).norm() / torch.cat(want).norm()).item()
((first, entry),) = quack_gemm.tuning_seconds().items()
# A layer's step: its backward's GEMMs are tuned on autograd's device thread, not the main one.
from torch import nn
from vlmoe.moe import MoEFeedForward
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(512, 768, bias=False), nn.Linear(512, 768, bias=False)
        self.down_proj, self.act_fn = nn.Linear(768, 512, bias=False), nn.SiLU()
    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
moe = MoEFeedForward.from_dense(MLP(), 4, 2, backend="grouped").to("cuda", torch.bfloat16)
tokens = torch.randn(2048, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
moe(tokens).float().square().sum().backward()
layer = {key: tuned["on_workers"] for key, tuned in quack_gemm.tuning_seconds().items() if key != first}
print(json.dumps({"error": error, **entry, "layer": layer}))
"""


def test_a_cold_start_compiles_the_candidates_on_quacks_workers_and_a_warm_one_loads_them(tmp_path):
    # A fresh process each time (QuACK keeps compiled kernels in memory too): with an empty
    # QuACK cache the tuning hands every candidate to QuACK's compile workers (v26), none of
    # them fails, and the kernels it then loads (or compiles here, where it got to one first)
    # compute the products; a second process finds them all in QuACK's cache.
    import json
    import os
    import subprocess
    import sys

    runs = []
    for run in ("cold", "warm"):
        env = {
            **os.environ,
            "QUACK_CACHE_DIR": str(tmp_path / "quack"),
            "VLMOE_CACHE_DIR": str(tmp_path / run),
            "VLMOE_QUACK_TUNE": "1",
            "VLMOE_QUACK_PARALLEL_COMPILE": "1",
        }
        done = subprocess.run(
            [sys.executable, "-c", _COLD_START], env=env, capture_output=True, text=True, timeout=240
        )
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["error"] < 1e-2 and warm["error"] < 1e-2
    assert cold["candidates"] == warm["candidates"] == len(quack_gemm.CANDIDATES)
    assert cold["on_workers"] == len(quack_gemm.CANDIDATES) and warm["on_workers"] == 0
    assert cold["worker_failures"] == 0
    assert warm["compile_s"] < cold["compile_s"]
    # The layer's backward problems too went to the workers (its forward's plain GEMM reuses the
    # kernels compiled above: QuACK's kernels do not depend on the sizes): three weight or input
    # gradients and the down input gradient, or the dgated GEMM in its place (VLMOE_QUACK_FUSED_BACKWARD=1).
    backward = {
        key: handed for key, handed in cold["layer"].items() if key.startswith(("grad_", "swiglu_backward"))
    }
    assert len(backward) == 4 and all(backward.values()), cold["layer"]
    assert not any(warm["layer"].values())


@pytest.mark.parametrize("fused_backward", [False, True])
def test_tiles_ranked_in_the_step_keep_the_layer_exact_and_are_what_it_runs(fused_backward, monkeypatch):
    from vlmoe.moe.kernels import step_tuning

    monkeypatch.setattr(quack_gemm, "FUSE_SWIGLU_BACKWARD", fused_backward)
    torch.manual_seed(7)
    moe, reference = _layer(1024, 256, 384, 8, 2, None)
    x = torch.randn(1024, 256)
    grad_out = torch.randn(1024, 256)
    _fixed_routing(moe, reference, x)
    xc, grad_c = x.cuda().bfloat16().requires_grad_(), grad_out.cuda().bfloat16()
    params = [xc, *moe.experts.parameters()]

    def step():
        torch.autograd.grad(moe(xc), params, grad_c)

    # The five tiles only: their kernels compiled in the first step, so no compile here.
    choices = step_tuning.tune_in_step(
        step, extra_tiles=False, rounds=2, span_ms=5, warmup_ms=10, progress=False
    )
    assert choices and {choice.key for choice in choices} <= set(quack_gemm._chosen)
    for choice in choices:
        assert quack_gemm._tile(quack_gemm._chosen[choice.key]) == choice.after
        assert choice.scores[choice.before] == 1.0 and choice.after in choice.scores
    tiles = {quack_gemm._tile(quack_gemm._chosen[c.key]) for c in choices}
    assert tiles <= set(quack_gemm._all_tiles())
    xr = x.double().requires_grad_()
    ref_grads = torch.autograd.grad(reference(xr), [xr, *reference.experts.parameters()], grad_out.double())
    grads = torch.autograd.grad(moe(xc), params, grad_c)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert relative_error(grad.cpu(), ref_grad) < 2e-2
