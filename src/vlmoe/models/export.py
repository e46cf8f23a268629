"""`export_hf`: an upcycled model as a standard transformers MoE architecture, loadable without vlmoe.

- Llama LMs (LLaVA, LLaVA-NeXT, Idefics3) -> Mixtral: the whole VLM with a `MixtralConfig` text
  config (these VLMs build their LM with `AutoModel`, so stock transformers composes them).
- Qwen2 LMs (Qwen2-VL, Qwen2.5-VL, a LLaVA on Qwen1.5 imported from MoE-LLaVA) ->
  `Qwen2MoeForCausalLM`, the language model only: Qwen2-VL
  builds its own text model, so no stock class holds a Qwen2-VL with an MoE LM. Dense layers go
  in `mlp_only_layers`; the shared expert is disabled (size 0). Its rotary embedding is the 1-D
  one, which is what M-RoPE computes for text tokens, so text-only logits match.
- Other LMs (Phi, StableLM) have no standard MoE architecture and are refused.

Expert weights need no conversion: vlmoe's `GLUExperts` and transformers' fused experts are both
`gate_up_proj` # [E, 2F, D] (gate rows first) and `down_proj` # [E, D, F]; only the router moves
from `mlp.router.gate.weight` to `mlp.gate.weight`. The stock model's own `save_pretrained` writes
the files, and transformers 5 writes the classic per-expert keys there
(`block_sparse_moe.experts.{j}.w1/w2/w3` for Mixtral, `mlp.experts.{j}.gate_proj/...` for
Qwen2-MoE), which older transformers and serving engines read.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers.initialization import no_init_weights

from vlmoe.atomic import atomic_directory, check_replaceable, deletes_source
from vlmoe.models.card import CARD_NAME, CardInfo, model_card
from vlmoe.models.checkpoint import loaded_from
from vlmoe.models.families import FamilyAdapter, adapter_for
from vlmoe.models.mole import MoLEFeedForward
from vlmoe.models.record import CONFIG_KEY
from vlmoe.moe import GLUExperts, MoEConnector, MoEFeedForward, MoLELinear


def export_hf(
    model: nn.Module, path: str | os.PathLike, card: CardInfo | None = None, processor: Any = None
) -> Path:
    """Write `model` (not changed) as a stock transformers MoE checkpoint at `path`; returns the path.

    With `processor`, its files go beside the weights, so `AutoProcessor.from_pretrained(path)`
    loads it (`vlmoe export` passes the one saved in SRC); a language-model-only export (Qwen2-MoE)
    takes the processor's tokenizer, its only part that model uses.

    Plain and universal LoRA are merged into their base weights first; a model without upcycled FFNs
    (plain LoRA only, as ChartMoE's LLM LoRA without its connector) exports as its own base
    architecture. Routed LoRA experts, an
    MoE connector, capacity-limited routers and (for Mixtral) top-1 or un-renormalised routing
    have no standard equivalent and are refused with the reason. A model card (README.md) comes
    with the weights; `card` adds the recipe, data and evaluation results.

    `path` may be a new or empty folder or a model folder saved before (which is replaced), but not
    the folder the model was loaded from (`vlmoe.models.checkpoint.loaded_from`) nor one holding it: the
    stock checkpoint would replace the vlmoe model, and its surgery record with it.

    Example:
        >>> import tempfile, vlmoe
        >>> from transformers import AutoModelForImageTextToText
        >>> model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0], num_experts=4, top_k=2)
        >>> path = vlmoe.export_hf(model, tempfile.mkdtemp() + "/mixtral-llava")
        >>> AutoModelForImageTextToText.from_pretrained(path).config.text_config.model_type
        'mixtral'
    """
    from vlmoe.models.surgery import check_record_agrees

    # A model from_pretrained on a vlmoe.save folder has dense MLPs with random weights under the
    # record of its surgery: refused here, not reported as a dense model to save_pretrained.
    check_record_agrees(model)
    _check_not_the_source(model, Path(path))
    check_replaceable(path)  # before the conversion's work, not only before the write
    adapter = adapter_for(model)
    model = copy.deepcopy(model).eval()
    _merge_lora(model, adapter)
    if isinstance(model.get_submodule(adapter.projector), MoEConnector):
        raise ValueError(
            f"{adapter.projector} is an MoEConnector, which no stock transformers architecture has; "
            "export_hf covers the LM's FFN experts. Save with vlmoe.save instead"
        )
    moe_layers = _moe_layers(model, adapter)
    if not moe_layers:
        style, exported = "dense", _as_stock_dense(model)  # its LoRA merged above: the base architecture
    else:
        style = _export_style(model, adapter)  # first: a Phi LM is refused for its family, not its experts
        _check_exportable(moe_layers)
        exported = (_to_mixtral if style == "mixtral" else _to_qwen2_moe)(model, adapter, moe_layers)
    text = model_card(model, card, exported_as=type(exported).__name__)
    if processor is not None and style == "qwen2_moe":
        processor = getattr(processor, "tokenizer", processor)  # Qwen2MoeForCausalLM reads no images
    return _save_atomically(exported, Path(path), text, processor)


def _as_stock_dense(model: nn.Module) -> nn.Module:
    """`model` (a copy, its LoRA merged) without the surgery record: its own transformers class.

    `model.save_pretrained` of a model with LoRA would write vlmoe's `q_proj.base.weight` names,
    which stock transformers does not read; merged, every linear is plain again."""
    left = sorted({type(m).__name__ for m in model.modules() if type(m).__module__.startswith("vlmoe")})
    if left:  # every vlmoe module is refused or merged above; a new kind would land here
        raise ValueError(f"the model still holds vlmoe modules {left}, which no stock architecture has")
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


def _check_not_the_source(model: nn.Module, path: Path) -> None:
    source = loaded_from(model)
    how = None if source is None else deletes_source(path, source)
    if how is not None:
        raise ValueError(
            f"{path} {how} {source}, the folder the model was loaded from: the export would replace the "
            "vlmoe model there with a stock HF checkpoint, which has no surgery record to load it back as "
            "a vlmoe model; pass another folder"
        )


def _export_style(model: nn.Module, adapter: FamilyAdapter) -> str:
    """The family's style, unless its LM is another one (a LLaVA on Qwen2, from vlmoe.interop)."""
    text_type = model.config.get_text_config().model_type
    if adapter.export_style != "mixtral":
        return adapter.export_style
    if text_type == "qwen2":
        return "qwen2_moe"  # stock LLaVA cannot hold Qwen2-MoE's mixed layers: the LM alone
    if text_type not in ("llama", "mistral"):
        raise ValueError(
            f"the language model is {text_type!r}, for which transformers has no standard MoE architecture "
            "(Mixtral covers Llama/Mistral, Qwen2-MoE covers Qwen2); save it with vlmoe.save instead"
        )
    return "mixtral"


