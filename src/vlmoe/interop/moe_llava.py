"""Import a MoE-LLaVA checkpoint (PKU-YuanGroup/MoE-LLaVA) into a vlmoe model on stock transformers.

Their checkpoint is a causal LM (`moe_llava_<family>` model type) whose chosen layers' MLPs are
DeepSpeed-MoE layers, plus a LLaVA projector; the vision tower is loaded by hub name. Here it
becomes a `LlavaForConditionalGeneration` with the matching stock text config, the tower from a
local directory, the projector as LLaVA's `multi_modal_projector`, and each DeepSpeed-MoE layer as
a `MoEFeedForward` (recorded as `upcycle_ffn`, so `vlmoe.save` / `vlmoe.load` / `export_hf` work).

Key map (theirs -> ours, `LM` = `model.language_model`):
    model.{embed_tokens,layers,norm,final_layernorm}.*      -> LM.*
    model.layers.{i}.mlp.deepspeed_moe.gate.wg.weight         -> LM.layers.{i}.mlp.router.gate.weight
    ...deepspeed_moe.experts.deepspeed_experts.{j}.gate_proj/up_proj/down_proj.weight
                                                              -> ...mlp.experts.gate_up_proj[j], down_proj[j]
    ...deepspeed_moe.experts.deepspeed_experts.{j}.fc1/fc2.{weight,bias}
                                                              -> ...mlp.experts.fc{1,2}_{weight,bias}[j]
    model.mm_projector.image_spatial_proj.{0,2}.*             -> model.multi_modal_projector.linear_{1,2}.*
    model.image_tower.image_tower.vision_model.* (if present) -> model.vision_tower.vision_model.*
    lm_head.*                                                 -> lm_head.*
MoE-LLaVA-Qwen (Qwen-1, `transformer.h.{i}...`) is first renamed to these Qwen1.5 names (`qwen1.py`).
The processor (`processor.py`) takes the checkpoint's tokenizer, the tower's preprocessor_config.json
and the conversation format of the family's training script.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import StrictDataclassError
from torch import nn
from transformers import CONFIG_MAPPING, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.llava.processing_llava import LlavaProcessor

from vlmoe.interop.processor import (
    add_image_token,
    image_processor_for,
    llava_processor,
    read_tokenizer,
)
from vlmoe.interop.processor import conversation as conversation_format
from vlmoe.interop.qwen1 import Qwen1Tensors, qwen2_fields
from vlmoe.interop.tensors import CheckpointTensors, TargetState, load_checked
from vlmoe.interop.vision import DERIVED, VISION_PREFIX, map_tower, read_vision_tower
from vlmoe.models.checkpoint import add_lm_head_bias, read_config
from vlmoe.models.record import ImportCheckpoint, append_step
from vlmoe.models.surgery import upcycle_ffn
from vlmoe.moe import GLUExperts, MLPExperts, MoEFeedForward

# Their model type -> (stock text model type, renames of their config fields to the stock ones).
TEXT_FAMILIES: dict[str, tuple[str, dict[str, str]]] = {
    "moe_llava_phi": ("phi", {}),
    "moe_llava_stablelm": ("stablelm", {"rope_pct": "partial_rotary_factor", "norm_eps": "layer_norm_eps"}),
    "moe_llava_qwen1_5": ("qwen2", {}),
    "moe_llava_qwen": ("qwen2", {}),  # Qwen-1, read as Qwen2 (see vlmoe.interop.qwen1)
    "moe_llava_llama": ("llama", {}),
    "moe_llava_mistral": ("mistral", {}),
}
# The chat format of their training scripts' `--version` per family (scripts/v1/*/finetune_moe.sh;
# LLaMA/Vicuna bases use "v1"; OpenChat bases "openchat", give conversation="openchat").
CONVERSATION_OF = {
    "moe_llava_phi": "phi",
    "moe_llava_stablelm": "stablelm",
    "moe_llava_qwen1_5": "qwen",
    "moe_llava_qwen": "qwen",
    "moe_llava_llama": "v1",
    "moe_llava_mistral": "mistral",
}
_LEGACY_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "rope_scaling")
_THEIR_LM = "model."
_OUR_LM = "model.language_model."
_MOE = ".mlp.deepspeed_moe."
_PROJECTOR = {
    "model.mm_projector.image_spatial_proj.0.": "model.multi_modal_projector.linear_1.",
    "model.mm_projector.image_spatial_proj.2.": "model.multi_modal_projector.linear_2.",
}
_THEIR_TOWER = "model.image_tower.image_tower."


def import_moe_llava(
    path: str | os.PathLike,
    vision_tower: str | os.PathLike | None = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    image_token_id: int | None = None,
    conversation: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, LlavaProcessor]:
    """(model, processor) from a local MoE-LLaVA checkpoint directory: a vlmoe
    `LlavaForConditionalGeneration` and a `LlavaProcessor` that prompts it as it was trained.

    `vision_tower` is a local CLIP/SigLIP directory (their checkpoints name the tower on the hub;
    its weights are taken from the checkpoint when it has them) with its preprocessor_config.json.
    `tokenizer` is the directory of the tokenizer files when they are not in `path`. The image
    token: the tokenizer's `<image>` if it has one, else `<image>` added at id `len(tokenizer)`,
    which is an unused embedding row when the embedding is larger than the tokenizer (Phi-2,
    Qwen, StableLM: nothing resized) or one appended row with zero embedding and LM-head row
    when it is not (Vicuna, Mistral); `image_token_id` may instead name one of the tokenizer's
    unused special tokens. `conversation` overrides the chat format their `--version` used for the
    family (see `CONVERSATIONS`). `dtype` defaults to the checkpoint's.

    Example:
        >>> model, processor = import_moe_llava(  # doctest: +SKIP
        ...     "MoE-LLaVA-Phi2-2.7B-4e", "clip-vit-large-patch14-336"
        ... )
    """
    path = Path(path)
    config = _read_config(path)
    moe = _moe_settings(config, path)
    chat = CONVERSATION_OF[config["model_type"]] if conversation is None else conversation
    chat_format = conversation_format(chat)
    if tokenizer is None:
        tokens = read_tokenizer(path, "the checkpoint")
    else:
        tokens = read_tokenizer(tokenizer, "the --tokenizer folder")
    tensors = CheckpointTensors(path)
    if config["model_type"] == "moe_llava_qwen":
        tensors = Qwen1Tensors(tensors)
    _check_moe_layout(tensors, moe, path)
    if dtype is None:
        dtype = tensors.dtype()
    vision_config, tower = read_vision_tower(vision_tower, config.get("mm_image_tower"))
    image_processor = image_processor_for(
        vision_tower, vision_config, config.get("image_aspect_ratio") == "pad"
    )
    text_config = _text_config(config, path)
    image_token, image_token_id = add_image_token(tokens, image_token_id, text_config.vocab_size, str(path))
    grow_vocab = image_token_id == text_config.vocab_size
    if grow_vocab:
        text_config.vocab_size += 1
    strategy = _select_strategy(config.get("mm_vision_select_feature", "patch"), path)
    llava_config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=_num_patches(vision_config, config),
        projector_hidden_act="gelu",  # their mlp2x_gelu is Linear, nn.GELU() (exact), Linear
        vision_feature_layer=_select_layer(config, vision_config, path),
        vision_feature_select_strategy=strategy,
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
    )
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(llava_config, dtype=dtype)
    model.tie_weights()  # skipped with the init; a tied head is then expected once
    lm_head_bias = "lm_head.bias" in tensors
    if lm_head_bias:
        add_lm_head_bias(model)
    append_step(model, "llava", ImportCheckpoint("moe-llava", lm_head_bias, checkpoint=path.name))
    try:
        upcycle_ffn(
            model,
            moe["num_experts"],
            moe["top_k"],
            moe["layers"],
            load_balance_coef=moe["load_balance_coef"],
            capacity_factor=moe["capacity_factor"],
            min_capacity=moe["min_capacity"],
            load_balance_first_choice=True,
        )
    except ValueError as error:  # e.g. a layer index past the LM's layers: the 'moe' section is wrong
        raise ValueError(f"{path}/config.json 'moe': {error}") from None
    target = TargetState(model, str(path))
    _map_language_model(model, tensors, target, grow_vocab)
    map_tower(tensors, _THEIR_TOWER + VISION_PREFIX, tower, target)
    for theirs, ours in _PROJECTOR.items():
        for leaf in ("weight", "bias"):
            target.set(f"{ours}{leaf}", tensors.take(f"{theirs}{leaf}"), tensors.describe(f"{theirs}{leaf}"))
    processor = llava_processor(tokens, image_processor, vision_config, strategy, chat_format, image_token)
    return load_checked(model, tensors, target, DERIVED), processor


def _read_config(path: Path) -> dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a MoE-LLaVA checkpoint directory: it has no config.json")
    config = read_config(path)
    model_type = config.get("model_type")
    if model_type not in TEXT_FAMILIES:
        raise ValueError(
            f"{config_file}: model_type {model_type!r} is not a MoE-LLaVA type vlmoe imports; "
            f"supported: {sorted(TEXT_FAMILIES)}"
        )
    projector = config.get("image_projector_type", "linear")  # their builder's default
    if projector != "mlp2x_gelu":
        raise ValueError(
            f"{config_file}: image_projector_type {projector!r}; LLaVA's projector (and so this importer) "
            "is Linear-GELU-Linear, their 'mlp2x_gelu', the one the released models use"
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if _field(config, flag, False, bool, str(config_file)):  # the released models train without them
            raise ValueError(
                f"{config_file}: {flag} is true: the prompt would need their <im_start>/<im_patch> tokens "
                "around the image, which the imported processor does not write; such checkpoints are refused"
            )
    return config


def _moe_settings(config: dict[str, Any], path: Path) -> dict[str, Any]:
    where = f"{path}/config.json 'moe'"
    moe = config.get("moe")
    if not isinstance(moe, dict):
        raise ValueError(f"{path}/config.json has no 'moe' section: this is a dense LLaVA, not MoE-LLaVA")
    for key in ("moe_layers_idx", "num_experts", "top_k_experts"):
        if key not in moe:
            raise ValueError(f"{where}: missing {key!r}")
    if not _field(moe, "moe_enable", True, bool, where):
        raise ValueError(f"{where}: moe_enable is false, so the checkpoint has no experts")
    if _field(moe, "use_residual", False, bool, where):
        raise ValueError(
            f"{where}: use_residual=true (DeepSpeed's residual MoE: a dense MLP mixed in by a learned "
            "coefficient) has no vlmoe layer; it is not imported"
        )
    layers, counts = moe["moe_layers_idx"], moe["num_experts"]
    if not isinstance(layers, list) or not all(_is_int(i) for i in layers):
        raise ValueError(f"{where}: moe_layers_idx {layers!r} must be a list of layer indices")
    counts = counts * len(layers) if isinstance(counts, list) and len(counts) == 1 else counts
    if not isinstance(counts, list) or len(counts) != len(layers) or not all(_is_int(c) for c in counts):
        raise ValueError(f"{where}: num_experts {moe['num_experts']!r} needs one entry per layer of {layers}")
    if len(set(counts)) != 1:
        raise ValueError(f"{where}: layers have different expert counts {counts}; vlmoe needs one count")
    num_experts, top_k = counts[0], _field(moe, "top_k_experts", None, int, where)
    # Their model runs in eval mode with eval_capacity_factor. DeepSpeed's capacity per expert is
    # max(min_capacity, ceil(T / E * factor * k)) slots for T tokens; when factor * k / E >= 1 it is
    # >= T, which no expert can exceed (a token's k slots go to k different experts): dropless, so
    # exactly equal to no capacity at all (and exportable).
    factor = _field(moe, "eval_capacity_factor", 1.0, float, where)
    capacity_factor = None if _dropless(factor, top_k, num_experts) else factor
    return {
        "layers": layers,
        "num_experts": num_experts,
        "top_k": top_k,
        "capacity_factor": capacity_factor,
        "min_capacity": _field(moe, "min_capacity", 0, int, where),
        "load_balance_coef": _field(moe, "router_aux_loss_coef", 0.01, float, where),
    }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _field(moe: dict[str, Any], key: str, default: Any, kind: type, where: str) -> Any:
    """moe[key] (or `default` when absent) as `kind`; a value of another type names the field
    (a flag written "false" is a true string; a null flag is its default, as their code reads it)."""
    value = moe.get(key, default)
    if kind is bool:
        if value is None or isinstance(value, bool):
            return default if value is None else value
        raise ValueError(f"{where}: {key} {value!r} must be true or false")
    if _is_int(value) or (kind is float and isinstance(value, float)):
        return kind(value)
    raise ValueError(f"{where}: {key} {value!r} must be {'an integer' if kind is int else 'a number'}")


def _text_config(config: dict[str, Any], path: Path):
    stock_type, renames = TEXT_FAMILIES[config["model_type"]]
    config_class = CONFIG_MAPPING[stock_type]
    if config["model_type"] == "moe_llava_qwen":
        fields = qwen2_fields(config, f"{path}/config.json")
    else:
        known = set(config_class().to_dict()) | set(_LEGACY_ROPE_KEYS)
        fields = {renames.get(key, key): value for key, value in config.items()}
        fields = {key: value for key, value in fields.items() if key in known and key != "model_type"}
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in fields:
                raise ValueError(f"{path}/config.json: missing {key!r}")
    try:
        return config_class(**fields)
    except (TypeError, ValueError, StrictDataclassError) as error:  # transformers 5 checks field types
        message = " ".join(str(error).split())  # its message spans lines
        raise ValueError(f"{path}/config.json: {message}; fix the field or fetch the file again") from None


def _dropless(capacity_factor: float, top_k: int, num_experts: int) -> bool:
    """Whether DeepSpeed's capacity ceil(T / E * factor * k) >= T for every T (no token dropped)."""
    ratio = capacity_factor * top_k / num_experts
    return ratio >= 1 or math.isclose(ratio, 1.0)


