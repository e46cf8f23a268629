"""CUDA graphs of the MoE FFN's decoding forward (`vlmoe.moe.graphs`; MoLE's in tests/models/test_mole.py).

On the CPU: which forwards may take the graph path, and that copies and pickles of a layer
start with no graphs. On a GPU: replays equal the eager forward bit for bit, follow in-place
weight changes, capture anew for new parameters or sizes, and never alias their outputs.
"""

import copy
import importlib
import pickle
import sys
import threading

import pytest
import torch

from tests.moe.helpers import FcMLP, SwiGLU, fake_record
from vlmoe.moe import MoEFeedForward, graphs, layers, record_routing, routing_inputs

dispatch_module = importlib.import_module("vlmoe.moe.dispatch")  # the module, not the function


def _layer(hidden=64, intermediate=96, num_experts=4, top_k=2, seed=0, mlp=SwiGLU):
    torch.manual_seed(seed)
    moe = MoEFeedForward.from_dense(mlp(hidden, intermediate), num_experts, top_k).eval()
    with torch.no_grad():
        for parameter in moe.parameters():
            parameter.normal_(std=0.2)
    return moe


def test_can_capture_only_cuda_without_autograd():
    x = torch.randn(2, 8)
    assert not graphs.can_capture(x)
    with torch.no_grad():
        assert not graphs.can_capture(x)


def test_graph_path_gate(monkeypatch):
    """Which forwards replay a graph, and of which dispatch, with the device checks patched true
    (they need a GPU to be true)."""
    moe = _layer()
    monkeypatch.setattr(graphs, "can_capture", lambda x: True)
    auto_on_cuda = dispatch_module.resolve_backend
    monkeypatch.setattr(
        dispatch_module,
        "resolve_backend",
        lambda backend, x, e: "grouped" if backend == "auto" else auto_on_cuda(backend, x, e),
    )
    monkeypatch.setattr(layers, "grouped_mm_runs", lambda x, weights: True)
    with torch.no_grad():  # as can_capture asks
        decode = torch.randn(4, 1, 64)  # 4 tokens: the decode kernels
        batch = torch.randn(100, 1, 64)  # past DECODE_MAX_TOKENS: the grouped path on grouped_mm
        assert moe._graph_path(decode) == "decode" and moe._graph_path(batch) == "grouped"
        assert moe._graph_path(torch.randn(100, 64)) == "grouped"  # flat tokens
        assert moe._graph_path(torch.randn(1, 8, 64)) is None  # a prompt: a length of its own each time
        for eager in [torch.randn(graphs.MAX_TOKENS + 1, 64), torch.randn(0, 64), torch.randn(64)]:
            assert moe._graph_path(eager) is None
        assert moe._graph_path(torch.randn(4, 1, 32)) is None  # the wrong width: the eager error
        moe.record_routing = True  # the record needs the eager routing
        assert moe._graph_path(decode) is None
        moe.record_routing = False
        for backend, paths in [
            ("reference", (None, None)),
            ("segments", (None, None)),  # reads the expert counts to the host
            ("grouped", ("grouped", "grouped")),
            ("decode", ("decode", "decode")),
        ]:
            moe.backend = backend
            assert (moe._graph_path(decode), moe._graph_path(batch)) == paths, backend
        moe.backend = "auto"
        monkeypatch.setattr(layers, "grouped_mm_runs", lambda x, weights: False)  # counts read to the host
        assert moe._graph_path(decode) == "decode" and moe._graph_path(batch) is None
        moe.router.forced_expert = 1  # a routing that does not replay (Router.routing_replays)
        assert moe._graph_path(decode) is None
        moe.router.forced_expert = None

        monkeypatch.setattr(layers, "grouped_mm_runs", lambda x, weights: True)
        mlp = _layer(mlp=FcMLP)  # no decode kernels: the grouped path at every size
        assert mlp._graph_path(decode) == "grouped"
        mlp.backend = "decode"
        assert mlp._graph_path(decode) is None  # the eager path's error names the backend
        wide = _layer(num_experts=64, top_k=6)  # 200 tokens x 6 slots: QuACK's sizes
        assert (
            wide._graph_path(torch.randn(100, 64)) == "grouped"
            and wide._graph_path(torch.randn(200, 64)) is None
        )


