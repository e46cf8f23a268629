"""Import a LLaVA-MoLE checkpoint (forwchen/LLaVA-MoLE) into a vlmoe model on stock transformers.

Their model (`model.py`, `moe.py`) is a Vicuna (Llama) LM with PEFT LoRA on the attention
projections and, in every layer, `LoRA_MOE_LM`: the frozen MLP plus E LoRA experts on each of
gate/up/down and one router (Linear with bias) over the MLP input; a CLIP tower (last layer,
class token dropped); an adaptor with a Linear-GELU-Linear projector and two learned vectors
put before and after the image features. The weights are a `torch.save` of
`{"state_dict": ...}`, often only the trained parts: the Vicuna and CLIP weights then come from
their own directories (`base_llm`, `vision_tower`), whose configs are needed in any case.

Here it becomes a `LlavaForConditionalGeneration` with `add_mole` (shared router per MLP, router
bias, plain LoRA on attention), recorded so `vlmoe.save` / `vlmoe.load` rebuild it. The two
learned vectors become the embeddings of two new tokens, `<im_start>` and `<im_end>`, added to
the tokenizer after the image token, so the prompt (the processor's chat template) carries them
around the image tokens.

Key map (theirs, `L` = `llm_model.base_model.model.model.layers.{i}`; ours, `O` =
`model.language_model.layers.{i}`):
    L.self_attn.{q,k,v,o}_proj.base_layer.weight     -> O.self_attn.{..}.base.weight
    L.self_attn.{..}.lora_A.default.weight [r, in]     -> O.self_attn.{..}.universal.lora_A[0]
    L.self_attn.{..}.lora_B.default.weight [out, r]    -> O.self_attn.{..}.universal.lora_B[0]
    L.mlp.original_module.{gate,up,down}_proj.weight  -> O.mlp.{gate,up,down}_proj.base.weight
    L.mlp.moe_{gate,up,down}.{e}.lora_A / lora_B       -> O.mlp.{..}_proj.experts.lora_A[e] / lora_B[e]
    L.mlp.router.{weight,bias}                         -> O.mlp.router.gate.{weight,bias}
    in_adaptor.projector.{0,2}.*                       -> model.multi_modal_projector.linear_{1,2}.*
    in_adaptor.visual_{start,end}_token                -> embedding rows of <im_start>, <im_end>
    vit.vision_tower.vision_model.*                    -> model.vision_tower.*
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration
from transformers.initialization import no_init_weights
from transformers.models.llava.processing_llava import LlavaProcessor

from vlmoe.interop.processor import conversation as conversation_format
from vlmoe.interop.processor import image_processor_for, llava_processor, read_tokenizer
from vlmoe.interop.tensors import CheckpointTensors, TargetState, load_checked
from vlmoe.interop.vision import DERIVED, VISION_PREFIX, map_tower, read_vision_tower
from vlmoe.models.checkpoint import read_config
from vlmoe.models.record import ImportCheckpoint, append_step
from vlmoe.models.surgery import add_mole

_LM = "llm_model.base_model.model."  # PEFT's PeftModelForCausalLM -> LoraModel -> LlamaForCausalLM
_LAYERS = _LM + "model.layers."
_ADAPTOR = "in_adaptor."
_THEIR_TOWER = "vit.vision_tower." + VISION_PREFIX
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_NEW_TOKENS = ("<image>", "<im_start>", "<im_end>")  # consecutive ids; the last two carry their vectors
_MLP = {"gate_proj": "moe_gate", "up_proj": "moe_up", "down_proj": "moe_down"}


def import_llava_mole(
    checkpoint: str | os.PathLike,
    base_llm: str | os.PathLike,
    vision_tower: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    lora_alpha: float | None = None,
    routing: Literal["dense", "sparse"] = "dense",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, LlavaProcessor]:
    """(model, processor) from a LLaVA-MoLE checkpoint file (or directory): a vlmoe LLaVA with MoLE
    layers and a `LlavaProcessor` with their Vicuna conversation format.

    `base_llm` is the local Vicuna directory it was trained on (its config, its tokenizer unless
    `tokenizer` names another directory, and every LM tensor the checkpoint lacks), `vision_tower`
    the local CLIP directory with its preprocessor_config.json. `lora_alpha` is not stored in their
    checkpoint: None means 2 * rank (scaling 2, as in their released settings r16/a32 and
    r32/a64). `routing="dense"` weights every LoRA expert by its router probability, as their
    released inference script does (`dense_moe = True`); "sparse" uses the argmax expert alone
    with weight 1, as their sparse path (and training forward) does. The tokenizer gains
    `<image>`, `<im_start>` and `<im_end>` at ids `len(tokenizer)`, +1, +2 (Vicuna: 32000-32002,
    three appended embedding rows); the prompt wraps the image tokens in the last two, whose
    embeddings are their learned start/end vectors.

    Example:
        >>> model, processor = import_llava_mole(  # doctest: +SKIP
        ...     "llava_mole_r16_a32_e3.pt", "vicuna-7b-v1.5", "clip-vit-large-patch14-336"
        ... )
    """
    if routing not in ("dense", "sparse"):
        raise ValueError(f"routing must be 'dense' or 'sparse', got {routing!r}")
    tensors = CheckpointTensors(checkpoint)
    base_dir = Path(base_llm)
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{base_dir}: not a model directory (no config.json). LLaVA-MoLE's checkpoint has no config; "
            "pass the local Vicuna directory it was trained on (e.g. lmsys/vicuna-7b-v1.5) as --base-llm"
        )
    model_type = read_config(base_dir).get("model_type")  # damaged JSON: a ValueError naming the file
    if model_type != "llama":
        raise ValueError(
            f"{base_dir}/config.json: model_type {model_type!r}; LLaVA-MoLE is built on a Llama (Vicuna): "
            "pass the Vicuna directory it was trained on as --base-llm"
        )
    text_config = AutoConfig.from_pretrained(base_dir)
    if tokenizer is None:
        tokens = read_tokenizer(base_dir, "the base LLM")
    else:
        tokens = read_tokenizer(tokenizer, "the --tokenizer folder")
    base = CheckpointTensors(base_dir)
    vision_config, tower = read_vision_tower(vision_tower, "openai/clip-vit-large-patch14-336")
    image_processor = image_processor_for(vision_tower, vision_config, pad=True)  # their process_images pads
    num_experts, rank = _experts_and_rank(tensors)
    alpha = float(2 * rank if lora_alpha is None else lora_alpha)
    vocab = text_config.vocab_size
    first = _add_image_tokens(tokens, vocab, base_dir)
    text_config.vocab_size = max(vocab, first + len(_NEW_TOKENS))
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_index=first,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,  # their tower returns the last layer's states, class token dropped
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.im_start_token_id, config.im_end_token_id = first + 1, first + 2
    if dtype is None:
        dtype = tensors.dtype()
    with no_init_weights():
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype)
    append_step(model, "llava", ImportCheckpoint("llava-mole", checkpoint=Path(checkpoint).name))
    dense = routing == "dense"
    add_mole(
        model,
        num_experts,
        rank,
        alpha,
        top_k=num_experts if dense else 1,
        straight_through=not dense,  # sparse: the chosen expert's LoRA at weight 1
        router_bias=True,
    )
    target = TargetState(model, str(tensors.path))
    lm = _Resolver(tensors, base)
    _map_layers(model, lm, target, num_experts)
    _map_embeddings(lm, tensors, target, vocab, first)
    target.set("model.language_model.norm.weight", lm.take("model.norm.weight"), "model.norm.weight")
    map_tower(tensors, _THEIR_TOWER, tower, target)
    for index, linear in ((0, "linear_1"), (2, "linear_2")):
        for leaf in ("weight", "bias"):
            name = f"{_ADAPTOR}projector.{index}.{leaf}"
            target.set(f"model.multi_modal_projector.{linear}.{leaf}", tensors.take(name), name)
    processor = llava_processor(
        tokens, image_processor, vision_config, "default", conversation_format("llava-mole")
    )
    return load_checked(model, tensors, target, DERIVED), processor


def _add_image_tokens(tokenizer, vocab: int, base_dir: Path) -> int:
    """Add `<image>`, `<im_start>`, `<im_end>` to the tokenizer; returns the first one's id."""
    first = len(tokenizer)
    if first > vocab:
        raise ValueError(
            f"{base_dir}: the tokenizer has {first} tokens but the LM only {vocab} embedding rows: it is "
            "not this model's tokenizer"
        )
    present = [token for token in _NEW_TOKENS if token in tokenizer.get_vocab()]
    if present:
        raise ValueError(f"{base_dir}: the tokenizer already has {present}; give Vicuna's own tokenizer")
    tokenizer.add_tokens(list(_NEW_TOKENS), special_tokens=True)
    return first


