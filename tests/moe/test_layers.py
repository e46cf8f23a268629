import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from tests.moe.helpers import FcMLP, Projector, SwiGLU, randomize_, relative_error
from vlmoe.moe import (
    MoEConnector,
    MoEFeedForward,
    MoLELinear,
    aux_loss,
    aux_losses_by_layer,
    record_routing,
    routing_inputs,
    routing_records,
)


@pytest.mark.parametrize("dense_cls", [SwiGLU, FcMLP])
@pytest.mark.parametrize(("num_experts", "top_k"), [(4, 2), (3, 3), (1, 1)])
@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_upcycled_ffn_computes_the_dense_function(dense_cls, num_experts, top_k, backend):
    torch.manual_seed(0)
    dense = dense_cls(8, 12).double()
    moe = MoEFeedForward.from_dense(dense, num_experts, top_k, backend=backend)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    out = moe(x)
    assert out.shape == x.shape
    assert relative_error(out, dense(x)) < 1e-12
    # Gradients w.r.t. the input match too (the router gets gradient only through the weights,
    # which sum to one with renormalisation).
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected,) = torch.autograd.grad(dense(x).sum(), x)
    assert relative_error(grad, expected) < 1e-12


def test_upcycled_top1_scales_the_dense_output_by_the_gate():
    # Switch / DeepSpeed top-1: the chosen probability scales the expert output, so the router
    # learns; an upcycled top-1 layer is therefore the dense function times the gate.
    torch.manual_seed(0)
    dense = SwiGLU(8, 12).double()
    moe = MoEFeedForward.from_dense(dense, num_experts=4, top_k=1)
    x = torch.randn(7, 8, dtype=torch.float64)
    with record_routing(moe):
        out = moe(x)
    gate = moe.last_routing.combine_weights
    assert relative_error(out, gate * dense(x)) < 1e-12


def test_one_expert_moe_equals_dense_including_weight_gradients():
    torch.manual_seed(0)
    dense = SwiGLU(8, 12).double()
    moe = MoEFeedForward.from_dense(dense, num_experts=1, top_k=1, load_balance_coef=0.0, backend="grouped")
    x = torch.randn(6, 8, dtype=torch.float64)
    moe(x).square().sum().backward()
    dense(x).square().sum().backward()
    expected = torch.cat([dense.gate_proj.weight.grad, dense.up_proj.weight.grad])
    assert relative_error(moe.experts.gate_up_proj.grad[0], expected) < 1e-12
    assert relative_error(moe.experts.down_proj.grad[0], dense.down_proj.weight.grad) < 1e-12


def test_from_dense_refuses_unknown_modules():
    with pytest.raises(ValueError, match="cannot upcycle Sequential"):
        MoEFeedForward.from_dense(nn.Sequential(nn.Linear(4, 4)), 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        MoEFeedForward.from_dense(SwiGLU(4, 4), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts"):
        MoEFeedForward.from_dense(SwiGLU(4, 4), num_experts=0, top_k=1)
    with pytest.raises(ValueError, match="backend"):
        MoEFeedForward.from_dense(SwiGLU(4, 4), backend="fast")
    with pytest.raises(ValueError, match="backend"):
        MoLELinear(nn.Linear(4, 4), backend="fast")


def test_wrong_input_size_names_the_expected_shape():
    moe = MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2)
    with pytest.raises(
        ValueError, match=r"MoEFeedForward expects inputs whose last dimension is 8, got shape \(3, 5\)"
    ):
        moe(torch.randn(3, 5))
    mole = MoLELinear(nn.Linear(8, 4), num_experts=2, rank=2, router_input="cluster", num_clusters=2)
    with pytest.raises(ValueError, match="MoLELinear expects inputs whose last dimension is 8"):
        mole(torch.randn(3, 6), cluster_ids=torch.zeros(3, dtype=torch.long))


def test_aux_loss_reaches_the_router():
    torch.manual_seed(0)
    moe = MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2, load_balance_coef=0.01, z_loss_coef=0.001)
    moe(torch.randn(32, 8))
    total = aux_loss(moe)
    assert torch.allclose(total, sum(moe.last_aux_losses.values()))
    assert set(aux_losses_by_layer(moe)[""]) == {"load_balance", "z_loss"}
    total.backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0