def _num_patches(vision_config, config: dict[str, Any]) -> int:
    """Image tokens per image: the tower's tokens (CLIP adds a CLS), less the first with "patch"."""
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    tokens += isinstance(vision_config, CLIPVisionConfig)
    return tokens - (config.get("mm_vision_select_feature", "patch") == "patch")


def _select_layer(config: dict[str, Any], vision_config, path: Path) -> int:
    """Their mm_vision_select_layer, an index into the tower's hidden states (the embeddings, then
    one per layer): checked here, or the imported model would fail at its first image."""
    layer, count = config.get("mm_vision_select_layer", -2), vision_config.num_hidden_layers + 1
    if not _is_int(layer) or not -count <= layer < count:
        raise ValueError(
            f"{path}/config.json: mm_vision_select_layer {layer!r} is not one of the vision tower's "
            f"{count} hidden states (-{count}..{count - 1}): the --vision-tower is not the one it was "
            f"trained with ({config.get('mm_image_tower')}), or the field was edited"
        )
    return layer


def _select_strategy(feature: str, path: Path) -> str:
    # Their "patch" drops the first token (for SigLIP too, which has no CLS): LLaVA's "default".
    strategies = {"patch": "default", "cls_patch": "full"}
    if not isinstance(feature, str) or feature not in strategies:
        raise ValueError(
            f"{path}/config.json: mm_vision_select_feature {feature!r}; known: {sorted(strategies)}"
        )
    return strategies[feature]