def test_copies_and_pickles_start_without_graphs():
    cache = graphs.ForwardGraphs(max_graphs=3)
    cache._seen.add("seen")
    cache._graphs["key"] = graphs._Graph(object(), (torch.zeros(1),), torch.zeros(1))
    assert len(cache) == 1
    for fresh in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert len(fresh) == 0 and fresh.max_graphs == 3
    moe = _layer()
    moe.__dict__["_forward_graphs"] = cache
    copied = copy.deepcopy(moe)
    assert len(copied.__dict__["_forward_graphs"]) == 0 and len(cache) == 1


def test_forward_graphs_capture_on_the_second_sight_and_evict_the_oldest(monkeypatch):
    captures = []
    monkeypatch.setattr(graphs, "_record", fake_record(captures))
    cache = graphs.ForwardGraphs(max_graphs=2)
    inputs = [torch.randn(n, 3) for n in (1, 1, 1, 2, 2, 3, 3, 1)]
    outputs = [cache.run(lambda x: x * 2 + 1, x, key="k") for x in inputs]
    for x, out in zip(inputs, outputs, strict=True):  # every result its own tensor, none overwritten
        assert torch.equal(out, x * 2 + 1)
    assert captures == [(1, 3), (2, 3), (3, 3)]  # the size 1 graph was evicted for size 3's
    assert len(cache) == 2
    cache.run(lambda x: x - 1, inputs[3], key="other")  # another key: seen once, not captured
    assert captures == [(1, 3), (2, 3), (3, 3)]
    cache.clear()
    assert len(cache) == 0


def test_forward_graphs_copy_every_extra_input_in(monkeypatch):
    """An extra static input (MoCLE's cluster ids) is copied in on every replay like x, and its
    shape and dtype are part of the key."""
    captures = []
    monkeypatch.setattr(graphs, "_record", fake_record(captures))
    cache = graphs.ForwardGraphs()
    table = torch.randn(5, 3)

    def forward(x, ids):
        return x + table[ids]

    x = torch.randn(4, 3)
    for ids in ([0, 1, 2, 3], [4, 4, 0, 1], [2, 2, 2, 2]):
        ids = torch.tensor(ids)
        assert torch.equal(cache.run(forward, x, "k", (ids,)), x + table[ids])
    assert captures == [(4, 3)]
    cache.run(forward, x, "k", (torch.tensor([0, 1, 2, 3], dtype=torch.int32),))  # another dtype
    cache.run(forward, x, "k", (torch.tensor([[0, 1], [2, 3]]).reshape(-1),))  # same signature
    assert captures == [(4, 3)] and len(cache) == 1


def test_release_drops_every_layers_graphs(monkeypatch):
    monkeypatch.setattr(graphs, "_record", fake_record([]))
    caches = [graphs.ForwardGraphs() for _ in range(3)]
    x = torch.randn(2, 3)
    for cache in caches:
        cache.run(torch.neg, x, key="k"), cache.run(torch.neg, x, key="k")
    assert all(len(cache) == 1 for cache in caches)
    graphs.release()
    assert all(len(cache) == 0 for cache in caches)
    assert torch.equal(caches[0].run(torch.neg, x, key="k"), -x)  # and they work on


def test_forward_graphs_serialise_threads(monkeypatch):
    """Two threads replaying one graph: each call's copy in, replay and copy out stay together."""
    monkeypatch.setattr(graphs, "_record", fake_record([]))
    cache = graphs.ForwardGraphs()
    wrong = []

    def work(seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(300):
            x = torch.randn(4, 3, generator=generator)
            if not torch.equal(cache.run(lambda t: t * 2 + 1, x, key="k"), x * 2 + 1):
                wrong.append(seed)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert not wrong and len(cache) == 1


def test_layer_graph_plumbing_on_cpu(monkeypatch):
    """The layer's graph path with the capture faked: results, the record, and the key."""
    captures = []
    monkeypatch.setattr(graphs, "_record", fake_record(captures))
    moe = _layer()
    monkeypatch.setattr(moe, "_graph_path", lambda x: "decode")
    x = torch.randn(3, 1, 64)
    with torch.no_grad():
        expected = moe.route_and_dispatch(x, None, None)[0]
        for _ in range(3):
            assert torch.equal(moe(x), expected)
        assert moe.last_routing is None and moe.last_aux_losses == {}
        assert len(captures) == 1
        moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj.detach() * 2)  # a new address
        moe(x), moe(x)
        moe.router.config.temperature = 2.0  # a setting the captured forward read
        moe(x), moe(x)
        moe.router.gate.weight = torch.nn.Parameter(moe.router.gate.weight.detach() * 2)
        moe(x)
        assert torch.equal(moe(x), moe.route_and_dispatch(x, None, None)[0])  # the new gate's routing
        assert len(captures) == 4
        with routing_inputs(moe, attention_mask=torch.ones(3, 5)):  # as vlmoe.eval.generate sets it
            assert torch.equal(moe(x), moe.route_and_dispatch(x, None, None)[0])
        assert len(captures) == 4  # the mask is no part of the key: the output does not read it
        with pytest.raises(ValueError, match="token_mask"):
            moe(x, token_mask=torch.ones(2, 1, dtype=torch.bool))
        assert torch.equal(
            moe(x, token_mask=torch.ones(3, 1, dtype=torch.bool)), moe.route_and_dispatch(x, None, None)[0]
        )