def test_padding_mask_shape_checked_and_used():
    torch.manual_seed(0)
    moe = MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    with pytest.raises(ValueError, match="token_mask must have the input's leading shape"):
        moe(x, token_mask=mask[:, :3].reshape(-1))
    padded = x.clone()
    padded[0, 3:] = 50.0
    moe(x, token_mask=mask)
    clean = moe.last_aux_losses["load_balance"]
    with routing_inputs(moe, attention_mask=mask):
        moe(padded)
    assert torch.allclose(moe.last_aux_losses["load_balance"], clean)
    assert moe.token_mask is None  # cleared on exit


def test_routing_inputs_slice_the_mask_during_cached_generation():
    moe = MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2)
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with routing_inputs(moe, attention_mask=mask), record_routing(moe):
        moe(torch.randn(2, 1, 8))  # one new token per sample
    assert torch.equal(routing_records(moe)[""].token_mask, torch.tensor([True, True]))


def test_record_routing_is_off_by_default_and_restored():
    moe = MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2)
    moe(torch.randn(3, 8))
    assert moe.last_routing is None and routing_records(moe) == {}
    with record_routing(moe):
        moe(torch.randn(3, 8))
    record = routing_records(moe)[""]
    assert record.expert_indices.shape == (3, 2) and not record.router_probs.requires_grad
    assert moe.record_routing is False
    assert int(record.tokens_per_expert().sum()) == 6


# --- MoLE ---------------------------------------------------------------------------------


def test_zero_init_mole_equals_base():
    torch.manual_seed(0)
    base = nn.Linear(8, 16)
    mole = MoLELinear(base, num_experts=4, rank=2, alpha=4, top_k=1, universal=True)
    x = torch.randn(2, 3, 8)
    assert torch.equal(mole(x), base(x))
    assert not base.weight.requires_grad
    trainable = {name for name, p in mole.named_parameters() if p.requires_grad}
    assert trainable == {
        "router.gate.weight",
        "experts.lora_A",
        "experts.lora_B",
        "universal.lora_A",
        "universal.lora_B",
    }


def _peft_lora(base: nn.Linear, rank: int, alpha: float):
    wrapper = nn.Sequential()
    wrapper.add_module("proj", base)
    return get_peft_model(wrapper, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["proj"]))


def test_one_expert_mole_equals_peft_lora():
    torch.manual_seed(0)
    base = nn.Linear(8, 16).double()
    mole = MoLELinear(base, num_experts=1, rank=4, alpha=8, top_k=1)
    randomize_(mole.experts, seed=1)
    peft_model = _peft_lora(nn.Linear(8, 16).double(), rank=4, alpha=8)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(base.weight)
        peft_layer.base_layer.bias.copy_(base.bias)
        peft_layer.lora_A["default"].weight.copy_(mole.experts.lora_A[0])
        peft_layer.lora_B["default"].weight.copy_(mole.experts.lora_B[0])
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    assert relative_error(mole(x), peft_model(x)) < 1e-12


def test_plain_lora_equals_peft_and_merges():
    torch.manual_seed(0)
    base = nn.Linear(8, 16).double()
    plain = MoLELinear.plain(base, rank=4, alpha=16)
    randomize_(plain.universal, seed=2)
    peft_model = _peft_lora(nn.Linear(8, 16).double(), rank=4, alpha=16)
    peft_layer = peft_model.base_model.model.proj
    with torch.no_grad():
        peft_layer.base_layer.weight.copy_(base.weight)
        peft_layer.base_layer.bias.copy_(base.bias)
        peft_layer.lora_A["default"].weight.copy_(plain.universal.lora_A[0])
        peft_layer.lora_B["default"].weight.copy_(plain.universal.lora_B[0])
    x = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    expected = peft_model(x)
    out = plain(x)
    assert relative_error(out, expected) < 1e-12
    # The gradients through the scaled in-place addmm equal PEFT's separate scaling and sum.
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, (x, plain.universal.lora_A, plain.universal.lora_B), grad_out)
    peft_params = (peft_layer.lora_A["default"].weight, peft_layer.lora_B["default"].weight)
    theirs = torch.autograd.grad(expected, (x, *peft_params), grad_out)
    assert relative_error(ours[0], theirs[0]) < 1e-12
    assert relative_error(ours[1][0], theirs[1]) < 1e-12 and relative_error(ours[2][0], theirs[2]) < 1e-12
    x = x.detach()
    expected = expected.detach()
    plain.merge_universal()
    assert plain.universal is None
    assert relative_error(plain(x), expected) < 1e-12


