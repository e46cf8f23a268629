import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from vlmoe.models import ADAPTERS, adapter_for, tiny


def test_every_family_adapter_finds_its_parts(family):
    model, processor = tiny(family)
    adapter = adapter_for(model)
    assert adapter.name == family
    assert adapter.image_token_id(model) == processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    num_layers = model.config.get_text_config().num_hidden_layers
    assert len(adapter.decoder_layer_list(model)) == num_layers
    for index in range(num_layers):
        mlp = model.get_submodule(adapter.mlp_path(index))
        attention = model.get_submodule(adapter.attention_path(index))
        assert all(hasattr(mlp, name) for name in adapter.mlp_linears)
        assert all(hasattr(attention, name) for name in adapter.attention_linears)
    assert sum(p.numel() for p in model.get_submodule(adapter.projector).parameters()) > 0
    assert sum(p.numel() for p in model.get_submodule(adapter.vision_tower).parameters()) > 0


def test_detection_is_by_config_class_not_name():
    model, _ = tiny("qwen2_vl")
    model.config.name_or_path = "llava-hf/llava-1.5-7b-hf"  # a misleading name changes nothing
    assert adapter_for(model).name == "qwen2_vl"
    assert {a.name for a in ADAPTERS} == {"llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "idefics3"}


def test_unsupported_model_lists_families_and_how_to_add_one():
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(ValueError, match=r"LlamaConfig.*llava \(LlavaConfig\).*families/<name>\.py") as error:
        adapter_for(model)
    assert "qwen2_5_vl" in str(error.value)