def _graphs_of(moe):
    return moe.__dict__.get("_forward_graphs")


def _eager(moe, x):
    enabled, graphs.ENABLED = graphs.ENABLED, False
    try:
        return moe(x)
    finally:
        graphs.ENABLED = enabled


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_replays_equal_the_eager_forward_bit_for_bit(dtype):
    moe = _layer().cuda().to(dtype)
    with torch.no_grad():
        for step in range(5):
            x = torch.randn(3, 1, 64, device="cuda", dtype=dtype)
            out = moe(x)
            assert torch.equal(out, _eager(moe, x)), step
        assert len(_graphs_of(moe)) == 1
        assert moe.last_routing is None and moe.last_aux_losses == {}


@pytest.mark.gpu
@pytest.mark.parametrize(("mlp", "tokens"), [(SwiGLU, 100), (SwiGLU, 200), (FcMLP, 3), (FcMLP, 48)])
def test_grouped_path_replays_equal_the_eager_forward(mlp, tokens):
    """Past the decode kernels' tokens (and for MLP experts, which have none): the grouped path,
    sort and gathers included, captured whole."""
    moe = _layer(mlp=mlp).cuda().bfloat16()
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(moe(x), _eager(moe, x)), step
        assert len(_graphs_of(moe)) == 1


@pytest.mark.gpu
def test_a_wide_gate_replays_its_matmul_and_topk_kernel():
    """64 experts x 512: past FUSED_ROUTING_MAX_GATE the routing is the gate's matmul and
    topk_softmax, captured like the one-kernel routing."""
    moe = _layer(hidden=512, num_experts=64, top_k=6).cuda().bfloat16()
    with torch.no_grad():
        assert not moe.router._fused_routing_applies(torch.zeros(3, 512, device="cuda", dtype=torch.bfloat16))
        for step in range(4):
            x = torch.randn(3, 1, 512, device="cuda", dtype=torch.bfloat16)
            assert torch.equal(moe(x), _eager(moe, x)), step
        assert len(_graphs_of(moe)) == 1


@pytest.mark.gpu
def test_each_size_its_own_graph_and_outputs_never_alias():
    moe = _layer().cuda().bfloat16()
    with torch.no_grad():
        outputs, inputs = [], []
        for tokens in (1, 2, 8, 1, 2, 8, 1, 5):
            x = torch.randn(tokens, 64, device="cuda", dtype=torch.bfloat16)
            inputs.append(x)
            outputs.append(moe(x))
        assert len(_graphs_of(moe)) == 3  # a size is captured when it comes back: 5 came once
        for x, out in zip(inputs, outputs, strict=True):  # every earlier result survives later replays
            assert torch.equal(out, _eager(moe, x))