def _map_language_model(
    model: nn.Module, tensors: CheckpointTensors, target: TargetState, grow_vocab: bool
) -> None:
    lm = model.get_submodule("model.language_model")
    moe_layers = {i for i, layer in enumerate(lm.layers) if isinstance(layer.mlp, MoEFeedForward)}
    for name in tensors.names():
        if name.startswith(tuple(_PROJECTOR)) or name.startswith(_THEIR_TOWER) or name.endswith(DERIVED):
            continue
        if _MOE in name:
            continue  # by layer, below
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            tied = tensors.take(name)  # saved by older transformers although tied: must be the same tensor
            if not torch.equal(tied, tensors.take("model.embed_tokens.weight")):
                raise ValueError(f"{tensors.path}: config ties the LM head to the embeddings but they differ")
            continue
        if name.startswith("lm_head."):
            ours = name
        elif name.startswith(_THEIR_LM):
            ours = _OUR_LM + name[len(_THEIR_LM) :]
        else:
            continue  # left unused: load_checked names it
        tensor = tensors.take(name)
        if grow_vocab and name in ("model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"):
            tensor = torch.cat([tensor, tensor.new_zeros(1, *tensor.shape[1:])])  # the image token's row
        target.set(ours, tensor, tensors.describe(name))
    for index in sorted(moe_layers):
        _map_moe_layer(lm.layers[index].mlp, index, tensors, target)


