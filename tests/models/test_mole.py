"""LLaVA-MoLE's and MoCLE's feed-forward (`vlmoe.models.mole`): its CUDA-graph decoding path.

On the CPU, with the capture faked through `graphs._record`: which forwards replay, the key,
and results equal to the eager forward. On a GPU: replays equal the eager forward bit for bit.
"""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP

from tests.moe.helpers import fake_record
from vlmoe.models import mole as mole_module
from vlmoe.models.mole import MoLEFeedForward
from vlmoe.moe import RouterConfig, graphs, record_routing, routing_inputs


def _mole(universal=False, dropout=0.0, seed=0, **router):
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=2))
    config = RouterConfig(**{"num_experts": 4, "top_k": 1, **router})
    layer = MoLEFeedForward.from_mlp(mlp, config, rank=4, alpha=8, dropout=dropout, universal=universal)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(std=0.2)  # LoRA B starts at zero: make every adapter count
    return layer.eval()


def _reference_linear(linear, x, gates):
    """base(x) + sum_e gate_e * s * B_e A_e x (+ s * B_u A_u x), expert by expert."""
    out = linear.base(x)
    experts = linear.experts
    for expert in range(experts.num_experts):
        delta = x @ experts.lora_A[expert].t() @ experts.lora_B[expert].t() * experts.scaling
        out = out + gates[:, expert : expert + 1] * delta
    if linear.universal is not None:
        out = out + linear.universal.expert_forward(0, x)
    return out


@pytest.mark.parametrize("universal", [False, True])
def test_feed_forward_equals_the_expert_by_expert_reference_and_shares_one_gate_matrix(universal):
    """float64: the three linears of one forward share the routing's block gates (one entry
    while their scalings agree, two once one differs), values and gradients as the reference."""
    from vlmoe.moe.dispatch import gate_matrix

    layer = _mole(universal=universal, top_k=2).double().train()
    for linear in (layer.gate_proj, layer.up_proj, layer.down_proj):
        linear.backend = "dense"  # what `auto` takes on CUDA
    x = torch.randn(6, 64, dtype=torch.float64, requires_grad=True)
    for change_scaling in (False, True):
        if change_scaling:
            layer.down_proj.experts.scaling *= 3
            if universal:
                layer.down_proj.universal.scaling *= 3
        routing = layer.route(x)
        out = layer._linears(x, routing)
        assert len(routing._derived) == (2 if change_scaling else 1)
        gates = gate_matrix(routing)
        hidden = layer.act_fn(_reference_linear(layer.gate_proj, x, gates)) * _reference_linear(
            layer.up_proj, x, gates
        )
        expected = _reference_linear(layer.down_proj, hidden, gates)
        assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
        grad_out = torch.randn_like(out)
        parameters = (x, layer.router.gate.weight, layer.up_proj.experts.lora_A)
        ours = torch.autograd.grad(out, parameters, grad_out, retain_graph=True)  # the routing is shared
        theirs = torch.autograd.grad(expected, parameters, grad_out)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.fixture
def as_on_cuda(monkeypatch):
    """The device checks patched true, and `auto` resolving as on CUDA (the dense dispatch)."""
    monkeypatch.setattr(graphs, "can_capture", lambda x: not torch.is_grad_enabled())
    real = mole_module.resolve_backend
    monkeypatch.setattr(
        mole_module,
        "resolve_backend",
        lambda backend, x, experts: "dense" if backend == "auto" else real(backend, x, experts),
    )


