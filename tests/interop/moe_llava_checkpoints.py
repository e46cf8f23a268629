"""Tiny MoE-LLaVA checkpoints in their on-disk layout, and a reference forward written from their code.

Layout (read in PKU-YuanGroup/MoE-LLaVA `moellava/model/language_model/llava_*_moe.py`,
`llava_arch.py`, `multimodal_projector/builder.py`, and DeepSpeed's `moe/layer.py`):
a causal LM's keys (`model.*`, `lm_head.*`); in each layer of `moe.moe_layers_idx` the MLP is a
DeepSpeed `MoE`: `mlp.deepspeed_moe.gate.wg.weight` [E, D] and
`mlp.deepspeed_moe.experts.deepspeed_experts.{j}.<the dense MLP's keys>`; the projector
`model.mm_projector.image_spatial_proj.{0,2}` (mlp2x_gelu); a flat config.json with the
`moe_llava_<family>` model type and a `moe` dict; shards with an index json. The vision tower is
not in the checkpoint (loaded by hub name) and lives in its own directory here. Tokenizer files
are those each family's checkpoint ships (`tiny_tokenizers.py`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import (
    AutoModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    PhiConfig,
    PhiForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    StableLmConfig,
    StableLmForCausalLM,
)
from transformers.activations import ACT2FN

from tests.interop.tiny_tokenizers import TRAINED, write_gpt2_style, write_preprocessor_config, write_tiktoken

VOCAB = 512  # larger than the tokenizers (Qwen-1's: 299 + 208 specials), as the real embeddings are
IMAGE_TOKEN = TRAINED + 1  # <image>, added after the tokenizer's <|extra_0|>: an unused row
HIDDEN = 32
NUM_LAYERS = 3
MOE_LAYERS = [0, 2]  # their "sparse" mode on 3 layers
NUM_EXPERTS = 4
SENTINEL = -200  # their IMAGE_TOKEN_INDEX
VISION = dict(
    hidden_size=24,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
)
NUM_IMAGE_TOKENS = (28 // 7) ** 2  # "patch": CLIP's class token dropped

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
# Their flat config fields per family (transformers 4.3x names; StableLM is their epoch config).
FAMILIES = {
    "phi": dict(
        model_type="moe_llava_phi",
        flat={**_COMMON, "hidden_act": "gelu_new", "partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5},
        stock=(PhiConfig, PhiForCausalLM, {"partial_rotary_factor": 0.5, "layer_norm_eps": 1e-5}),
    ),
    "qwen1_5": dict(
        model_type="moe_llava_qwen1_5",
        flat={**_COMMON, "hidden_act": "silu", "rms_norm_eps": 1e-6, "use_sliding_window": False},
        stock=(Qwen2Config, Qwen2ForCausalLM, {"rms_norm_eps": 1e-6}),
    ),
    # Qwen-1 (their remote-code QWenConfig names); its reference is a Qwen2 with as many kv heads as heads.
    "qwen1": dict(
        model_type="moe_llava_qwen",
        flat={
            "vocab_size": VOCAB,
            "hidden_size": HIDDEN,
            "intermediate_size": 128,  # Qwen-1 stores twice the MLP width
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": 4,
            "kv_channels": HIDDEN // 4,
            "seq_length": 128,
            "max_position_embeddings": 128,
            "rotary_pct": 1.0,
            "rotary_emb_base": 10000,
            "layer_norm_epsilon": 1e-6,
            "no_bias": True,
            "use_dynamic_ntk": True,
            "use_logn_attn": True,
            "hidden_act": "silu",
        },
        stock=(Qwen2Config, Qwen2ForCausalLM, {"rms_norm_eps": 1e-6, "num_key_value_heads": 4}),
    ),
    "stablelm": dict(
        model_type="moe_llava_stablelm",
        flat={**_COMMON, "hidden_act": "silu", "rope_pct": 0.25, "norm_eps": 1e-5, "use_qkv_bias": True},
        stock=(
            StableLmConfig,
            StableLmForCausalLM,
            {"partial_rotary_factor": 0.25, "layer_norm_eps": 1e-5, "use_qkv_bias": True},
        ),
    ),
}


def dense_lm(family: str, seed: int = 0, tie: bool = False) -> nn.Module:
    """The stock dense causal LM their checkpoint's non-MoE keys come from (random, seeded)."""
    config_class, model_class, extra = FAMILIES[family]["stock"]
    fields = {k: v for k, v in _COMMON.items() if k != "rope_theta"}
    fields.update(extra, tie_word_embeddings=tie)
    config = config_class(**fields, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config.hidden_act = FAMILIES[family]["flat"]["hidden_act"]
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():  # biases and norms are zero/one at init: make them count
        for name, param in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_vision_tower(folder: Path, seed: int = 1, siglip: bool = False) -> Path:
    torch.manual_seed(seed)
    if siglip:
        tower = SiglipVisionModel(SiglipVisionConfig(**VISION)).eval()
    else:
        tower = CLIPVisionModel(CLIPVisionConfig(**VISION)).eval()
    tower.save_pretrained(folder)
    return write_preprocessor_config(folder, VISION["image_size"], siglip)


def write_moe_llava(
    folder: Path,
    family: str = "qwen1_5",
    *,
    eval_capacity_factor: float = 2.0,
    min_capacity: int = 0,
    top_k: int = 2,
    num_shards: int = 2,
    file_format: str = "safetensors",
    seed: int = 0,
    tie: bool = False,
    tokenizer_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Write a tiny MoE-LLaVA checkpoint to `folder`; returns its tensors by name. With `tie`, the
    LM head is the embedding matrix and, as transformers saves it, stored once (no lm_head.weight).
    Phi and Qwen1.5 get their slow-tokenizer files (`tokenizer_size` tokens if given), StableLM and
    Qwen-1 their tiktoken files."""
    folder.mkdir(parents=True, exist_ok=True)
    if family in ("stablelm", "qwen1"):
        write_tiktoken(folder, "arcade100k.tiktoken" if family == "stablelm" else "qwen.tiktoken")
    else:
        write_gpt2_style(folder, "phi" if family == "phi" else "qwen1_5", tokenizer_size)
    dense = dense_lm(family, seed, tie)
    generator = torch.Generator().manual_seed(seed + 100)
    tensors = {}
    for name, tensor in dense.state_dict().items():
        layer = _layer_of(name)
        if (layer in MOE_LAYERS and ".mlp." in name) or (tie and name == "lm_head.weight"):
            continue
        tensors[name] = tensor.clone()
    for layer in MOE_LAYERS:
        prefix = f"model.layers.{layer}.mlp.deepspeed_moe."
        tensors[f"{prefix}gate.wg.weight"] = torch.randn(NUM_EXPERTS, HIDDEN, generator=generator)
        mlp_state = dense.model.layers[layer].mlp.state_dict()
        for j in range(NUM_EXPERTS):
            for key, tensor in mlp_state.items():  # experts differ, as after training
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensors[f"{prefix}experts.deepspeed_experts.{j}.{key}"] = tensor + noise
    for index, shape in ((0, (HIDDEN, VISION["hidden_size"])), (2, (HIDDEN, HIDDEN))):
        prefix = f"model.mm_projector.image_spatial_proj.{index}."
        tensors[prefix + "weight"] = torch.randn(shape, generator=generator) * 0.2
        tensors[prefix + "bias"] = torch.randn(shape[0], generator=generator) * 0.1
    config = {
        **FAMILIES[family]["flat"],
        "tie_word_embeddings": tie,
        "model_type": FAMILIES[family]["model_type"],
        "architectures": [f"EvalMoELLaVA{family.title()}ForCausalLM"],
        "torch_dtype": "float32",
        "mm_image_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": VISION["hidden_size"],
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "image_projector_type": "mlp2x_gelu",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad",
        "use_mm_proj": True,
        "moe": {
            "moe_enable": True,
            "moe_mode": "sparse",
            "moe_layers_idx": MOE_LAYERS,
            "ep_size": 1,
            "num_experts": [NUM_EXPERTS] * len(MOE_LAYERS),
            "top_k_experts": top_k,
            "capacity_factor": 1.5,
            "eval_capacity_factor": eval_capacity_factor,
            "min_capacity": min_capacity,
            "use_residual": False,
            "router_aux_loss_coef": 0.01,
            "train_modules": ["mlp.w1", "mlp.w2", "mlp.c_proj", "wg"],
        },
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    write_shards(folder, _as_qwen1(tensors) if family == "qwen1" else tensors, num_shards, file_format)
    return tensors


def _as_qwen1(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same weights under Qwen-1's names (`transformer.h.{i}`, fused c_attn, w1/w2/c_proj)."""
    renames = (
        (r"^model\.embed_tokens\.", "transformer.wte."),
        (r"^model\.norm\.", "transformer.ln_f."),
        (r"^model\.layers\.(\d+)\.input_layernorm\.", r"transformer.h.\1.ln_1."),
        (r"^model\.layers\.(\d+)\.post_attention_layernorm\.", r"transformer.h.\1.ln_2."),
        (r"^model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.h.\1.attn.c_proj."),
        (r"^model\.layers\.(\d+)\.mlp\.(.*)gate_proj\.", r"transformer.h.\1.mlp.\2w2."),
        (r"^model\.layers\.(\d+)\.mlp\.(.*)up_proj\.", r"transformer.h.\1.mlp.\2w1."),
        (r"^model\.layers\.(\d+)\.mlp\.(.*)down_proj\.", r"transformer.h.\1.mlp.\2c_proj."),
        (r"^model\.", "transformer."),
    )
    out = {}
    for name, tensor in tensors.items():
        if ".self_attn.q_proj." in name:
            leaf = name.rsplit(".", 1)[1]
            parts = [tensors[name.replace("q_proj", proj)] for proj in ("q_proj", "k_proj", "v_proj")]
            out[f"transformer.h.{_layer_of(name)}.attn.c_attn.{leaf}"] = torch.cat(parts)
            continue
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        for pattern, replacement in renames:
            renamed, count = re.subn(pattern, replacement, name)
            if count:
                out[renamed] = tensor
                break
        else:
            out[name] = tensor  # lm_head
    return out


def write_shards(folder: Path, tensors: dict[str, torch.Tensor], num_shards: int, file_format: str) -> None:
    names = sorted(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    suffix = "safetensors" if file_format == "safetensors" else "bin"
    stem = "model" if file_format == "safetensors" else "pytorch_model"
    weight_map = {}
    for shard in range(num_shards):
        file_name = f"{stem}-{shard + 1:05d}-of-{num_shards:05d}.{suffix}"
        part = {
            name: tensors[name].contiguous() for name in names[shard * per_shard : (shard + 1) * per_shard]
        }
        if file_format == "safetensors":
            save_file(part, folder / file_name, metadata={"format": "pt"})
        else:
            torch.save(part, folder / file_name)
        weight_map.update(dict.fromkeys(part, file_name))
    index = {
        "metadata": {"total_size": sum(t.numel() * 4 for t in tensors.values())},
        "weight_map": weight_map,
    }
    (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps(index, indent=2))


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


class DeepSpeedMoEReference(nn.Module):
    """DeepSpeed-MoE's top-k gating at eval, written from their code, with the 2nd choice's Gumbel
    noise removed (vlmoe's documented difference): softmax; first choice argmax; second choice
    argmax of the rest; capacity max(min_capacity, ceil(T / E * factor * k)), first choices queue
    before second choices; the kept gates renormalised by their sum (top-2) or used raw (top-1)."""

    def __init__(self, tensors, prefix, family, top_k, capacity_factor, min_capacity):
        super().__init__()
        self.wg = tensors[f"{prefix}gate.wg.weight"]
        self.experts = [
            {
                k[len(f"{prefix}experts.deepspeed_experts.{j}.") :]: v
                for k, v in tensors.items()
                if k.startswith(f"{prefix}experts.deepspeed_experts.{j}.")
            }
            for j in range(self.wg.shape[0])
        ]
        self.act = ACT2FN[FAMILIES[family]["flat"]["hidden_act"]]
        self.top_k, self.capacity_factor, self.min_capacity = top_k, capacity_factor, min_capacity

    def expert(self, j, x):
        w = self.experts[j]
        if "fc1.weight" in w:
            return F.linear(
                self.act(F.linear(x, w["fc1.weight"], w["fc1.bias"])), w["fc2.weight"], w["fc2.bias"]
            )
        hidden = self.act(F.linear(x, w["gate_proj.weight"])) * F.linear(x, w["up_proj.weight"])
        return F.linear(hidden, w["down_proj.weight"])

    def forward(self, hidden_states):
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        gates = torch.softmax(F.linear(x.float(), self.wg.float()), dim=1)  # [T, E]
        num_tokens, num_experts = gates.shape
        capacity = max(
            self.min_capacity, math.ceil(num_tokens / num_experts * self.capacity_factor * self.top_k)
        )
        mask1 = F.one_hot(gates.argmax(dim=1), num_experts)
        masks = [mask1]
        if self.top_k == 2:
            masks.append(F.one_hot(gates.masked_fill(mask1.bool(), float("-inf")).argmax(dim=1), num_experts))
        locations1 = torch.cumsum(mask1, dim=0) - 1
        kept = [mask1 * (locations1 < capacity)]
        if self.top_k == 2:
            locations2 = torch.cumsum(masks[1], dim=0) - 1 + mask1.sum(dim=0, keepdim=True)
            kept.append(masks[1] * (locations2 < capacity))
        weights = [(gates * m).sum(dim=1) for m in kept]  # [T] each
        if self.top_k == 2:
            denom = (weights[0] + weights[1]).clamp(min=torch.finfo(gates.dtype).eps)
            weights = [w / denom for w in weights]
        out = torch.zeros_like(x)
        for m, w in zip(kept, weights, strict=True):
            for j in range(num_experts):
                rows = m[:, j].bool()
                if rows.any():
                    out[rows] += w[rows, None].to(x.dtype) * self.expert(j, x[rows])
        return out.view(shape)


def reference_logits(
    tensors,
    family,
    tower_dir,
    pixel_values,
    ids_with_sentinel,
    top_k=2,
    capacity_factor=2.0,
    min_capacity=0,
    tie=False,
):
    """Their forward, from the checkpoint's tensors: tower -> projector -> splice at the sentinel ->
    the dense LM whose MoE layers are `DeepSpeedMoEReference`."""
    lm = dense_lm(family, tie=tie)
    dense_keys = {k: v for k, v in tensors.items() if k in lm.state_dict()}
    lm.load_state_dict(dense_keys, strict=False)
    for layer in MOE_LAYERS:
        prefix = f"model.layers.{layer}.mlp.deepspeed_moe."
        lm.model.layers[layer].mlp = DeepSpeedMoEReference(
            tensors, prefix, family, top_k, capacity_factor, min_capacity
        )
    tower = AutoModel.from_pretrained(tower_dir).eval()  # CLIP or SigLIP vision model
    with torch.no_grad():
        # "patch" drops the first token, for SigLIP too (which has no class token)
        features = tower(pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        p = "model.mm_projector.image_spatial_proj."
        features = F.linear(
            F.gelu(F.linear(features, tensors[p + "0.weight"], tensors[p + "0.bias"])),
            tensors[p + "2.weight"],
            tensors[p + "2.bias"],
        )
        where = ids_with_sentinel.index(SENTINEL)
        before = lm.model.embed_tokens(torch.tensor([ids_with_sentinel[:where]]))
        after = lm.model.embed_tokens(torch.tensor([ids_with_sentinel[where + 1 :]]))
        embeds = torch.cat([before, features, after], dim=1)
        return lm(inputs_embeds=embeds).logits