def _check_moe_layout(tensors: CheckpointTensors, moe: dict[str, Any], path: Path) -> None:
    """The layers with DeepSpeed-MoE tensors, and their experts, are the ones config.json's 'moe'
    names: else a tensor-by-tensor error would blame a dense MLP or an 'unknown' part."""
    experts: dict[int, set[str]] = {}  # {layer: expert indices as named}
    for name in tensors.names():
        if name.startswith(_THEIR_LM + "layers.") and _MOE in name:
            layer, _, rest = name[len(_THEIR_LM + "layers.") :].partition(_MOE)
            if not layer.isdecimal():  # e.g. "0.self_attn": int() would fail with no name or file
                raise ValueError(
                    f"{tensors.path}: tensor {name!r} has a DeepSpeed-MoE part but {layer!r} where the "
                    f"layer index goes; expected {_THEIR_LM}layers.<index>{_MOE}<part>: the weights are not "
                    "MoE-LLaVA's or were renamed; fetch them again"
                )
            found = experts.setdefault(int(layer), set())
            if rest.startswith("experts.deepspeed_experts."):
                found.add(rest.split(".")[2])
    where = f"{path}/config.json 'moe'"
    if sorted(experts) != sorted(moe["layers"]):
        raise ValueError(
            f"{where}: moe_layers_idx {moe['layers']} but the checkpoint has DeepSpeed-MoE layers at "
            f"{sorted(experts)}: config.json is not this checkpoint's; fetch it again"
        )
    expected = {str(j) for j in range(moe["num_experts"])}
    for layer, found in sorted(experts.items()):
        if found != expected:
            raise ValueError(
                f"{where}: num_experts {moe['num_experts']} but layer {layer} of the checkpoint has experts "
                f"{sorted(found, key=lambda j: (len(j), j))}: config.json is not this checkpoint's"
            )