@pytest.mark.gpu
def test_replays_follow_weights_changed_in_place_and_capture_for_new_ones():
    moe = _layer().cuda().bfloat16()
    x = torch.randn(2, 1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = moe(x)
        moe(x)  # a replay
        moe.experts.down_proj.mul_(2)  # same address: the graph reads the new values
        assert torch.equal(moe(x), _eager(moe, x))
        assert torch.allclose(moe(x).float(), 2 * before.float(), rtol=1e-2, atol=1e-3)
        moe.experts.down_proj = torch.nn.Parameter(moe.experts.down_proj.detach() / 2)  # a new address
        for _ in range(3):  # eager, captured, replayed
            assert torch.equal(moe(x), _eager(moe, x))
        assert len(_graphs_of(moe)) == 2
        moe.router.config.top_k = 1  # a setting the captured forward read
        for _ in range(3):
            assert torch.equal(moe(x), _eager(moe, x))
        assert len(_graphs_of(moe)) == 3


@pytest.mark.gpu
def test_capture_after_release_and_after_every_graph_is_gone():
    """A fresh pool after `release()`, and the same pool after all its graphs were freed (the
    case torch's allocators assert on without the pool's kept graph)."""
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        for attempt in range(3):
            moe = _layer(seed=attempt).cuda().bfloat16()
            for _ in range(3):
                assert torch.equal(moe(x), _eager(moe, x)), attempt
            assert len(_graphs_of(moe)) == 1
            del moe  # its graphs go with it
            if attempt == 1:
                graphs.release()
                torch.cuda.empty_cache()


@pytest.mark.gpu
def test_replays_on_two_streams_stay_in_order():
    """Graphs share scratch memory: a replay on another stream waits for the last one."""
    moe = _layer().cuda().bfloat16()
    other = _layer(seed=1).cuda().bfloat16()
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    with torch.no_grad():
        for layer in (moe, other):
            layer(x), layer(x)  # captured
        inputs = [x * (i + 1) for i in range(20)]
        side.wait_stream(main)  # the inputs were made on the main stream
        outputs = []
        for i, xi in enumerate(inputs):
            with torch.cuda.stream(side if i % 2 else main):
                outputs.append((moe if i % 3 else other)(xi))
        torch.cuda.synchronize()
        for i, (xi, out) in enumerate(zip(inputs, outputs, strict=True)):
            assert torch.equal(out, _eager(moe if i % 3 else other, xi)), i


@pytest.mark.gpu
def test_eager_where_a_graph_would_be_wrong():
    moe = _layer().cuda().bfloat16()
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), record_routing(moe):
        moe(x)
        assert moe.last_routing is not None  # recorded: the eager path
    assert _graphs_of(moe) is None
    out = moe(x)  # autograd on: the grouped path, with a backward
    out.float().sum().backward()
    assert moe.experts.down_proj.grad is not None and _graphs_of(moe) is None
    with torch.no_grad():
        compiled = torch.compile(moe, backend="eager", fullgraph=True)
        assert torch.equal(compiled(x), _eager(moe, x))
        assert _graphs_of(moe) is None  # traced eagerly, no graph inside the compiled one
        # A graph the caller captures around the layer: the layer runs eagerly inside it.
        static_x = x.clone()
        moe(static_x)  # warm the kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = moe(static_x)
        static_x.copy_(x * 2)
        graph.replay()
        assert torch.equal(static_out, _eager(moe, x * 2))


@pytest.mark.gpu
def test_bad_token_mask_is_refused_on_the_graph_path():
    moe = _layer().cuda().bfloat16()
    x = torch.randn(2, 1, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        moe(x)
        with pytest.raises(ValueError, match="token_mask"):
            moe(x, token_mask=torch.ones(3, 1, dtype=torch.bool, device="cuda"))
        assert torch.equal(
            moe(x, token_mask=torch.ones(2, 1, dtype=torch.bool, device="cuda")), _eager(moe, x)
        )


@pytest.mark.gpu
@pytest.mark.parametrize("surgery", ["upcycle", "mole", "mocle"])
def test_generation_with_graphs_gives_the_eager_tokens(surgery):
    import vlmoe
    from vlmoe.eval.generate import GenerationSettings, chat_prompt, generate_token_ids
    from vlmoe.models import tiny

    model, processor = tiny("llava")
    if surgery == "upcycle":
        vlmoe.upcycle_ffn(model, num_experts=4, top_k=2)
    else:  # LLaVA-MoLE or MoCLE, with every LoRA B made non-zero so the adapters count
        mocle = {"router": "cluster", "num_clusters": 8, "universal": True} if surgery == "mocle" else {}
        vlmoe.add_mole(model, num_experts=4, rank=4, alpha=8, top_k=1, **mocle)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(std=0.05)
    model = model.cuda().bfloat16()
    prompts = [chat_prompt(processor, question, 0) for question in ("What is it?", "Why is the sky blue?")]
    settings = GenerationSettings(max_new_tokens=8, batch_size=2)
    cluster_ids = [3, 6] if surgery == "mocle" else None
    graphed = generate_token_ids(model, processor, prompts, [[], []], settings, 0, cluster_ids)
    layers_with_graphs = [m for m in model.modules() if len(_graphs_of(m) or ()) > 0]
    assert layers_with_graphs  # every decoding step after the second replays
    enabled, graphs.ENABLED = graphs.ENABLED, False
    try:
        eager = generate_token_ids(model, processor, prompts, [[], []], settings, 0, cluster_ids)
    finally:
        graphs.ENABLED = enabled
    assert torch.equal(graphed, eager)
