"""forced_expert on a tiny LLaVA with an MoE connector and MoE FFNs."""

import pytest
import torch
from PIL import Image

import vlmoe
from vlmoe.eval.forced import forced_expert
from vlmoe.eval.generate import chat_prompt
from vlmoe.models import tiny


def test_forced_expert_routes_everything_to_one_expert_and_restores():
    model, processor = tiny("llava")
    vlmoe.install_moe_connector(model, init="random", num_experts=4, top_k=2)
    vlmoe.upcycle_ffn(model, num_experts=4, top_k=2)
    inputs = processor(
        text=[chat_prompt(processor, "What is it?", 1)],
        images=[[Image.new("RGB", (28, 28), (9, 99, 0))]],
        return_tensors="pt",
    )
    connector = model.get_submodule("model.multi_modal_projector")
    ffn_routers = [
        m.router for name, m in model.named_modules() if name.endswith("mlp") and hasattr(m, "router")
    ]
    with torch.no_grad():
        routed = model(**inputs).logits
        with forced_expert(model, 1):
            assert connector.router.forced_expert == 1
            assert all(router.forced_expert is None for router in ffn_routers)
            forced_1 = model(**inputs).logits
        with forced_expert(model, 2, where="all"):
            assert all(router.forced_expert == 2 for router in [connector.router, *ffn_routers])
            forced_2 = model(**inputs).logits
        again = model(**inputs).logits
    assert connector.router.forced_expert is None and all(r.forced_expert is None for r in ffn_routers)
    assert torch.equal(routed, again)
    assert not torch.allclose(routed, forced_1) and not torch.allclose(forced_1, forced_2)


def test_forced_expert_errors():
    model, _ = tiny("llava")
    with (
        pytest.raises(ValueError, match=r"has no MoE connector \(use where='all'"),
        forced_expert(model, 0),
    ):
        pass
    vlmoe.install_moe_connector(model, init="upcycle", num_experts=4, top_k=2)
    with pytest.raises(ValueError, match=r"expert must be in \[0, 4\)"), forced_expert(model, 4):
        pass


def test_forced_connector_output_is_that_experts_output():
    model, _ = tiny("llava")
    vlmoe.install_moe_connector(model, init="random", num_experts=4, top_k=2)
    connector = model.get_submodule("model.multi_modal_projector")
    features = torch.randn(2, 16, connector.router.gate.in_features)
    with torch.no_grad():
        for expert in range(4):
            with forced_expert(model, expert):
                forced = connector(features)
            alone = connector.experts.expert_forward(expert, features.reshape(-1, features.shape[-1]))
            torch.testing.assert_close(forced, alone.view_as(forced), rtol=1e-5, atol=1e-6)
