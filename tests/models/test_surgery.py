import pytest
import torch
from model_helpers import logits, perturb, tiny_batch
from safetensors.torch import save_file

import vlmoe
from vlmoe.models import read_record, tiny
from vlmoe.models.mole import MoLEFeedForward
from vlmoe.moe import MoEConnector, MoEFeedForward, MoLELinear, record_routing, routing_records

CLUSTERS = torch.tensor([3, 0])

SURGERIES = {
    "upcycle_ffn": lambda m: vlmoe.upcycle_ffn(m, num_experts=4, top_k=2),
    "mole": lambda m: vlmoe.add_mole(m, num_experts=4, rank=4, alpha=8, top_k=1),
    "mocle": lambda m: vlmoe.add_mole(
        m, num_experts=4, rank=4, router="cluster", num_clusters=4, universal=True
    ),
    "connector_upcycle": lambda m: vlmoe.install_moe_connector(m, init="upcycle", num_experts=4, top_k=2),
}


@pytest.mark.parametrize("surgery", SURGERIES)
def test_logits_equal_dense_right_after_surgery(family, tiny_model, surgery):
    model, _, batch = tiny_model
    dense = logits(model, batch)
    SURGERIES[surgery](model)
    after = logits(model, batch, cluster_ids=CLUSTERS if surgery == "mocle" else None)
    torch.testing.assert_close(after, dense, rtol=0, atol=1e-5)


def test_upcycle_layers_every_other_and_list():
    model, _ = tiny("llava")
    vlmoe.upcycle_ffn(model, layers="every_other")
    layers = model.model.language_model.layers
    assert isinstance(layers[0].mlp, MoEFeedForward) and not isinstance(layers[1].mlp, MoEFeedForward)
    assert read_record(model).steps[0].layers == [0]
    model, _ = tiny("llava")
    vlmoe.upcycle_ffn(model, layers=[1])
    layers = model.model.language_model.layers
    assert not isinstance(layers[0].mlp, MoEFeedForward) and isinstance(layers[1].mlp, MoEFeedForward)
    with pytest.raises(ValueError, match=r"indices in \[0, 2\)"):
        vlmoe.upcycle_ffn(tiny("llava")[0], layers=[2])


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        (1, r"got 1; for layer 1 alone pass layers=\[1\]"),
        (None, "got None"),
        ([True], r"got \[True\]"),  # a bool is an int to Python, not a layer index
        ([0, 0], r"layers \[0, 0\] lists layer\(s\) \[0\] more than once"),
        ([1, 0, 1], r"layers \[1, 0, 1\] lists layer\(s\) \[1\] more than once"),
    ],
)
def test_a_layers_value_that_is_no_list_of_distinct_indices_is_refused(layers, message):
    for surgery in (vlmoe.upcycle_ffn, vlmoe.add_mole):
        model, _ = tiny("llava")
        with pytest.raises(ValueError, match=message):
            surgery(model, layers=layers)
        assert read_record(model) is None  # refused before any change


def test_numpy_layer_indices_are_taken_as_ints():
    import numpy as np

    model = vlmoe.upcycle_ffn(tiny("llava")[0], layers=[np.int64(1)])
    assert read_record(model).steps[0].layers == [1] and type(read_record(model).steps[0].layers[0]) is int
    assert isinstance(model.model.language_model.layers[1].mlp, MoEFeedForward)
    # An array of indices too (np.arange(1, 2) == "all" is an array, once an ambiguous-truth error).
    for layers in (np.arange(1, 2), torch.tensor([1])):
        model = vlmoe.upcycle_ffn(tiny("llava")[0], layers=layers)
        assert read_record(model).steps[0].layers == [1]


def test_surgery_twice_is_refused():
    model, _ = tiny("llava")
    vlmoe.upcycle_ffn(model)
    with pytest.raises(ValueError, match="already applied"):
        vlmoe.upcycle_ffn(model)
    vlmoe.install_moe_connector(model)
    with pytest.raises(ValueError, match="already applied"):
        vlmoe.install_moe_connector(model)