class _Resolver:
    """An LM tensor by its LlamaForCausalLM name: from the checkpoint if it has it, else the base."""

    def __init__(self, tensors: CheckpointTensors, base: CheckpointTensors) -> None:
        self.tensors, self.base = tensors, base

    def take(self, name: str, *their_names: str) -> torch.Tensor:
        their_names = their_names or (_LM + name,)
        for their_name in their_names:
            if their_name in self.tensors:
                return self.tensors.take(their_name)
        their_name = " or ".join(repr(n) for n in their_names)
        if name in self.base:
            return self.base.take(name)
        raise ValueError(
            f"neither {self.tensors.path} ({their_name}) nor the base LM {self.base.path} ({name!r}) has "
            "this tensor: the checkpoint is truncated or the base LM is not the one it was trained on"
        )


def _experts_and_rank(tensors: CheckpointTensors) -> tuple[int, int]:
    prefix = f"{_LAYERS}0.mlp.moe_gate."
    experts = set()
    for name in tensors.names():
        if name.startswith(prefix):
            index = name[len(prefix) :].split(".")[0]
            if not index.isdecimal():
                raise ValueError(
                    f"{tensors.path}: tensor {name!r} is not '{prefix}<e>.lora_A' or .lora_B with <e> "
                    "an expert number 0, 1, ...: not a LLaVA-MoLE checkpoint, or its keys were renamed"
                )
            experts.add(int(index))
    if not experts:
        raise ValueError(
            f"{tensors.path}: no '{prefix}<e>.lora_A' tensors: not a LLaVA-MoLE checkpoint with LoRA experts "
            "(llm_moe=True)"
        )
    if experts != set(range(len(experts))):
        raise ValueError(f"{tensors.path}: layer 0 has LoRA experts {sorted(experts)}, not 0..E-1")
    return len(experts), tensors.take(f"{prefix}0.lora_A").shape[0]


