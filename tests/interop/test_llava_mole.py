"""LLaVA-MoLE import: tiny checkpoints in their layout (read in forwchen/LLaVA-MoLE `model.py`,
`moe.py`, `llava_mole_infer.py`) and their forward, written here from the checkpoint's tensors."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import vlmoe
import vlmoe.interop
from tests.interop.moe_llava_checkpoints import NUM_IMAGE_TOKENS, VISION, write_vision_tower
from tests.interop.tiny_tokenizers import TRAINED, write_vicuna_tokenizer
from vlmoe.models.mole import MoLEFeedForward

VOCAB, HIDDEN, FFN, LAYERS, EXPERTS, RANK, ALPHA = (
    TRAINED,
    32,
    48,
    2,
    3,
    4,
    8,
)  # vocab = tokenizer, as Vicuna's
LM = "llm_model.base_model.model."


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("mole")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(root / "vicuna")
    write_vicuna_tokenizer(root / "vicuna")
    write_vision_tower(root / "clip")
    return root


def import_llava_mole(checkpoint, base_llm, vision_tower, **options):
    """The model alone (the processor has its own tests)."""
    return vlmoe.interop.import_llava_mole(checkpoint, base_llm, vision_tower, **options)[0]


def _trained_parts(seed=0):
    """What their training changed (LoRA, experts, routers, adaptor): the tensors of their .pt."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(LAYERS):
        layer = f"{LM}model.layers.{i}."
        for proj, (out_f, in_f) in {
            "q_proj": (32, 32),
            "k_proj": (32, 32),
            "v_proj": (32, 32),
            "o_proj": (32, 32),
        }.items():
            state[f"{layer}self_attn.{proj}.lora_A.default.weight"] = (
                torch.randn(RANK, in_f, generator=g) * 0.2
            )
            state[f"{layer}self_attn.{proj}.lora_B.default.weight"] = (
                torch.randn(out_f, RANK, generator=g) * 0.2
            )
        for moe, (out_f, in_f) in {
            "moe_gate": (FFN, HIDDEN),
            "moe_up": (FFN, HIDDEN),
            "moe_down": (HIDDEN, FFN),
        }.items():
            for e in range(EXPERTS):
                state[f"{layer}mlp.{moe}.{e}.lora_A"] = torch.randn(RANK, in_f, generator=g) * 0.2
                state[f"{layer}mlp.{moe}.{e}.lora_B"] = torch.randn(out_f, RANK, generator=g) * 0.2
        state[f"{layer}mlp.router.weight"] = torch.randn(EXPERTS, HIDDEN, generator=g)
        state[f"{layer}mlp.router.bias"] = torch.randn(EXPERTS, generator=g)
    state["in_adaptor.projector.0.weight"] = torch.randn(HIDDEN, VISION["hidden_size"], generator=g) * 0.2
    state["in_adaptor.projector.0.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    state["in_adaptor.projector.2.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g) * 0.2
    state["in_adaptor.projector.2.bias"] = torch.randn(HIDDEN, generator=g) * 0.1
    state["in_adaptor.visual_start_token"] = torch.randn(1, 1, HIDDEN, generator=g)
    state["in_adaptor.visual_end_token"] = torch.randn(1, 1, HIDDEN, generator=g)
    return state


def _full_state(folders, trained, peft_base_layer=True):
    """A whole-model state dict, as `torch.save(model.state_dict())` of MLLM_LLaVA_MoLE gives."""
    base = LlamaForCausalLM.from_pretrained(folders / "vicuna").state_dict()
    state = dict(trained)
    for name, tensor in base.items():
        if ".self_attn." in name and name.endswith("proj.weight"):
            state[LM + (name.replace(".weight", ".base_layer.weight") if peft_base_layer else name)] = tensor
        elif ".mlp." in name:
            state[LM + name.replace(".mlp.", ".mlp.original_module.")] = tensor
        else:
            state[LM + name] = tensor
    state["in_adaptor.text_embed.weight"] = base["model.embed_tokens.weight"]
    tower = CLIPVisionModel.from_pretrained(folders / "clip").state_dict()
    state.update({f"vit.vision_tower.vision_model.{k}": v for k, v in tower.items()})
    return state


