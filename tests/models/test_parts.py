import pytest

import vlmoe
from vlmoe.models import parameter_parts, parameter_report, set_trainable, tiny, unfreeze

# The tiny LLaVA: LM hidden 32, MLP 64, 4 query heads and 2 KV heads of size 8, 2 layers.
DENSE_TOTAL = 75_968
MLP_PARAMS = 3 * 32 * 64  # gate, up, down


def test_dense_report_by_part():
    report = parameter_report(tiny("llava")[0])
    assert report.total == report.trainable == report.active_per_token == DENSE_TOTAL
    assert report.by_part == {"vision_tower": 22_496, "connector": 2_112, "lm": 51_360}


def test_upcycled_report_counts_k_of_e_experts_as_active():
    model = vlmoe.upcycle_ffn(tiny("llava")[0], num_experts=4, top_k=2)
    report = parameter_report(model)
    experts = 2 * 4 * MLP_PARAMS
    routers = 2 * 4 * 32
    assert report.by_part["experts"] == experts and report.by_part["router"] == routers
    assert report.total == DENSE_TOTAL - 2 * MLP_PARAMS + experts + routers
    assert report.active_per_token == report.total - experts // 2


def test_mole_report_counts_lora_and_frozen_bases():
    model = vlmoe.add_mole(tiny("llava")[0], num_experts=4, rank=4, alpha=8, top_k=1)
    report = parameter_report(model)
    # Per layer: 3 MLP linears x 4 experts x rank 4 x (in + out) + attention LoRA (q, o: 32+32; k, v: 32+16).
    mlp_lora = 3 * 4 * 4 * (32 + 64)
    attention_lora = 4 * (2 * (32 + 32) + 2 * (32 + 16))
    assert report.by_part["lora"] == 2 * (mlp_lora + attention_lora)
    frozen_bases = 2 * (MLP_PARAMS + 2 * 32 * 32 + 2 * 32 * 16)
    assert report.trainable == report.total - frozen_bases
    assert report.active_per_token == report.total - 2 * mlp_lora * 3 // 4


def test_set_trainable_freezes_everything_else():
    model = vlmoe.install_moe_connector(vlmoe.upcycle_ffn(tiny("llava")[0]))
    set_trainable(model, "experts", "router")
    parts = parameter_parts(model)
    trainable = {parts[n] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"experts", "router"}  # the connector's experts and router included
    assert parameter_report(model).trainable == sum(
        p.numel() for n, p in model.named_parameters() if parts[n] in ("experts", "router")
    )
    unfreeze(model, "vision_tower")
    assert all(p.requires_grad for n, p in model.named_parameters() if parts[n] == "vision_tower")
    with pytest.raises(ValueError, match="unknown part"):
        set_trainable(model, "decoder")


def test_llava_next_image_newline_belongs_to_the_connector():
    parts = parameter_parts(tiny("llava_next")[0])
    assert parts["model.image_newline"] == "connector"