def _merge_lora(model: nn.Module, adapter: FamilyAdapter) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, MoLEFeedForward) or (
            isinstance(module, MoLELinear) and module.experts is not None
        ):
            raise ValueError(
                f"{name} has routed LoRA experts (add_mole with num_experts > 0); a standard HF architecture "
                "cannot choose a LoRA per token or per cluster. Export a model with plain LoRA "
                "(add_mole(num_experts=0)) or without add_mole, or save it with vlmoe.save"
            )
    for name, module in list(model.named_modules()):
        if isinstance(module, MoLELinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.merge_universal().base)


def _moe_layers(model: nn.Module, adapter: FamilyAdapter) -> dict[int, MoEFeedForward]:
    layers = adapter.decoder_layer_list(model)
    moe = {i: getattr(layer, adapter.mlp) for i, layer in enumerate(layers)}
    return {i: mlp for i, mlp in moe.items() if isinstance(mlp, MoEFeedForward)}


def _check_exportable(moe: dict[int, MoEFeedForward]) -> None:
    """Refuse, naming the layer, MoE layers that no stock HF MoE architecture computes alike."""
    configs = {
        (m.router.config.num_experts, m.router.config.top_k, m.router.config.normalize_top_k)
        for m in moe.values()
    }
    if len(configs) > 1:
        raise ValueError(
            f"MoE layers differ in (num_experts, top_k, normalize_top_k) {sorted(configs)}; HF needs one"
        )
    for i, mlp in moe.items():
        if not isinstance(mlp.experts, GLUExperts):
            raise ValueError(
                f"layer {i}: experts are {type(mlp.experts).__name__}; only gated (SwiGLU) experts export"
            )
        if mlp.router.config.capacity_factor is not None:
            raise ValueError(
                f"layer {i}: its router drops tokens over capacity (capacity_factor="
                f"{mlp.router.config.capacity_factor}); HF MoE models are dropless, so logits would differ. "
                "Upcycle with capacity_factor=None, or set router.config.capacity_factor = None before export"
            )
        if mlp.router.gate.bias is not None or mlp.router.config.temperature != 1.0:
            raise ValueError(f"layer {i}: router bias or temperature has no HF equivalent")