@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_mole_top1_selects_one_expert_weighted_by_its_gate(backend):
    torch.manual_seed(0)
    base = nn.Linear(8, 16).double()
    mole = MoLELinear(base, num_experts=4, rank=2, alpha=4, top_k=1, backend=backend)
    randomize_(mole.experts, seed=3)
    x = torch.randn(10, 8, dtype=torch.float64)
    with record_routing(mole):
        out = mole(x)
    routing = mole.last_routing
    expected = base(x).clone()
    for t in range(10):
        e = int(routing.expert_indices[t, 0])
        expected[t] += routing.combine_weights[t, 0] * mole.experts.expert_forward(e, x[t : t + 1])[0]
    assert relative_error(out, expected) < 1e-12


@pytest.mark.parametrize("universal", [False, True])
def test_mole_dense_addmm_path_equals_reference_forward_and_backward(universal):
    """The dense path adds its second matmul straight into the base output (addmm) with the
    scaling folded into the gates: same function and gradients as the per-expert reference."""
    torch.manual_seed(0)
    layers = {}
    for backend in ("dense", "reference"):
        torch.manual_seed(0)
        layers[backend] = MoLELinear(
            nn.Linear(8, 12).double(),
            num_experts=3,
            rank=2,
            alpha=6,
            top_k=2,
            universal=universal,
            backend=backend,
        )
        randomize_(layers[backend].experts, seed=6)
        if universal:
            randomize_(layers[backend].universal, seed=7)
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 5, 12, dtype=torch.float64)
    results = {}
    for backend, layer in layers.items():
        out = layer(x)
        params = [x, *(p for p in layer.parameters() if p.requires_grad)]
        results[backend] = (out, torch.autograd.grad(out, params, grad_out))
    (out, grads), (expected, expected_grads) = results["dense"], results["reference"]
    assert out.shape == (2, 5, 12)
    assert relative_error(out, expected) < 1e-12
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) < 1e-12
    with torch.no_grad():  # the router's own gate product (not folded into the A matmul)
        assert relative_error(layers["dense"](x), expected) < 1e-12


@pytest.mark.parametrize("router_input", ["token", "cluster"])
def test_mole_dense_path_under_autocast_equals_the_reference_path(router_input):
    """Mixed precision (what a bf16 recipe trains with): float32 adapters, a bf16 base output
    from autocast. The dense path's in-place add must follow autocast's dtype, like the reference."""
    outputs, grads = {}, {}
    for backend in ("dense", "reference"):
        torch.manual_seed(0)
        cluster = {"router_input": "cluster", "num_clusters": 3} if router_input == "cluster" else {}
        layer = MoLELinear(
            nn.Linear(16, 24), num_experts=4, rank=4, alpha=8, universal=True, backend=backend, **cluster
        )
        randomize_(layer.experts, seed=3)
        randomize_(layer.universal, seed=4)
        torch.manual_seed(1)
        x = torch.randn(2, 5, 16, requires_grad=True)
        ids = torch.tensor([0, 2]) if router_input == "cluster" else None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[backend] = layer(x, cluster_ids=ids)
        outputs[backend].float().square().sum().backward()
        grads[backend] = layer.experts.lora_B.grad
    assert outputs["dense"].dtype == outputs["reference"].dtype == torch.bfloat16
    assert relative_error(outputs["dense"].float(), outputs["reference"].float()) < 2e-2
    assert relative_error(grads["dense"], grads["reference"]) < 5e-2