def test_mole_on_upcycled_layer_is_refused_but_other_layers_compose():
    model, _ = tiny("llava")
    vlmoe.upcycle_ffn(model, layers=[0])
    with pytest.raises(ValueError, match=r"layers\.0\.mlp is an upcycled MoEFeedForward"):
        vlmoe.add_mole(model)
    assert not any(isinstance(m, MoLELinear) for m in model.modules())  # the refusal changed nothing
    vlmoe.add_mole(model, layers=[1], rank=2)
    assert [step.kind for step in read_record(model).steps] == ["upcycle_ffn", "add_mole"]


def test_mole_that_would_add_no_lora_is_refused_and_later_surgery_still_works():
    model, _ = tiny("llava")
    vlmoe.upcycle_ffn(model, layers=[0])
    with pytest.raises(ValueError, match=r"adds no LoRA to layers \[0\].*Pass attention_lora=True"):
        vlmoe.add_mole(model, num_experts=0, attention_lora=False, layers=[0])
    assert read_record(model).kinds() == ["upcycle_ffn"]  # nothing recorded
    vlmoe.install_moe_connector(model)  # the record still agrees with the modules
    vlmoe.add_mole(model, num_experts=0, attention_lora=False, layers=[0, 1])  # layer 1 gets MLP LoRA
    assert isinstance(model.model.language_model.layers[1].mlp.up_proj, MoLELinear)
    assert read_record(model).kinds() == ["upcycle_ffn", "install_moe_connector", "add_mole"]


def test_mole_one_router_per_mlp_shared_by_its_three_linears():
    model, processor = tiny("llava")
    vlmoe.add_mole(model, num_experts=4, rank=4, top_k=1)
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.mlp, MoLEFeedForward)
    assert all(getattr(layer.mlp, n).router is None for n in ("gate_proj", "up_proj", "down_proj"))
    assert isinstance(layer.self_attn.q_proj, MoLELinear) and layer.self_attn.q_proj.experts is None
    with record_routing(model):
        logits(model, tiny_batch("llava", processor))
    records = routing_records(model)
    assert sorted(records) == [f"model.language_model.layers.{i}.mlp" for i in range(2)]
    assert records["model.language_model.layers.0.mlp"].expert_indices.shape[-1] == 1


def test_mocle_routes_by_cluster_and_needs_cluster_ids():
    model, processor = tiny("llava")
    batch = tiny_batch("llava", processor)
    vlmoe.add_mole(model, num_experts=4, rank=4, router="cluster", num_clusters=4, universal=True)
    perturb(model)
    mlp = model.model.language_model.layers[0].mlp
    assert mlp.gate_proj.universal is not None
    with record_routing(model):
        logits(model, batch, cluster_ids=torch.tensor([2, 2]))
    chosen = routing_records(model)["model.language_model.layers.0.mlp"].expert_indices
    assert chosen.unique().numel() == 1  # one cluster -> one expert for every token
    with pytest.raises(ValueError, match="cluster_ids"):
        logits(model, batch)


def test_connector_init_random_differs_and_aligned_loads_each_projector(tmp_path):
    model, processor = tiny("llava")
    batch = tiny_batch("llava", processor)
    dense = logits(model, batch)
    projector = model.model.multi_modal_projector
    others = [tiny("llava", seed=s)[0].model.multi_modal_projector for s in (1, 2, 3)]
    save_file(others[1].state_dict(), tmp_path / "table.safetensors")
    whole_model = {f"model.multi_modal_projector.{k}": v for k, v in others[2].state_dict().items()}
    vlmoe.install_moe_connector(
        model,
        init="aligned",
        top_k=2,
        projectors=[projector, others[0].state_dict(), tmp_path / "table.safetensors", whole_model],
    )
    connector = model.model.multi_modal_projector
    assert isinstance(connector, MoEConnector) and connector.num_experts == 4
    for expert, source in enumerate([projector, *others]):
        assert torch.equal(connector.experts.fc1_weight[expert], source.linear_1.weight)
        assert torch.equal(connector.experts.fc2_bias[expert], source.linear_2.bias)
    assert read_record(model).steps[0].init == "aligned"
    assert not torch.allclose(logits(model, batch), dense)

    random_model, _ = tiny("llava")
    vlmoe.install_moe_connector(random_model, init="random")
    assert (logits(random_model, batch) - dense).abs().max() > 1e-2


