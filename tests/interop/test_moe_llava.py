import json
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlmoe
import vlmoe.interop
from tests.interop.moe_llava_checkpoints import (
    IMAGE_TOKEN,
    MOE_LAYERS,
    NUM_EXPERTS,
    NUM_IMAGE_TOKENS,
    SENTINEL,
    VOCAB,
    reference_logits,
    write_moe_llava,
    write_vision_tower,
)
from tests.interop.tiny_tokenizers import TIKTOKEN_SIZE
from vlmoe.moe import GLUExperts, MLPExperts, MoEFeedForward


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
    return write_vision_tower(tmp_path_factory.mktemp("clip"))


def import_moe_llava(path, tower=None, **options):
    """The model alone (the processor has its own tests)."""
    return vlmoe.interop.import_moe_llava(path, tower, **options)[0]


def _inputs(seed=0, text_tokens=(5, 9), image_token=IMAGE_TOKEN):
    generator = torch.Generator().manual_seed(seed)
    before, after = text_tokens
    ids = torch.randint(0, TIKTOKEN_SIZE, (before + after,), generator=generator).tolist()  # text only
    ours = ids[:before] + [image_token] * NUM_IMAGE_TOKENS + ids[before:]
    theirs = [*ids[:before], SENTINEL, *ids[before:]]
    pixels = torch.randn(1, 3, 28, 28, generator=generator)
    return torch.tensor([ours]), theirs, pixels


def _logits(model, ids, pixels):
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=pixels).logits


@pytest.mark.parametrize("family", ["phi", "qwen1_5", "stablelm", "qwen1"])
def test_logits_equal_their_forward_written_from_the_checkpoint(tmp_path, tower, family):
    tensors = write_moe_llava(tmp_path / "ckpt", family)
    model = import_moe_llava(tmp_path / "ckpt", tower)
    experts = type(model.model.language_model.layers[0].mlp.experts)
    assert experts is (MLPExperts if family == "phi" else GLUExperts)
    ids, their_ids, pixels = _inputs(image_token=model.config.image_token_id)  # tiktoken ones differ
    expected = reference_logits(tensors, family, tower, pixels, their_ids)
    torch.testing.assert_close(_logits(model, ids, pixels), expected, rtol=1e-4, atol=1e-4)


def test_a_siglip_tower_loses_its_first_token_as_in_their_code(tmp_path):
    siglip = write_vision_tower(tmp_path / "siglip", siglip=True)
    tensors = write_moe_llava(tmp_path / "ckpt", "phi")
    model = import_moe_llava(tmp_path / "ckpt", siglip)
    assert model.config.image_seq_length == NUM_IMAGE_TOKENS - 1
    ids, their_ids, pixels = _inputs()
    ids = torch.cat([ids[:, :5], ids[:, 6:]], dim=1)  # one image token fewer
    expected = reference_logits(tensors, "phi", siglip, pixels, their_ids)
    torch.testing.assert_close(_logits(model, ids, pixels), expected, rtol=1e-4, atol=1e-4)


def test_token_dropping_at_a_small_eval_capacity_matches_deepspeed(tmp_path, tower):
    # factor 1.0, top-2 of 4: capacity ceil(T/2) < T, so tokens are dropped; min_capacity applies.
    tensors = write_moe_llava(tmp_path / "ckpt", eval_capacity_factor=1.0, min_capacity=3)
    model = import_moe_llava(tmp_path / "ckpt", tower)
    router = model.model.language_model.layers[0].mlp.router.config
    assert (router.capacity_factor, router.min_capacity, router.top_k) == (1.0, 3, 2)
    ids, their_ids, pixels = _inputs(seed=1)
    expected = reference_logits(
        tensors, "qwen1_5", tower, pixels, their_ids, capacity_factor=1.0, min_capacity=3
    )
    dropped = []
    for layer in MOE_LAYERS:
        model.model.language_model.layers[layer].mlp.record_routing = True
    got = _logits(model, ids, pixels)
    for layer in MOE_LAYERS:
        dropped.append(int((~model.model.language_model.layers[layer].mlp.last_routing.kept).sum()))
    assert sum(dropped) > 0, "the test must exercise dropping"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_top1_checkpoint_weights_by_the_raw_gate(tmp_path, tower):
    tensors = write_moe_llava(tmp_path / "ckpt", top_k=1, eval_capacity_factor=4.0)
    model = import_moe_llava(tmp_path / "ckpt", tower)
    ids, their_ids, pixels = _inputs(seed=2)
    expected = reference_logits(tensors, "qwen1_5", tower, pixels, their_ids, top_k=1, capacity_factor=4.0)
    torch.testing.assert_close(_logits(model, ids, pixels), expected, rtol=1e-4, atol=1e-4)