def test_mocle_cluster_routing_with_universal_expert():
    torch.manual_seed(0)
    base = nn.Linear(8, 8).double()
    layer = MoLELinear(
        base,
        num_experts=3,
        rank=2,
        alpha=2,
        router_input="cluster",
        num_clusters=5,
        universal=True,
        temperature=0.1,
    )
    randomize_(layer.experts, seed=4)
    randomize_(layer.universal, seed=5)
    x = torch.randn(2, 4, 8, dtype=torch.float64)
    ids = torch.tensor([1, 4])
    with routing_inputs(layer, cluster_ids=ids), record_routing(layer):
        out = layer(x)
    chosen = layer.last_routing.expert_indices.view(2, 4)
    assert torch.all(chosen == chosen[:, :1])  # one expert per sample, from its cluster
    weights = layer.last_routing.combine_weights.view(2, 4)
    expected = base(x) + layer.universal.expert_forward(0, x)
    for b in range(2):
        e = int(chosen[b, 0])
        expected[b] += weights[b, :, None] * layer.experts.expert_forward(e, x[b])
    assert relative_error(out, expected) < 1e-12
    with pytest.raises(ValueError, match="cluster_ids must have one id per sample"):
        layer(x, cluster_ids=torch.tensor([0, 1, 2]))
    with (
        pytest.raises(ValueError, match=r"cluster_ids must be in \[0, num_clusters=5\)"),
        routing_inputs(layer, cluster_ids=torch.tensor([1, 5])),
    ):
        pass


def test_shared_routing_is_reused():
    torch.manual_seed(0)
    gate = MoLELinear(nn.Linear(8, 12), num_experts=4, rank=2, alpha=2)
    up = MoLELinear(nn.Linear(8, 12), num_experts=4, rank=2, alpha=2)
    randomize_(up.experts, seed=6)
    x = torch.randn(5, 8)
    routing = gate.router(x)
    out = up(x, routing=routing)
    expected = up.base(x).clone()
    for t in range(5):
        e = int(routing.expert_indices[t, 0])
        expected[t] += routing.combine_weights[t, 0] * up.experts.expert_forward(e, x[t : t + 1])[0]
    assert relative_error(out, expected) < 1e-6


def test_mole_bad_arguments():
    with pytest.raises(ValueError, match="base must be an nn.Linear"):
        MoLELinear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="universal=True"):
        MoLELinear(nn.Linear(4, 4), num_experts=0)
    with pytest.raises(ValueError, match="rank"):
        MoLELinear(nn.Linear(4, 4), rank=0)
    with pytest.raises(ValueError, match="top_k"):
        MoLELinear(nn.Linear(4, 4), num_experts=2, top_k=3)


# --- connector ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda: Projector(6, 10), lambda: nn.Sequential(nn.Linear(6, 10), nn.GELU())]
)
def test_upcycled_connector_equals_projector(make):
    torch.manual_seed(0)
    projector = make().double()
    connector = MoEConnector.upcycle(projector, num_experts=4, top_k=2)
    x = torch.randn(2, 9, 6, dtype=torch.float64)
    assert relative_error(connector(x), projector(x)) < 1e-12


def test_aligned_connector_keeps_each_projector_as_an_expert():
    torch.manual_seed(0)
    projectors = [Projector(6, 10).double() for _ in range(4)]
    connector = MoEConnector.from_projectors(projectors, top_k=2)
    assert type(connector.experts).__name__ == "MLPExperts"
    x = torch.randn(7, 6, dtype=torch.float64)
    for i, projector in enumerate(projectors):
        connector.router.forced_expert = i
        assert relative_error(connector(x), projector(x)) < 1e-12
    assert connector.router.config.load_balance_coef == 0.0  # ChartMoE: no balance loss by default


def test_random_connector_differs_from_projector():
    torch.manual_seed(0)
    projector = Projector(6, 10)
    connector = MoEConnector.random(projector, num_experts=2, top_k=1)
    assert not torch.allclose(connector.experts.fc1_weight[0], projector.linear_1.weight)
    assert not torch.allclose(connector.experts.fc1_weight[0], connector.experts.fc1_weight[1])


def test_connector_is_not_given_the_text_mask():
    connector = MoEConnector.upcycle(Projector(6, 10), 4, 2)
    with routing_inputs(connector, attention_mask=torch.ones(1, 3)):
        assert connector.token_mask is None
        connector(torch.randn(5, 6))