class _LoRA(nn.Module):  # PEFT's LoRA on a frozen linear (no dropout at eval)
    def __init__(self, base, a, b):
        super().__init__()
        self.base, self.a, self.b = base, a, b

    def forward(self, x):
        return self.base(x) + (x @ self.a.t() @ self.b.t()) * (ALPHA / RANK)


class _LoRAMoELM(nn.Module):  # their LoRA_MOE_LM.forward, dense_moe or sparse
    def __init__(self, mlp, state, layer, dense):
        super().__init__()
        self.mlp, self.dense = mlp, dense
        p = f"{LM}model.layers.{layer}.mlp."
        self.router_w, self.router_b = state[p + "router.weight"], state[p + "router.bias"]
        self.lora = {
            m: [(state[f"{p}{m}.{e}.lora_A"], state[f"{p}{m}.{e}.lora_B"]) for e in range(EXPERTS)]
            for m in ("moe_gate", "moe_up", "moe_down")
        }

    def _moe(self, x, proj, moe, routing, index):
        out = proj(x)
        per_expert = torch.stack([(x @ a.t() @ b.t()) * (ALPHA / RANK) for a, b in self.lora[moe]], 2)
        if self.dense:
            return out + (per_expert * routing[..., None]).sum(2)
        return out + per_expert.gather(2, index[..., None].expand(*index.shape, out.shape[-1])).squeeze(2)

    def forward(self, x):
        routing = F.softmax(F.linear(x, self.router_w, self.router_b), dim=-1)
        index = routing.max(-1, keepdim=True)[1]
        gate = self._moe(x, self.mlp.gate_proj, "moe_gate", routing, index)
        up = self._moe(x, self.mlp.up_proj, "moe_up", routing, index)
        return self._moe(self.mlp.act_fn(gate) * up, self.mlp.down_proj, "moe_down", routing, index)