def _map_layers(model: nn.Module, lm: _Resolver, target: TargetState, num_experts: int) -> None:
    tensors = lm.tensors
    for index in range(len(model.model.language_model.layers)):
        theirs, ours = f"{_LAYERS}{index}.", f"model.language_model.layers.{index}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{index}.{norm}.weight"
            target.set(f"{ours}{norm}.weight", lm.take(name), name)
        for proj in _ATTENTION:
            name = f"model.layers.{index}.self_attn.{proj}.weight"
            # PEFT >= 0.7 keeps the frozen weight in `base_layer`; older PEFT on the LoRA layer itself.
            weight = lm.take(
                name, f"{theirs}self_attn.{proj}.base_layer.weight", f"{theirs}self_attn.{proj}.weight"
            )
            target.set(f"{ours}self_attn.{proj}.base.weight", weight, name)
            for lora in ("lora_A", "lora_B"):
                name = f"{theirs}self_attn.{proj}.{lora}.default.weight"
                target.set(f"{ours}self_attn.{proj}.universal.{lora}", tensors.take(name)[None], name)
        for proj, moe in _MLP.items():
            name = f"model.layers.{index}.mlp.{proj}.weight"
            weight = lm.take(name, f"{theirs}mlp.original_module.{proj}.weight")
            target.set(f"{ours}mlp.{proj}.base.weight", weight, name)
            for lora in ("lora_A", "lora_B"):
                names = [f"{theirs}mlp.{moe}.{e}.{lora}" for e in range(num_experts)]
                parts = [(n, tensors.take(n)) for n in names]
                target.set_experts(f"{ours}mlp.{proj}.experts.{lora}", parts, f"{theirs}mlp.{moe}.*.{lora}")
        for leaf in ("weight", "bias"):
            name = f"{theirs}mlp.router.{leaf}"
            target.set(f"{ours}mlp.router.gate.{leaf}", tensors.take(name), name)


def _map_embeddings(
    lm: _Resolver, tensors: CheckpointTensors, target: TargetState, vocab: int, first: int
) -> None:
    """The LM's rows, grown to hold ids first..first+2; the start/end vectors at first+1, first+2."""
    embed = lm.take("model.embed_tokens.weight")
    shared = _ADAPTOR + "text_embed.weight"  # the adaptor holds the LM's embedding module too
    if shared in tensors and not torch.equal(tensors.take(shared), embed):
        raise ValueError(
            f"{tensors.path}: {shared!r} differs from the LM's embed_tokens; they are one module"
        )
    start, end = (_visual_token(tensors, which, embed) for which in ("start", "end"))
    grown = max(vocab, first + len(_NEW_TOKENS)) - vocab
    rows = torch.cat([embed, embed.new_zeros(grown, embed.shape[1])])
    rows[first + 1 : first + 3] = torch.cat([start, end])
    target.set("model.language_model.embed_tokens.weight", rows, "model.embed_tokens.weight + start/end rows")
    head = lm.take("lm_head.weight")
    target.set(
        "lm_head.weight",
        torch.cat([head, head.new_zeros(grown, head.shape[1])]),
        "lm_head.weight + zero rows",
    )
    if head.shape[0] != vocab:
        raise ValueError(f"lm_head has {head.shape[0]} rows but the base config's vocab_size is {vocab}")


def _visual_token(tensors: CheckpointTensors, which: str, embed: torch.Tensor) -> torch.Tensor:
    """Their learned visual start or end vector [1, 1, hidden] as one embedding row [1, hidden]."""
    name = f"{_ADAPTOR}visual_{which}_token"
    vector = tensors.take(name)
    if vector.numel() != embed.shape[1]:
        raise ValueError(
            f"{tensors.path}: {name} has shape {tuple(vector.shape)} but the base LM's hidden size is "
            f"{embed.shape[1]}: the checkpoint was trained on another LM; pass that one as --base-llm"
        )
    return vector.reshape(1, -1).to(embed.dtype)