def test_nested_routing_inputs_keep_the_outer_cluster_ids_and_restore_on_exit():
    layer = MoLELinear(nn.Linear(8, 8), num_experts=3, rank=2, router_input="cluster", num_clusters=5)
    ids, mask = torch.tensor([1, 4]), torch.ones(2, 3, dtype=torch.long)
    with routing_inputs(layer, cluster_ids=ids):
        with routing_inputs(layer, attention_mask=mask):  # as vlmoe.eval.generate does inside
            assert torch.equal(layer.cluster_ids, ids) and layer.token_mask.all()
            layer(torch.randn(2, 3, 8))  # routes: the cluster ids are still there
        assert layer.token_mask is None and torch.equal(layer.cluster_ids, ids)
    assert layer.cluster_ids is None and layer.token_mask is None


def test_mocle_layer_refuses_cluster_ids_that_are_not_an_integer_tensor():
    layer = MoLELinear(nn.Linear(8, 8), num_experts=3, rank=2, router_input="cluster", num_clusters=5)
    x = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="cluster_ids is a list; pass a tensor"):
        layer(x, cluster_ids=[1, 4])
    with pytest.raises(ValueError, match="cluster_ids is a torch.bool tensor"):
        layer(x, cluster_ids=torch.tensor([True, False]))
    with (
        pytest.raises(ValueError, match="cluster_ids is a torch.float32 tensor"),
        routing_inputs(layer, cluster_ids=torch.tensor([1.0, 4.0])),
    ):
        pass
    assert layer(x, cluster_ids=torch.tensor([1, 4])).shape == (2, 4, 8)


def test_aligned_projectors_with_different_activations_keep_their_own():
    torch.manual_seed(0)
    projectors = [Projector(6, 10).double() for _ in range(3)]
    projectors[1].act = nn.GELU(approximate="tanh")
    projectors[2].act = nn.ReLU()
    connector = MoEConnector.from_projectors(projectors, top_k=2)
    x = torch.randn(7, 6, dtype=torch.float64)
    for i, projector in enumerate(projectors):
        connector.router.forced_expert = i
        assert relative_error(connector(x), projector(x)) < 1e-12


def test_integer_inputs_are_refused_by_every_layer():
    mocle = MoLELinear(nn.Linear(8, 4), num_experts=2, rank=2, router_input="cluster", num_clusters=2)
    calls = [
        (MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2), {}),
        (MoLELinear(nn.Linear(8, 4), num_experts=2, rank=2), {}),
        (mocle, {"cluster_ids": torch.tensor([0, 1])}),
        (MoEConnector.upcycle(Projector(8, 10), 4, 2), {}),
    ]
    ids = torch.randint(0, 8, (2, 3, 8))
    for layer, inputs in calls:
        name = type(layer).__name__
        with pytest.raises(ValueError, match=rf"{name} got a torch.int64 input of shape \(2, 3, 8\)"):
            layer(ids, **inputs)


# --- the whole MoE FFN against a float64 per-token reference -------------------------------


def _reference_moe_ffn(x, mask, layer, *, top_k, capacity_factor, min_capacity, normalize, first_choice):
    """The published method, one token and one expert at a time: softmax router, top-k with ties
    to the lower index, GShard capacity (first choices before second, earlier tokens first,
    padding takes none), renormalised kept weights; Switch balance loss E * sum_i f_i * P_i over
    real tokens with f_i the fraction of (first-choice, under GShard) slots before dropping; z-loss."""
    gate = layer.router.gate.weight
    experts = layer.experts
    num_tokens, num_experts = x.shape[0], gate.shape[0]
    logits = x @ gate.t()
    probs = torch.softmax(logits, dim=-1)
    real = [bool(m) for m in mask]
    choices = [
        sorted(range(num_experts), key=lambda e, t=t: (-float(probs[t, e].detach()), e))[:top_k]
        for t in range(num_tokens)
    ]
    kept = [[real[t]] * top_k if capacity_factor is not None else [True] * top_k for t in range(num_tokens)]
    if capacity_factor is not None:
        capacity = max(min_capacity, math.ceil(capacity_factor * sum(real) * top_k / num_experts))
        load = [0] * num_experts
        for j in range(top_k):
            for t in range(num_tokens):
                if not real[t]:
                    continue
                e = choices[t][j]
                kept[t][j] = load[e] < capacity
                load[e] += kept[t][j]
    rows = []
    for t in range(num_tokens):
        weights = [probs[t, e] * kept[t][j] for j, e in enumerate(choices[t])]
        if normalize and top_k > 1:
            total = sum(weights)
            weights = [w / total.clamp_min(1e-9) for w in weights]
        row = x.new_zeros(x.shape[-1])
        for j, e in enumerate(choices[t]):
            if kept[t][j]:
                row = row + weights[j] * experts.expert_forward(e, x[t : t + 1])[0]
        rows.append(row)
    counted = [choices[t][:1] if first_choice else choices[t] for t in range(num_tokens) if real[t]]
    num_real, slots = sum(real), len(counted[0])
    f = [sum(c.count(e) for c in counted) / (num_real * slots) for e in range(num_experts)]
    p = [sum(probs[t, e] for t in range(num_tokens) if real[t]) / num_real for e in range(num_experts)]
    balance = num_experts * sum(f[e] * p[e] for e in range(num_experts))
    z_loss = sum(torch.logsumexp(logits[t], -1) ** 2 for t in range(num_tokens) if real[t]) / num_real
    return torch.stack(rows), torch.tensor(kept), balance, z_loss