def _reference_logits(folders, state, pixels, before, after, dense):
    lm = LlamaForCausalLM.from_pretrained(folders / "vicuna").eval()
    for i, layer in enumerate(lm.model.layers):
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            p = f"{LM}model.layers.{i}.self_attn.{proj}."
            lora = _LoRA(
                getattr(layer.self_attn, proj),
                state[p + "lora_A.default.weight"],
                state[p + "lora_B.default.weight"],
            )
            setattr(layer.self_attn, proj, lora)
        layer.mlp = _LoRAMoELM(layer.mlp, state, i, dense)
    tower = CLIPVisionModel.from_pretrained(folders / "clip").eval()
    with torch.no_grad():
        features = tower(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        features = F.linear(
            F.gelu(
                F.linear(
                    features, state["in_adaptor.projector.0.weight"], state["in_adaptor.projector.0.bias"]
                )
            ),
            state["in_adaptor.projector.2.weight"],
            state["in_adaptor.projector.2.bias"],
        )
        image = torch.cat(
            [state["in_adaptor.visual_start_token"], features, state["in_adaptor.visual_end_token"]], 1
        )
        embeds = torch.cat([lm.model.embed_tokens(before), image, lm.model.embed_tokens(after)], 1)
        return lm(inputs_embeds=embeds).logits


def _our_ids(model, before, after):
    image = [model.config.im_start_token_id] + [model.config.image_token_id] * NUM_IMAGE_TOKENS
    return torch.cat([before, torch.tensor([[*image, model.config.im_end_token_id]]), after], 1)


@pytest.mark.parametrize("routing", ["dense", "sparse"])
def test_logits_equal_their_forward_written_from_the_checkpoint(tmp_path, folders, routing):
    trained = _trained_parts()
    torch.save({"state_dict": trained, "epoch": 3}, tmp_path / "llava_mole.pt")
    model = import_llava_mole(
        tmp_path / "llava_mole.pt", folders / "vicuna", folders / "clip", lora_alpha=ALPHA, routing=routing
    )
    assert isinstance(model.model.language_model.layers[1].mlp, MoLEFeedForward)
    g = torch.Generator().manual_seed(1)
    before, after = torch.randint(0, VOCAB, (1, 4), generator=g), torch.randint(0, VOCAB, (1, 6), generator=g)
    pixels = torch.randn(1, 3, 28, 28, generator=g)
    expected = _reference_logits(folders, trained, pixels, before, after, dense=routing == "dense")
    with torch.no_grad():
        got = model(input_ids=_our_ids(model, before, after), pixel_values=pixels).logits
    torch.testing.assert_close(got[..., :VOCAB], expected, rtol=1e-4, atol=1e-4)
    again = vlmoe.load(vlmoe.save(model, tmp_path / "saved"))
    with torch.no_grad():
        assert torch.equal(again(input_ids=_our_ids(model, before, after), pixel_values=pixels).logits, got)
    with pytest.raises(ValueError, match="routed LoRA experts"):
        vlmoe.export_hf(model, tmp_path / "exported")


@pytest.mark.parametrize("peft_base_layer", [True, False])
def test_a_whole_model_state_dict_uses_every_tensor(tmp_path, folders, peft_base_layer):
    trained = _trained_parts(seed=2)
    full = _full_state(folders, trained, peft_base_layer)
    q_proj = f"{LM}model.layers.0.self_attn.q_proj.{'base_layer.' if peft_base_layer else ''}weight"
    full[q_proj] = full[q_proj] + 1.0  # the checkpoint's copy wins over the base LM's
    torch.save({"state_dict": full}, tmp_path / "full.pt")
    model = import_llava_mole(tmp_path / "full.pt", folders / "vicuna", folders / "clip", lora_alpha=ALPHA)
    state = model.state_dict()
    assert torch.equal(state["model.language_model.layers.0.self_attn.q_proj.base.weight"], full[q_proj])
    p = "model.language_model.layers.1."
    assert torch.equal(
        state[p + "mlp.down_proj.experts.lora_B"][2], trained[f"{LM}model.layers.1.mlp.moe_down.2.lora_B"]
    )
    assert torch.equal(
        state[p + "self_attn.v_proj.universal.lora_A"][0],
        trained[f"{LM}model.layers.1.self_attn.v_proj.lora_A.default.weight"],
    )
    assert torch.equal(state[p + "mlp.router.gate.bias"], trained[f"{LM}model.layers.1.mlp.router.bias"])
    embed = state["model.language_model.embed_tokens.weight"]
    assert torch.equal(embed[VOCAB + 1], trained["in_adaptor.visual_start_token"].flatten())
    assert torch.equal(embed[:VOCAB], full[LM + "model.embed_tokens.weight"])
    assert torch.equal(
        state["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
        full["vit.vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"],
    )


def test_bad_checkpoints_fail_clearly(tmp_path, folders):
    trained = _trained_parts()
    trained["in_adaptor.local_proj.weight"] = torch.zeros(2, 2)
    torch.save({"state_dict": trained}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"local_proj\.weight.*no place"):
        import_llava_mole(tmp_path / "extra.pt", folders / "vicuna", folders / "clip")
    del trained["in_adaptor.local_proj.weight"], trained[f"{LM}model.layers.1.mlp.moe_up.2.lora_B"]
    torch.save({"state_dict": trained}, tmp_path / "missing.pt")
    with pytest.raises(ValueError, match=r"no tensor '.*layers\.1\.mlp\.moe_up\.2\.lora_B'"):
        import_llava_mole(tmp_path / "missing.pt", folders / "vicuna", folders / "clip")
    with pytest.raises(FileNotFoundError, match="Vicuna"):
        import_llava_mole(tmp_path / "missing.pt", tmp_path, folders / "clip")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "missing.pt").read_bytes()[:500])
    with pytest.raises(ValueError, match="cut.pt: not a readable PyTorch checkpoint"):
        import_llava_mole(tmp_path / "cut.pt", folders / "vicuna", folders / "clip")