def test_aligned_projector_of_wrong_shape_names_the_tensor():
    model, _ = tiny("llava")
    state = model.model.multi_modal_projector.state_dict()
    state["linear_1.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"projectors\[1\]: tensor 'linear_1.weight' has shape \(3, 3\)"):
        vlmoe.install_moe_connector(
            model, init="aligned", projectors=[model.model.multi_modal_projector, state]
        )
    with pytest.raises(ValueError, match="missing"):
        vlmoe.install_moe_connector(model, init="aligned", projectors=[{"weight": torch.zeros(1)}])
    with pytest.raises(ValueError, match="needs projectors"):
        vlmoe.install_moe_connector(model, init="aligned")


def test_aligned_projector_module_of_another_shape_is_refused_but_a_sequential_of_its_shape_works():
    import copy

    from transformers import LlavaForConditionalGeneration

    model, processor = tiny("llava")
    projector = model.model.multi_modal_projector
    wider = copy.deepcopy(model.config)
    wider.text_config.hidden_size = 64  # a projector trained for a bigger LM
    other = LlavaForConditionalGeneration(wider).model.multi_modal_projector
    with pytest.raises(
        ValueError,
        match=r"projectors\[1\]: LlavaMultiModalProjector has tensors of shapes \[\(64, 32\), \(64,\), "
        r"\(64, 64\), \(64,\)\], the projector model\.multi_modal_projector .* has \[\(32, 32\)",
    ):
        vlmoe.install_moe_connector(model, init="aligned", projectors=[projector, other])
    assert read_record(model) is None and model.model.multi_modal_projector is projector
    sequential = torch.nn.Sequential(
        copy.deepcopy(projector.linear_1), torch.nn.GELU(), copy.deepcopy(projector.linear_2)
    )
    vlmoe.install_moe_connector(model, init="aligned", projectors=[projector, sequential])
    connector = model.model.multi_modal_projector
    assert torch.equal(connector.experts.fc1_weight[1], projector.linear_1.weight)
    assert logits(model, tiny_batch("llava", processor)).isfinite().all()


def test_aligned_projector_modules_in_another_dtype_take_the_models_dtype():
    model, processor = tiny("llava")
    model.to(torch.bfloat16)
    fp32 = tiny("llava", seed=1)[0].model.multi_modal_projector  # trained apart, kept in float32
    vlmoe.install_moe_connector(model, init="aligned", projectors=[fp32, model.model.multi_modal_projector])
    experts = model.model.multi_modal_projector.experts
    assert {p.dtype for p in model.model.multi_modal_projector.parameters()} == {torch.bfloat16}
    assert torch.equal(experts.fc1_weight[0], fp32.linear_1.weight.to(torch.bfloat16))
    assert fp32.linear_1.weight.dtype == torch.float32  # the caller's module is not changed
    batch = {
        k: v.to(torch.bfloat16) if v.is_floating_point() else v
        for k, v in tiny_batch("llava", processor).items()
    }
    assert logits(model, batch).isfinite().all()


def test_aligned_projector_modules_become_copies_of_the_models_projector_and_reload_the_same(tmp_path):
    import copy

    model, processor = tiny("llava")
    projector = model.model.multi_modal_projector
    # Another activation than the model's GELU: the experts were ReLU-MLPs, vlmoe.load made them GELU.
    relu = torch.nn.Sequential(
        copy.deepcopy(projector.linear_1), torch.nn.ReLU(), copy.deepcopy(projector.linear_2)
    )
    vlmoe.install_moe_connector(model, init="aligned", projectors=[relu, projector])
    assert type(model.model.multi_modal_projector.experts.act_fn) is type(projector.act)
    batch = tiny_batch("llava", processor)
    again = vlmoe.load(vlmoe.save(model, tmp_path / "m"))
    assert torch.equal(logits(again, batch), logits(model, batch))


@pytest.mark.parametrize("name", ["table.safetensors", "table.pt"])
def test_a_damaged_projector_checkpoint_is_named_with_the_fix(name, tmp_path):
    model, _ = tiny("llava")
    projector = model.model.multi_modal_projector
    good = tmp_path / f"good{name[5:]}"
    if name.endswith(".pt"):
        torch.save(projector.state_dict(), good)
    else:
        save_file(projector.state_dict(), good)
    data = good.read_bytes()
    for damaged in (data[: len(data) // 2], b"", b"junk"):  # cut short by a copy, empty, not a checkpoint
        (tmp_path / name).write_bytes(damaged)
        with pytest.raises(
            ValueError, match=rf"projector checkpoint {tmp_path / name} cannot be read \(.*\); it is damaged"
        ):
            vlmoe.install_moe_connector(model, init="aligned", projectors=[projector, tmp_path / name])
    torch.save(projector, tmp_path / "module.pt")  # a pickled module, not a state dict
    with pytest.raises(ValueError, match=r"module\.pt cannot be read \(Weights only load failed.*state_dict"):
        vlmoe.install_moe_connector(model, init="aligned", projectors=[projector, tmp_path / "module.pt"])
    assert read_record(model) is None
    vlmoe.install_moe_connector(model, init="aligned", projectors=[projector, good])
    assert torch.equal(model.model.multi_modal_projector.experts.fc2_weight[1], projector.linear_2.weight)


def test_surgered_model_trains_generates_and_reports_aux_loss(family, tiny_model):
    model, _, batch = tiny_model
    torch.manual_seed(0)  # router init
    vlmoe.install_moe_connector(model, init="upcycle")
    vlmoe.upcycle_ffn(model, layers=[0])
    vlmoe.add_mole(model, layers=[1], num_experts=4, rank=4, load_balance_coef=0.01)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    losses = []
    for _ in range(2):
        output = model(**batch, labels=labels)
        loss = output.loss + vlmoe.aux_loss(model)
        losses.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[1] < losses[0]
    assert float(vlmoe.aux_loss(model).detach()) > 0
    model.eval()
    generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == batch["input_ids"].shape[1] + 3


@pytest.mark.parametrize("qwen", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_connector_stacks_the_merger_mlp_as_grouped_experts(qwen):
    from vlmoe.moe import MLPExperts

    model, _ = tiny(qwen)
    merger_mlp = model.model.visual.merger.mlp
    vlmoe.install_moe_connector(model, init="upcycle", num_experts=4)
    experts = model.model.visual.merger.mlp.experts
    assert isinstance(experts, MLPExperts)
    assert torch.equal(experts.fc1_weight[3], merger_mlp[0].weight)
    assert torch.equal(experts.fc2_bias[2], merger_mlp[2].bias)


def test_record_without_the_modules_is_refused():
    import copy

    from transformers import LlavaForConditionalGeneration

    model = vlmoe.upcycle_ffn(tiny("llava")[0])
    dense_with_record = LlavaForConditionalGeneration(copy.deepcopy(model.config))
    with pytest.raises(ValueError, match=r"records surgery \['upcycle_ffn'\] but its modules show \[\]"):
        vlmoe.install_moe_connector(dense_with_record)


def _merge_fixture(router: str):
    model, processor = tiny("llava", seed=0)
    if router == "cluster":  # MoCLE: routed by cluster, plus the universal expert
        vlmoe.add_mole(model, num_experts=4, rank=4, router="cluster", num_clusters=4, universal=True)
    else:  # LLaVA-MoLE: routed by token, plain LoRA on attention
        vlmoe.add_mole(model, num_experts=4, rank=4, alpha=8, top_k=1)
    perturb(model)  # every LoRA B away from zero
    return model, tiny_batch("llava", processor)


@pytest.mark.parametrize("router", ["token", "cluster"])
def test_merge_lora_keeps_logits_and_leaves_only_routed_experts(router, tmp_path):
    model, batch = _merge_fixture(router)
    clusters = CLUSTERS if router == "cluster" else None
    before = logits(model, batch, clusters)
    vlmoe.merge_lora(model)
    wrapped = [m for m in model.modules() if isinstance(m, MoLELinear)]
    assert wrapped and all(m.universal is None for m in wrapped)
    attention = model.model.language_model.layers[0].self_attn.q_proj
    assert attention.experts is None  # plain LoRA gone: the base linear alone
    assert all(m.experts is not None for mlp in model.modules() if isinstance(mlp, MoLEFeedForward)
               for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))  # fmt: skip
    assert not any("universal" in key for key in model.state_dict())
    assert read_record(model).kinds() == ["add_mole", "merge_lora"]
    # float32 weights: W + s B A rounded once, so the logits move by float32 rounding only.
    torch.testing.assert_close(logits(model, batch, clusters), before, rtol=0, atol=1e-5)
    # The record rebuilds the merged layout: the saved weights load into it, bit for bit.
    again = vlmoe.load(vlmoe.save(model, tmp_path / "merged"))
    assert read_record(again) == read_record(model)
    assert torch.equal(logits(again, batch, clusters), logits(model, batch, clusters))


def test_merged_plain_lora_runs_the_base_linear_alone():
    base = torch.nn.Linear(8, 16)
    plain = MoLELinear.plain(base, rank=2, alpha=4)
    torch.nn.init.normal_(plain.universal.lora_B)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    plain.double()
    expected = plain(x)
    reference = base(x) + x @ (plain.universal.delta_weight(0)).t()
    torch.testing.assert_close(expected, reference)
    plain.merge_universal()
    torch.testing.assert_close(plain(x), expected)
    assert torch.equal(plain(x), base(x))


def test_merge_universal_rounds_the_merged_bf16_weight_once():
    torch.manual_seed(0)
    plain = MoLELinear.plain(torch.nn.Linear(64, 32, bias=False), rank=8, alpha=16).to(torch.bfloat16)
    torch.nn.init.normal_(plain.universal.lora_B, std=0.05)
    universal = plain.universal
    exact = (
        plain.base.weight.double()
        + universal.lora_B[0].double() @ universal.lora_A[0].double() * universal.scaling
    )
    plain.merge_universal()
    # Within half a bf16 unit in the last place of each exact entry (one rounding, not two).
    ulp = torch.finfo(torch.bfloat16).eps * exact.abs().clamp_min(2**-126)
    assert ((plain.base.weight.double() - exact).abs() <= ulp).all()


def test_merge_lora_refuses_a_model_without_lora_and_a_second_merge():
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match="no plain or universal LoRA to merge"):
        vlmoe.merge_lora(vlmoe.upcycle_ffn(model))
    model, _ = tiny("llava")
    vlmoe.merge_lora(vlmoe.add_mole(model, num_experts=0, rank=4))
    with pytest.raises(ValueError, match="already applied"):
        vlmoe.merge_lora(model)
    # Other surgeries still see the merged model's record agree with its modules.
    vlmoe.install_moe_connector(model, init="upcycle")
    assert read_record(model).kinds() == ["add_mole", "merge_lora", "install_moe_connector"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 2.0}, "rank is 2.0; expected an integer"),  # was a TypeError from torch.empty
        ({"alpha": "8"}, "alpha is '8'; expected a number"),  # was a TypeError from alpha / rank
        ({"dropout": None}, "dropout is None; expected a number"),
        ({"alpha": 0}, r"alpha must be > 0 \(LoRA scales its output by alpha / rank\), got 0"),
    ],
)
def test_add_mole_names_a_rank_alpha_or_dropout_of_the_wrong_type(kwargs, message):
    model, _ = tiny("llava")
    with pytest.raises(ValueError, match=message):
        vlmoe.add_mole(model, num_experts=2, **kwargs)
    assert read_record(model) is None  # refused before any change