@pytest.mark.parametrize(
    ("top_k", "capacity_factor", "min_capacity", "normalize", "first_choice"),
    [
        (2, None, 0, True, False),  # MoE-LLaVA at evaluation without capacity
        (2, 0.75, 0, True, True),  # DeepSpeed-MoE top-2 training: drops, first-choice f_i
        (2, 1.0, 0, False, False),  # raw (not renormalised) weights with drops
        (1, 0.5, 3, True, False),  # Switch top-1 with a min_capacity floor
        (4, 0.6, 0, True, False),  # top_k == num_experts
    ],
)
@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_moe_ffn_equals_a_float64_per_token_reference(
    backend, top_k, capacity_factor, min_capacity, normalize, first_choice
):
    torch.manual_seed(0)
    layer = MoEFeedForward.from_dense(
        SwiGLU(6, 10).double(), num_experts=4, top_k=top_k, load_balance_coef=0.3, z_loss_coef=0.2,
        capacity_factor=capacity_factor, min_capacity=min_capacity, normalize_top_k=normalize,
        load_balance_first_choice=first_choice, backend=backend,
    )  # fmt: skip
    randomize_(layer, seed=2)  # distinct experts and a router far from uniform
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    grad_out = torch.randn(2, 7, 6, generator=generator, dtype=torch.float64)

    with record_routing(layer):
        out = layer(x, token_mask=mask)
    losses = layer.last_aux_losses
    expected, kept, balance, z_loss = _reference_moe_ffn(
        x.reshape(-1, 6), mask.reshape(-1), layer, top_k=top_k, capacity_factor=capacity_factor,
        min_capacity=min_capacity, normalize=normalize, first_choice=first_choice,
    )  # fmt: skip
    if capacity_factor is not None:
        assert torch.equal(layer.last_routing.kept, kept)
        assert not kept.all()  # the case drops slots
    assert relative_error(out.reshape(-1, 6), expected) < 1e-12
    assert relative_error(losses["load_balance"], 0.3 * balance) < 1e-12
    assert relative_error(losses["z_loss"], 0.2 * z_loss) < 1e-12

    params = [x, *layer.parameters()]
    total = (out * grad_out).sum() + losses["load_balance"] + losses["z_loss"]
    wanted = (expected * grad_out.reshape(-1, 6)).sum() + 0.3 * balance + 0.2 * z_loss
    grads = torch.autograd.grad(total, params)
    expected_grads = torch.autograd.grad(wanted, params)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert relative_error(grad, expected_grad) < 1e-12