def test_which_mole_forwards_replay(as_on_cuda):
    layer = _mole()
    step, prompt = torch.randn(3, 1, 64), torch.randn(1, 5, 64)
    assert layer._graph_key(step) is None  # autograd on
    with torch.no_grad():
        assert layer._graph_key(step) is not None and layer._graph_key(torch.randn(3, 64)) is not None
        assert layer._graph_key(prompt) is None  # a prompt: a length of its own each time
        with record_routing(layer):
            assert layer._graph_key(step) is None
        layer.up_proj.backend = "grouped"  # reads the expert counts on the host
        assert layer._graph_key(step) is None
        layer.up_proj.backend = "auto"
        layer.train()
        assert layer._graph_key(step) is not None  # no dropout: training mode changes nothing
        dropping = _mole(dropout=0.1)
        assert dropping._graph_key(step) is not None  # eval: dropout is off
        assert dropping.train()._graph_key(step) is None  # a fresh mask every call
        clustered = _mole(input="cluster", num_clusters=8)  # MoCLE: the ids a second graph input
        assert clustered._graph_key(step) is not None


@pytest.mark.parametrize("universal", [False, True])
def test_mole_graph_plumbing_on_cpu(as_on_cuda, monkeypatch, universal):
    captures = []
    monkeypatch.setattr(graphs, "_record", fake_record(captures))
    layer = _mole(universal=universal)
    x = torch.randn(3, 1, 64)
    with torch.no_grad():
        routing = layer.route(x)
        expected = layer._linears(x, routing)
        for _ in range(3):
            assert torch.equal(layer(x), expected)
        assert len(captures) == 1 and layer.last_aux_losses == {} and layer.last_routing is None
        layer.down_proj.experts.scaling *= 2  # a setting the captured forward read
        layer(x), layer(x)
        layer.gate_proj.experts.lora_A = torch.nn.Parameter(layer.gate_proj.experts.lora_A * 2)  # new address
        changed = layer._linears(x, layer.router(x.reshape(3, 64)))
        layer(x)
        assert torch.equal(layer(x), changed)
    assert len(captures) == 3


def test_mocle_graph_plumbing_on_cpu(as_on_cuda, monkeypatch):
    """MoCLE (cluster routing, universal expert): the ids per sample, per token, or set with
    routing_inputs reach the replay as its second input; new ids at the same shape replay the
    same graph; no ids at all is the router's own error."""
    captures = []
    monkeypatch.setattr(graphs, "_record", fake_record(captures))
    layer = _mole(universal=True, input="cluster", num_clusters=8)
    x = torch.randn(3, 1, 64)

    def eager(ids):
        return layer._linears(x, layer.route(x, cluster_ids=ids))

    with torch.no_grad():
        for ids in ([0, 5, 7], [7, 7, 1], [2, 3, 4]):
            ids = torch.tensor(ids)
            assert torch.equal(layer(x, cluster_ids=ids), eager(ids))
            assert torch.equal(layer(x, cluster_ids=ids.view(3, 1)), eager(ids))  # one per token
            with routing_inputs(layer, cluster_ids=ids):
                assert torch.equal(layer(x), eager(ids))
        assert captures == [(3, 1, 64)]
        assert not torch.equal(eager(torch.tensor([0, 5, 7])), eager(torch.tensor([7, 7, 1])))
        with pytest.raises(ValueError, match="got no cluster_ids"):
            layer(x)
        with pytest.raises(ValueError, match="cluster_ids must have one id per sample"):
            layer(x, cluster_ids=torch.tensor([0, 1]))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["mole", "mole-universal", "mocle"])
def test_mole_replays_equal_the_eager_forward_bit_for_bit(kind):
    router = {"input": "cluster", "num_clusters": 8} if kind == "mocle" else {}
    layer = _mole(universal=kind != "mole", **router).cuda().bfloat16()
    with torch.no_grad():
        for step in range(4):
            x = torch.randn(2, 1, 64, device="cuda", dtype=torch.bfloat16)
            ids = torch.randint(0, 8, (2,), device="cuda") if kind == "mocle" else None
            out = layer(x, cluster_ids=ids)
            enabled, graphs.ENABLED = graphs.ENABLED, False
            try:
                assert torch.equal(out, layer(x, cluster_ids=ids)), step
            finally:
                graphs.ENABLED = enabled
        assert len(layer.__dict__["_forward_graphs"]) == 1