def _map_moe_layer(mlp: MoEFeedForward, index: int, tensors: CheckpointTensors, target: TargetState) -> None:
    theirs = f"model.layers.{index}{_MOE}"
    ours = f"{_OUR_LM}layers.{index}.mlp."
    gate = f"{theirs}gate.wg.weight"
    target.set(f"{ours}router.gate.weight", tensors.take(gate), tensors.describe(gate))
    expert = f"{theirs}experts.deepspeed_experts."
    if isinstance(mlp.experts, GLUExperts):
        names = [f"{expert}{j}.{p}.weight" for j in range(mlp.num_experts) for p in ("gate_proj", "up_proj")]
        gate_up = [(tensors.describe(n), tensors.take(n)) for n in names]
        target.set_experts(f"{ours}experts.gate_up_proj", gate_up, f"{expert}*.gate_proj/up_proj.weight", 2)
        names = [f"{expert}{j}.down_proj.weight" for j in range(mlp.num_experts)]
        down = [(tensors.describe(n), tensors.take(n)) for n in names]
        target.set_experts(f"{ours}experts.down_proj", down, f"{expert}*.down_proj.weight")
    elif isinstance(mlp.experts, MLPExperts):
        for linear in ("fc1", "fc2"):
            for leaf in ("weight", "bias"):
                names = [f"{expert}{j}.{linear}.{leaf}" for j in range(mlp.num_experts)]
                parts = [(tensors.describe(n), tensors.take(n)) for n in names]
                target.set_experts(f"{ours}experts.{linear}_{leaf}", parts, f"{expert}*.{linear}.{leaf}")
    else:
        raise ValueError(f"layer {index}: experts of type {type(mlp.experts).__name__} cannot be imported")