def _reference_mole(layer, x, cluster_ids, *, temperature, straight_through):
    """LLaVA-MoLE / MoCLE, one token at a time: softmax(logits / temperature) over the LoRA
    experts from the token (or its sample's cluster embedding), the argmax expert (lowest index
    on ties) weighted by its probability (straight-through: forward 1, gradient through it), plus
    the universal LoRA at weight 1."""
    router, experts, universal = layer.router, layer.experts, layer.universal
    scaling = experts.scaling
    rows = []
    for t in range(x.shape[0]):
        if router.cluster_embedding is not None:
            logits = router.gate.weight @ router.cluster_embedding.weight[int(cluster_ids[t])]
        else:
            logits = router.gate.weight @ x[t]
        probs = torch.softmax(logits / temperature, dim=-1)
        e = int(torch.argmax(probs.detach()))
        weight = probs[e] - probs[e].detach() + 1 if straight_through else probs[e]
        row = layer.base(x[t]) + weight * scaling * (experts.lora_B[e] @ (experts.lora_A[e] @ x[t]))
        if universal is not None:
            row = row + universal.scaling * (universal.lora_B[0] @ (universal.lora_A[0] @ x[t]))
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize(
    ("router_input", "universal", "temperature", "straight_through"),
    [
        ("token", False, 1.0, False),  # LLaVA-MoLE, Switch-style gate
        ("token", False, 1.0, True),  # LLaVA-MoLE's straight-through
        ("token", True, 0.5, False),
        ("cluster", True, 0.05, False),  # MoCLE
        ("cluster", False, 0.1, True),
    ],
)
@pytest.mark.parametrize("backend", ["reference", "grouped", "segments", "dense"])
def test_mole_and_mocle_equal_a_float64_per_token_reference(
    backend, router_input, universal, temperature, straight_through
):
    torch.manual_seed(0)
    cluster = {"router_input": "cluster", "num_clusters": 3} if router_input == "cluster" else {}
    layer = MoLELinear(
        nn.Linear(6, 5).double(), num_experts=4, rank=2, alpha=3, universal=universal,
        temperature=temperature, straight_through=straight_through, backend=backend, **cluster,
    )  # fmt: skip
    randomize_(layer, seed=3)
    for parameter in layer.base.parameters():
        parameter.requires_grad_(True)  # its gradient is checked too (the layer freezes it)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 6, generator=generator, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([2, 0, 2])
    out = layer(x, cluster_ids=ids if cluster else None)
    token_ids = ids.repeat_interleave(4)
    expected = _reference_mole(
        layer, x.reshape(-1, 6), token_ids, temperature=temperature, straight_through=straight_through
    )
    assert relative_error(out.reshape(-1, 5), expected) < 1e-12
    grad_out = torch.randn(12, 5, generator=generator, dtype=torch.float64)
    params = [x, *layer.parameters()]
    grads = torch.autograd.grad((out.reshape(-1, 5) * grad_out).sum(), params)
    expected_grads = torch.autograd.grad((expected * grad_out).sum(), params, allow_unused=True)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        if expected_grad is None:  # the cluster embeddings of clusters no sample has
            assert torch.all(grad == 0)
        else:
            assert relative_error(grad, expected_grad) < 1e-12


class _ConnectorAndFFN(nn.Module):
    """A connector that only image batches reach, then an MoE FFN (a VLM in miniature)."""

    def __init__(self) -> None:
        super().__init__()
        self.connector = MoEConnector.upcycle(Projector(8, 8), 4, 2, load_balance_coef=0.1)
        self.ffn = MoEFeedForward.from_dense(SwiGLU(8, 12), 4, 2, load_balance_coef=0.01)

    def forward(self, text, image=None):
        return self.ffn(text if image is None else torch.cat([self.connector(image), text]))


def test_a_layer_a_forward_does_not_reach_adds_no_stale_loss():
    torch.manual_seed(0)
    model = _ConnectorAndFFN()
    for image in (torch.randn(2, 8), None):  # an image batch, then a text-only one
        with routing_inputs(model):  # as vlmoe.train wraps every step
            out = model(torch.randn(3, 8), image)
        # The text-only step: the connector's loss of the image step (its graph freed by that
        # step's backward) made this backward fail ("backward through the graph a second time").
        loss = out.sum() + aux_loss(model)
        loss.backward()
    assert model.connector.last_aux_losses == {}
    assert set(aux_losses_by_layer(model)) == {"connector", "ffn"}
    assert aux_losses_by_layer(model)["connector"] == {}
    assert torch.equal(aux_loss(model), model.ffn.last_aux_losses["load_balance"].float())
