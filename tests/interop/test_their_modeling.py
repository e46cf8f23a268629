"""StableLM and Qwen-1 conversions checked against MoE-LLaVA's own model code, when a checkout of it is
given: VLMOE_MOE_LLAVA_SRC=/path/to/MoE-LLaVA (their code is read from there, never copied here; Qwen-1's
also needs `einops`). Without it these tests skip: the other interop tests use stock reference models.

Their `stablelm_epoch` and remote-code `QWenLMHeadModel` (random, seeded) against the stock class
vlmoe builds from their config through the importer's config mapping and (Qwen-1) tensor renaming.
"""

import importlib
import os
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, StableLmForCausalLM

from vlmoe.interop.moe_llava import _text_config
from vlmoe.interop.qwen1 import Qwen1Tensors, qwen2_fields
from vlmoe.interop.tensors import CheckpointTensors

SOURCE = os.environ.get("VLMOE_MOE_LLAVA_SRC")
pytestmark = pytest.mark.skipif(SOURCE is None, reason="set VLMOE_MOE_LLAVA_SRC to a MoE-LLaVA checkout")


def _their_module(family: str, module: str):
    """moellava/model/language_model/<family>/<module>.py as a module of a package of its folder (their
    files import each other relatively; importing `moellava` itself would pull in DeepSpeed)."""
    package = f"_moe_llava_{family}"
    if package not in sys.modules:
        namespace = types.ModuleType(package)
        namespace.__path__ = [str(Path(SOURCE) / "moellava" / "model" / "language_model" / family)]
        sys.modules[package] = namespace
    return importlib.import_module(f"{package}.{module}")


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():  # biases and norms start at 0 / 1: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name or ".ln" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def test_stablelm_equals_their_stablelm_epoch_model():
    config_module = _their_module("stablelm", "configuration_stablelm_epoch")
    modeling = _their_module("stablelm", "modeling_stablelm_epoch")
    config = config_module.StableLMEpochConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_pct=0.25,
        norm_eps=1e-5,
        use_qkv_bias=True,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    config._attn_implementation, config.pad_token_id = "eager", None  # transformers 5 no longer defaults it
    torch.manual_seed(0)
    theirs = _perturbed(modeling.StableLMEpochForCausalLM(config))
    ours_config = _text_config({**config.to_dict(), "model_type": "moe_llava_stablelm"}, Path("config.json"))
    ours_config._attn_implementation = "eager"
    ours = StableLmForCausalLM(ours_config).eval()
    assert not ours.load_state_dict(theirs.state_dict(), strict=False).missing_keys
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    with torch.no_grad():
        expected = theirs(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:, 5:], expected[:, 5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seq_length", [128, 24])
def test_qwen1_equals_their_qwen_model_within_seq_length(tmp_path, monkeypatch, seq_length):
    pytest.importorskip("einops")  # their rotary embedding needs it
    config_module = _their_module("qwen", "configuration_qwen")
    modeling = _their_module("qwen", "modeling_qwen")
    # transformers 5 dropped PreTrainedModel.get_head_mask; with no head mask it returned a None per layer.
    monkeypatch.setattr(modeling.QWenModel, "get_head_mask", lambda self, mask, n: [None] * n, raising=False)
    config = config_module.QWenConfig(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        kv_channels=16,
        intermediate_size=192,
        seq_length=seq_length,
        max_position_embeddings=128,
        use_flash_attn=False,
        fp32=True,
        bf16=False,
        fp16=False,
        use_dynamic_ntk=True,
        use_logn_attn=True,
    )
    torch.manual_seed(0)
    theirs = _perturbed(modeling.QWenLMHeadModel(config))
    save_file({k: v.contiguous() for k, v in theirs.state_dict().items()}, tmp_path / "model.safetensors")
    tensors = Qwen1Tensors(CheckpointTensors(tmp_path))
    ours_config = Qwen2Config(**qwen2_fields(config.to_dict(), "config.json"))
    ours_config._attn_implementation = "eager"
    ours = Qwen2ForCausalLM(ours_config).eval()
    state = {name: tensors.take(name) for name in tensors.names() if not name.endswith("inv_freq")}
    assert not ours.load_state_dict(state, strict=False).missing_keys and not tensors.unused()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        difference = (ours(ids).logits - theirs(ids).logits).abs().max().item()
    if seq_length >= ids.shape[1]:
        assert difference < 1e-5
    else:  # longer than seq_length: their dynamic NTK (which rescales every position's rotary base) and
        assert difference > 1e-4  # log-n attention scaling start, neither reproduced by vlmoe (README)