def test_an_expert_index_that_is_not_a_number_names_the_file_and_the_tensor(tmp_path, folders):
    from typer.testing import CliRunner

    from vlmoe.cli import app

    trained = _trained_parts()
    trained[f"{LM}model.layers.0.mlp.moe_gate.x.lora_A"] = torch.zeros(RANK, HIDDEN)
    torch.save({"state_dict": trained}, tmp_path / "named.pt")
    args = ["import", "llava-mole", str(tmp_path / "named.pt"), str(tmp_path / "out")]
    args += ["--base-llm", str(folders / "vicuna"), "--vision-tower", str(folders / "clip")]
    result = CliRunner().invoke(app, args)
    layer = f"{LM}model.layers.0.mlp.moe_gate."
    assert result.exit_code == 1
    assert result.output == (
        f"vlmoe import llava-mole: {tmp_path / 'named.pt'}: tensor '{layer}x.lora_A' is not "
        f"'{layer}<e>.lora_A' or .lora_B with <e> an expert number 0, 1, ...: not a LLaVA-MoLE "
        "checkpoint, or its keys were renamed\n"
    )


def test_vlmoe_import_llava_mole_command(tmp_path, folders):
    from typer.testing import CliRunner

    from vlmoe.cli import app

    torch.save({"state_dict": _trained_parts()}, tmp_path / "llava_mole.pt")
    args = ["import", "llava-mole", str(tmp_path / "llava_mole.pt"), str(tmp_path / "out")]
    args += ["--base-llm", str(folders / "vicuna"), "--vision-tower", str(folders / "clip")]
    result = CliRunner().invoke(app, [*args, "--lora-alpha", str(ALPHA), "--routing", "sparse"])
    assert result.exit_code == 0, result.output
    loaded = vlmoe.load(tmp_path / "out")
    direct = import_llava_mole(
        tmp_path / "llava_mole.pt", folders / "vicuna", folders / "clip", lora_alpha=ALPHA, routing="sparse"
    )
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, direct(input_ids=ids).logits)
    assert "| straight through | True |" in (tmp_path / "out" / "README.md").read_text()
    result = CliRunner().invoke(app, [*args, "--routing", "soft"])
    assert result.exit_code == 1 and "routing must be 'dense' or 'sparse'" in result.output


def test_a_damaged_or_non_llama_base_llm_config_names_the_file(tmp_path, folders):
    torch.save({"state_dict": _trained_parts()}, tmp_path / "mole.pt")
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"base/config.json is not valid JSON \(line 1, column 24"):
        import_llava_mole(tmp_path / "mole.pt", base, folders / "clip")
    for model_type in ("mistral", "nonsense"):
        (base / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(
            ValueError, match=rf"base/config.json: model_type '{model_type}'; LLaVA-MoLE is built on a Llama"
        ):
            import_llava_mole(tmp_path / "mole.pt", base, folders / "clip")


def _import_refusal(path, trained, folders) -> str:
    """The message of the ValueError that importing `trained`, saved at `path`, raises."""
    torch.save({"state_dict": trained}, path)
    with pytest.raises(ValueError) as error:
        import_llava_mole(path, folders / "vicuna", folders / "clip")
    return str(error.value)


def test_one_expert_of_another_rank_is_an_error_naming_it(tmp_path, folders):
    trained = _trained_parts()
    name = f"{LM}model.layers.1.mlp.moe_up.2.lora_A"
    trained[name] = torch.zeros(RANK - 1, HIDDEN)  # the other experts keep rank 4: torch.stack failed unnamed
    assert _import_refusal(tmp_path / "rank.pt", trained, folders) == (
        f"{tmp_path / 'rank.pt'}: {name} has shape {(RANK - 1, HIDDEN)} but each expert of "
        f"'model.language_model.layers.1.mlp.up_proj.experts.lora_A' needs {(RANK, HIDDEN)}: the config and "
        "the weights do not match"
    )


def test_a_visual_start_or_end_vector_of_another_size_names_it(tmp_path, folders):
    for which, size in (("start", 2 * HIDDEN), ("end", HIDDEN // 2)):
        trained = _trained_parts()
        trained[f"in_adaptor.visual_{which}_token"] = torch.zeros(1, 1, size)  # torch.cat failed unnamed
        assert _import_refusal(tmp_path / "vector.pt", trained, folders) == (
            f"{tmp_path / 'vector.pt'}: in_adaptor.visual_{which}_token has shape (1, 1, {size}) but the "
            f"base LM's hidden size is {HIDDEN}: the checkpoint was trained on another LM; pass that one "
            "as --base-llm"
        )