def _mapped_state(
    model: nn.Module, adapter: FamilyAdapter, moe: dict[int, MoEFeedForward]
) -> dict[str, torch.Tensor]:
    state = model.state_dict()
    for i in moe:
        prefix = adapter.mlp_path(i)
        state[f"{prefix}.gate.weight"] = state.pop(f"{prefix}.router.gate.weight")
    return state


def _to_mixtral(model: nn.Module, adapter: FamilyAdapter, moe: dict[int, MoEFeedForward]) -> nn.Module:
    from transformers import MixtralConfig

    text = model.config.get_text_config()
    num_layers = len(adapter.decoder_layer_list(model))
    if len(moe) != num_layers:
        raise ValueError(
            f"only layers {sorted(moe)} of {num_layers} are MoE; Mixtral has experts in every layer. "
            "Upcycle with layers='all' to export to Mixtral"
        )
    router = next(iter(moe.values())).router.config
    if router.top_k == 1 or not router.normalize_top_k:
        raise ValueError(
            f"Mixtral renormalises the top-k weights to sum to 1; these routers (top_k={router.top_k}, "
            f"normalize_top_k={router.normalize_top_k}) weight experts by their raw probability, so the "
            "export would compute something else. Use top_k >= 2 with normalize_top_k=True"
        )
    if getattr(text, "attention_bias", False) or getattr(text, "mlp_bias", False):
        raise ValueError("the LM has attention or MLP biases, which Mixtral does not; it cannot export")
    mixtral = MixtralConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=next(iter(moe.values())).experts.intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters=dict(text.rope_parameters),
        tie_word_embeddings=getattr(text, "tie_word_embeddings", False),
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        num_local_experts=router.num_experts,
        num_experts_per_tok=router.top_k,
        router_jitter_noise=router.jitter_noise,
        router_aux_loss_coef=router.load_balance_coef,
    )
    config_dict = model.config.to_dict()
    config_dict.pop(CONFIG_KEY, None)
    config_dict["text_config"] = mixtral.to_dict()
    config = type(model.config).from_dict(config_dict)
    config._attn_implementation = model.config._attn_implementation
    exported = _empty(type(model), config, model.dtype)
    exported.load_state_dict(_mapped_state(model, adapter, moe), strict=True)
    return exported.eval()


def _to_qwen2_moe(model: nn.Module, adapter: FamilyAdapter, moe: dict[int, MoEFeedForward]) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    text = model.config.get_text_config()
    num_layers = len(adapter.decoder_layer_list(model))
    router = next(iter(moe.values())).router.config
    qwen = Qwen2MoeConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        moe_intermediate_size=next(iter(moe.values())).experts.intermediate_size,
        shared_expert_intermediate_size=0,  # no shared expert: its output is exactly zero
        num_hidden_layers=num_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        hidden_act=text.hidden_act,
        max_position_embeddings=text.max_position_embeddings,
        rms_norm_eps=text.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"]},
        tie_word_embeddings=model.config.tie_word_embeddings,
        use_sliding_window=False,
        decoder_sparse_step=1,
        mlp_only_layers=[i for i in range(num_layers) if i not in moe],
        num_experts=router.num_experts,
        num_experts_per_tok=router.top_k,
        # vlmoe renormalises only when top_k > 1; with top-1 the weight is the raw probability.
        norm_topk_prob=router.top_k > 1 and router.normalize_top_k,
        router_aux_loss_coef=router.load_balance_coef,
        qkv_bias=True,
        pad_token_id=text.pad_token_id,
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
    )
    qwen._attn_implementation = model.config._attn_implementation
    exported = _empty(Qwen2MoeForCausalLM, qwen, model.dtype)
    state = {}
    lm_prefix = f"{adapter.language_model}."
    for name, tensor in _mapped_state(model, adapter, moe).items():
        if name.startswith(lm_prefix):
            state[f"model.{name[len(lm_prefix) :]}"] = tensor
        elif name.startswith(f"{adapter.lm_head}."):
            state[name] = tensor
    for name, tensor in exported.state_dict().items():
        if ".shared_expert" in name:
            state[name] = torch.zeros_like(tensor)
    exported.load_state_dict(state, strict=True)
    return exported.eval()


def _empty(model_class, config, dtype: torch.dtype) -> nn.Module:
    """The stock model in `dtype`, without random init: `load_state_dict(strict=True)` sets every weight."""
    with no_init_weights():
        model = model_class._from_config(config, dtype=dtype)
    model.tie_weights()
    return model


def _save_atomically(model: nn.Module, path: Path, card_text: str, processor: Any = None) -> Path:
    with atomic_directory(path) as temp:
        model.save_pretrained(temp)
        if processor is not None:
            processor.save_pretrained(temp)
        (temp / CARD_NAME).write_text(card_text)
    return path