def test_a_tied_lm_head_is_the_embedding_matrix(tmp_path, tower):
    tensors = write_moe_llava(tmp_path / "ckpt", tie=True)
    assert "lm_head.weight" not in tensors
    model = import_moe_llava(tmp_path / "ckpt", tower)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    ids, their_ids, pixels = _inputs()
    expected = reference_logits(tensors, "qwen1_5", tower, pixels, their_ids, tie=True)
    torch.testing.assert_close(_logits(model, ids, pixels)[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)
    again = vlmoe.load(vlmoe.save(model, tmp_path / "saved"))
    assert torch.equal(_logits(again, ids, pixels), _logits(model, ids, pixels))


def test_every_tensor_lands_where_it_belongs(tmp_path, tower):
    tensors = write_moe_llava(tmp_path / "ckpt", "qwen1_5", file_format="bin", num_shards=3)
    model = import_moe_llava(tmp_path / "ckpt", tower)
    state = model.state_dict()
    lm = "model.language_model."
    for layer in range(3):
        mlp = model.model.language_model.layers[layer].mlp
        assert isinstance(mlp, MoEFeedForward) == (layer in MOE_LAYERS)
    for layer in MOE_LAYERS:
        theirs = f"model.layers.{layer}.mlp.deepspeed_moe."
        assert torch.equal(
            state[f"{lm}layers.{layer}.mlp.router.gate.weight"], tensors[f"{theirs}gate.wg.weight"]
        )
        for j in range(NUM_EXPERTS):
            e = f"{theirs}experts.deepspeed_experts.{j}."
            gate_up = state[f"{lm}layers.{layer}.mlp.experts.gate_up_proj"][j]
            assert torch.equal(
                gate_up, torch.cat([tensors[e + "gate_proj.weight"], tensors[e + "up_proj.weight"]])
            )
            assert torch.equal(
                state[f"{lm}layers.{layer}.mlp.experts.down_proj"][j], tensors[e + "down_proj.weight"]
            )
    assert torch.equal(
        state[f"{lm}layers.1.mlp.up_proj.weight"], tensors["model.layers.1.mlp.up_proj.weight"]
    )
    assert torch.equal(
        state[f"{lm}layers.2.self_attn.q_proj.bias"], tensors["model.layers.2.self_attn.q_proj.bias"]
    )
    projector = "model.mm_projector.image_spatial_proj."
    assert torch.equal(state["model.multi_modal_projector.linear_1.weight"], tensors[projector + "0.weight"])
    assert torch.equal(state["model.multi_modal_projector.linear_2.bias"], tensors[projector + "2.bias"])
    clip = load_file(tower / "model.safetensors")
    for name, tensor in clip.items():
        assert torch.equal(state[f"model.vision_tower.{name}"], tensor)
    assert model.config.image_token_id == IMAGE_TOKEN and model.config.vision_feature_layer == -2


def test_the_image_token_uses_an_unused_row_or_appends_one_zero_row(tmp_path, tower):
    tensors = write_moe_llava(tmp_path / "spare", "phi")
    model = import_moe_llava(tmp_path / "spare", tower)  # tokenizer smaller than the embedding: no resize
    assert model.config.image_token_id == IMAGE_TOKEN and model.config.text_config.vocab_size == VOCAB
    assert torch.equal(model.get_input_embeddings().weight, tensors["model.embed_tokens.weight"])
    tensors = write_moe_llava(tmp_path / "ckpt", "phi", tokenizer_size=VOCAB)  # as Vicuna's: every row used
    model = import_moe_llava(tmp_path / "ckpt", tower)
    assert model.config.image_token_id == VOCAB
    embed = model.get_input_embeddings().weight
    assert embed.shape[0] == VOCAB + 1 and torch.equal(embed[:VOCAB], tensors["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.bias[:VOCAB], tensors["lm_head.bias"])  # Phi's head has a bias
    assert not embed[VOCAB].any() and not model.lm_head.weight[VOCAB].any()
    ids, their_ids, pixels = _inputs()
    ids[ids == IMAGE_TOKEN] = VOCAB
    expected = reference_logits(tensors, "phi", tower, pixels, their_ids)
    torch.testing.assert_close(_logits(model, ids, pixels)[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)


def test_save_load_and_export(tmp_path, tower):
    from transformers import Qwen2MoeForCausalLM

    write_moe_llava(tmp_path / "qwen")
    model = import_moe_llava(tmp_path / "qwen", tower)
    ids, _, pixels = _inputs()
    again = vlmoe.load(vlmoe.save(model, tmp_path / "saved"))
    assert torch.equal(_logits(again, ids, pixels), _logits(model, ids, pixels))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "imported from a published checkpoint" in card and "| source | moe-llava |" in card
    assert "| checkpoint | qwen |" in card and "| layers | [0, 2] |" in card and "| top k | 2 |" in card
    # Qwen1.5 -> Qwen2-MoE (dense layer 1 in mlp_only_layers); text logits equal.
    vlmoe.export_hf(again, tmp_path / "exported")
    stock = Qwen2MoeForCausalLM.from_pretrained(tmp_path / "exported").eval()
    text = torch.tensor([[3, 14, 15, 9, 2, 6]])
    with torch.no_grad():
        torch.testing.assert_close(stock(text).logits, model(input_ids=text).logits, rtol=1e-5, atol=1e-5)
    # Phi-2 has no standard MoE architecture.
    write_moe_llava(tmp_path / "phi", "phi")
    phi = import_moe_llava(tmp_path / "phi", tower)
    with pytest.raises(ValueError, match="'phi', for which transformers has no standard MoE"):
        vlmoe.export_hf(phi, tmp_path / "phi-exported")
    phi_again = vlmoe.load(vlmoe.save(phi, tmp_path / "phi-saved"))
    assert torch.equal(_logits(phi_again, ids, pixels), _logits(phi, ids, pixels))


def _edit_shard(folder, edit):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / sorted(set(index["weight_map"].values()))[0]
    tensors = load_file(shard)
    edit(tensors, index)
    save_file(tensors, shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def test_an_unused_tensor_is_an_error_naming_it(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")

    def add(tensors, index):
        tensors["model.layers.0.mlp.deepspeed_moe.coefficient.weight"] = torch.zeros(2, 32)
        index["weight_map"]["model.layers.0.mlp.deepspeed_moe.coefficient.weight"] = sorted(
            set(index["weight_map"].values())
        )[0]

    _edit_shard(tmp_path / "ckpt", add)
    with pytest.raises(ValueError, match=r"coefficient\.weight.*no place"):
        import_moe_llava(tmp_path / "ckpt", tower)


def test_a_moe_tensor_without_a_layer_index_is_an_error_naming_it(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    name = "model.layers.0.self_attn.mlp.deepspeed_moe.gate.wg.weight"  # no index before the MoE part

    def add(tensors, index):
        tensors[name] = torch.zeros(4, 32)
        index["weight_map"][name] = sorted(set(index["weight_map"].values()))[0]

    _edit_shard(tmp_path / "ckpt", add)
    with pytest.raises(ValueError) as error:
        import_moe_llava(tmp_path / "ckpt", tower)
    assert str(error.value) == (
        f"{tmp_path / 'ckpt'}: tensor {name!r} has a DeepSpeed-MoE part but '0.self_attn' where the layer "
        "index goes; expected model.layers.<index>.mlp.deepspeed_moe.<part>: the weights are not MoE-LLaVA's "
        "or were renamed; fetch them again"
    )


def test_a_missing_tensor_is_an_error_naming_it(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    name = "model.layers.2.mlp.deepspeed_moe.experts.deepspeed_experts.3.up_proj.weight"

    def drop(tensors, index):
        shard = index["weight_map"].pop(name)
        if name in tensors:
            del tensors[name]
        else:  # it lives in the other shard: remove it there
            other = load_file(tmp_path / "ckpt" / shard)
            del other[name]
            save_file(other, tmp_path / "ckpt" / shard)

    _edit_shard(tmp_path / "ckpt", drop)
    with pytest.raises(ValueError, match=r"no tensor 'model\.layers\.2\.mlp.*3\.up_proj\.weight'"):
        import_moe_llava(tmp_path / "ckpt", tower)


def test_truncated_or_mismatched_checkpoints_fail_clearly(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="00002-of-00002.*fetch"):
        import_moe_llava(tmp_path / "ckpt", tower)
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match="incomplete"):
        import_moe_llava(tmp_path / "ckpt", tower)

    write_moe_llava(tmp_path / "wide")
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has shape \((32, 64|64, 32)\) but .* needs \((32, 80|80, 32)\)"):
        import_moe_llava(tmp_path / "wide", tower)


def test_configs_it_cannot_honour_are_refused_with_the_reason(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="--vision-tower"):
        import_moe_llava(tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    original = json.loads(config_file.read_text())
    for change, message in (
        ({"model_type": "moe_llava_minicpm"}, "not a MoE-LLaVA type vlmoe imports"),
        ({"image_projector_type": "qformer2_64"}, "Linear-GELU-Linear"),
        ({"moe": {**original["moe"], "use_residual": True}}, "use_residual"),
        ({"moe": {**original["moe"], "num_experts": [4, 2]}}, "different expert counts"),
        ({"moe": None}, "dense LLaVA"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end is true"),
    ):
        config_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(ValueError, match=message):
            import_moe_llava(tmp_path / "ckpt", tower)


def test_a_damaged_or_foreign_vision_tower_config_names_the_file(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    broken = tmp_path / "broken-clip"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "clip_vision_model",')
    with pytest.raises(ValueError, match=r"broken-clip/config.json is not valid JSON \(line 1, column 36"):
        import_moe_llava(tmp_path / "ckpt", broken)
    for model_type in ("nonsense", "llama", None):
        (broken / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(
            ValueError, match=rf"broken-clip/config.json: model_type {model_type!r}; expected a CLIP"
        ):
            import_moe_llava(tmp_path / "ckpt", broken)


def test_a_config_field_of_the_wrong_type_or_missing_names_the_field(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    write_moe_llava(tmp_path / "qwen1", "qwen1")
    original = {
        folder: json.loads((tmp_path / folder / "config.json").read_text()) for folder in ("ckpt", "qwen1")
    }
    for folder, change, message in (
        ("ckpt", {"moe": {"moe_layers_idx": None}}, r"'moe': moe_layers_idx None must be a list of layer"),
        ("ckpt", {"moe": {"top_k_experts": "two"}}, r"'moe': top_k_experts 'two' must be an integer"),
        ("ckpt", {"moe": {"top_k_experts": 6}}, r"'moe': top_k must be an integer in \[1, num_experts=4\]"),
        ("ckpt", {"moe": {"eval_capacity_factor": None}}, r"'moe': eval_capacity_factor None must be a"),
        ("ckpt", {"vocab_size": "big"}, r": Validation error for field 'vocab_size': TypeError"),
        ("ckpt", {"moe": {"use_residual": "false"}}, r"'moe': use_residual 'false' must be true or false$"),
        ("ckpt", {"moe": {"moe_enable": 1}}, r"'moe': moe_enable 1 must be true or false$"),
        ("ckpt", {"mm_use_im_start_end": "False"}, r": mm_use_im_start_end 'False' must be true or false$"),
        ("ckpt", {"mm_vision_select_feature": ["patch"]}, r": mm_vision_select_feature \['patch'\]; known: "),
        ("qwen1", {"hidden_size": None}, r": 'hidden_size' is missing or not an integer \(None\)"),
    ):
        config = original[folder]
        edited = {**config, **change, "moe": {**config["moe"], **change.get("moe", {})}}
        (tmp_path / folder / "config.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=rf"{folder}/config.json.*{message}") as error:
            import_moe_llava(tmp_path / folder, tower)
        assert "\n" not in str(error.value)
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
    config = original["ckpt"]  # a null flag reads as its default, as their code's truth test does
    edited = {**config, "mm_use_im_patch_token": None, "moe": {**config["moe"], "use_residual": None}}
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(edited))
    assert isinstance(
        import_moe_llava(tmp_path / "ckpt", tower).model.language_model.layers[0].mlp, MoEFeedForward
    )


def test_a_malformed_or_empty_shard_index_names_the_file(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    for weight_map, message in (
        (["model-00001-of-00002.safetensors"], "'weight_map' must map tensor names to shard file names"),
        ({"lm_head.weight": 1}, "'weight_map' must map tensor names to shard file names"),
        ({}, "'weight_map' lists no tensors; fetch it again"),
    ):
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        with pytest.raises(ValueError, match=rf"model.safetensors.index.json: {message}"):
            import_moe_llava(tmp_path / "ckpt", tower)
    index.unlink()
    for shard in (tmp_path / "ckpt").glob("*.safetensors"):
        shard.unlink()
    save_file({}, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ValueError, match=r"ckpt holds no tensors: the weights file is empty; fetch it again"):
        import_moe_llava(tmp_path / "ckpt", tower)


def test_a_vision_select_layer_past_the_tower_is_refused_at_import(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")  # the tiny tower has 3 layers: hidden states -4..3
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    for layer in (4, -5, "-2"):
        config_file.write_text(json.dumps({**config, "mm_vision_select_layer": layer}))
        with pytest.raises(
            ValueError,
            match=rf"mm_vision_select_layer {layer!r} is not one of the vision tower's 4 hidden states",
        ):
            import_moe_llava(tmp_path / "ckpt", tower)
    ids, _, pixels = _inputs()
    for layer in (-4, 3):  # the embeddings and the last layer: both run
        config_file.write_text(json.dumps({**config, "mm_vision_select_layer": layer}))
        model = import_moe_llava(tmp_path / "ckpt", tower)
        assert model.config.vision_feature_layer == layer
        assert _logits(model, ids, pixels).shape == (1, ids.shape[1], model.config.text_config.vocab_size)


def test_a_moe_section_that_does_not_describe_the_weights_names_both(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt")  # DeepSpeed-MoE layers 0 and 2, 4 experts each
    config_file = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_file.read_text())
    for moe, message in (
        (
            {"moe_layers_idx": [0, 1]},
            r"moe_layers_idx \[0, 1\] but the checkpoint has DeepSpeed-MoE layers at \[0, 2\]",
        ),
        (
            {"moe_layers_idx": [0, 9]},
            r"moe_layers_idx \[0, 9\] but the checkpoint has DeepSpeed-MoE layers at \[0, 2\]",
        ),
        (
            {"num_experts": [2, 2]},
            r"num_experts 2 but layer 0 of the checkpoint has experts \['0', '1', '2', '3'\]",
        ),
        (
            {"num_experts": [8, 8]},
            r"num_experts 8 but layer 0 of the checkpoint has experts \['0', '1', '2', '3'\]",
        ),
    ):
        config_file.write_text(json.dumps({**config, "moe": {**config["moe"], **moe}}))
        with pytest.raises(ValueError, match=rf"ckpt/config.json 'moe': {message}: config.json is not this"):
            import_moe_llava(tmp_path / "ckpt", tower)


_EXPERT = "mlp.deepspeed_moe.experts.deepspeed_experts."


@pytest.mark.parametrize(
    ("family", "name", "shape", "needs"),
    [
        ("qwen1_5", f"model.layers.2.{_EXPERT}1.up_proj.weight", (60, 32), (64, 32)),
        ("qwen1_5", f"model.layers.0.{_EXPERT}0.gate_proj.weight", (64, 30), (64, 32)),
        ("qwen1_5", f"model.layers.0.{_EXPERT}3.down_proj.weight", (32, 64, 1), (32, 64)),
        ("phi", f"model.layers.0.{_EXPERT}2.fc1.bias", (60,), (64,)),
    ],
)
def test_one_expert_tensor_of_the_wrong_shape_is_an_error_naming_it(
    tmp_path, tower, family, name, shape, needs
):
    write_moe_llava(tmp_path / "ckpt", family)
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    shard = tmp_path / "ckpt" / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = torch.zeros(shape)  # the other experts keep their shape: torch.stack failed unnamed
    save_file(tensors, shard)
    with pytest.raises(ValueError) as error:
        import_moe_llava(tmp_path / "ckpt", tower)
    assert f"{tmp_path / 'ckpt'}: {name} has shape {shape} but each expert of " in str(error.value)
    assert str(error.value).endswith(f" needs {needs}: the config and the weights do not match")


def test_an_integer_tensor_where_a_weight_goes_is_an_error_naming_it(tmp_path, tower):
    for name in ("model.layers.1.mlp.up_proj.weight", "lm_head.weight"):  # lm_head: the first, read for dtype
        write_moe_llava(tmp_path / "ckpt")
        index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
        shard = tmp_path / "ckpt" / index["weight_map"][name]
        tensors = load_file(shard)
        tensors[name] = tensors[name].to(torch.int64)  # was cast to float without a word
        save_file(tensors, shard)
        with pytest.raises(ValueError) as error:
            import_moe_llava(tmp_path / "ckpt", tower)
        ours = (
            "lm_head.weight" if name == "lm_head.weight" else f"model.language_model.{name[len('model.') :]}"
        )
        assert str(error.value) == (
            f"{tmp_path / 'ckpt'}: {name} is torch.int64 but {ours!r} is torch.float32: the file is damaged "
            "or not this model's weights; fetch it again"
        )
    write_moe_llava(tmp_path / "half")
    for shard in (tmp_path / "half").glob("*.safetensors"):  # a bfloat16 checkpoint is a plain cast
        save_file({k: v.bfloat16() for k, v in load_file(shard).items()}, shard)
    assert import_moe_llava(tmp_path / "half", tower).dtype == torch.bfloat16


def test_a_qwen1_tensor_of_the_wrong_shape_is_named_as_in_the_file(tmp_path, tower):
    write_moe_llava(tmp_path / "ckpt", "qwen1")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    for name, shape, described in (
        ("transformer.h.1.mlp.c_proj.weight", (32, 60), "(read as model.layers.1.mlp.down_proj.weight)"),
        (
            "transformer.h.1.attn.c_attn.weight",
            (90, 32),
            "(its k third, read as model.layers.1.self_attn.k_proj",
        ),
        (
            f"transformer.h.0.{_EXPERT}2.w1.weight",
            (60, 32),
            f"(read as model.layers.0.{_EXPERT}2.up_proj.weight)",
        ),
    ):
        shard = tmp_path / "ckpt" / index["weight_map"][name]
        tensors = load_file(shard)
        original, tensors[name] = tensors[name], torch.zeros(shape)  # errors named the Qwen2 name alone
        save_file(tensors, shard)
        with pytest.raises(ValueError, match=rf"ckpt: {re.escape(name)} {re.escape(described)}.* has shape"):
            import_moe_llava(tmp_path / "ckpt", tower)
        tensors[name] = original
        save_file(tensors, shard)
