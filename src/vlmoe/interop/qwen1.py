"""MoE-LLaVA-Qwen's language model, Qwen-1 (remote code `QWenLMHeadModel`), read as a stock Qwen2.

Qwen-1 computes what a Qwen2 with as many key/value heads as query heads computes, for sequences
up to its `seq_length` (its dynamic NTK rotary scaling and log-n attention scaling only start
beyond it): RMSNorm; fused `c_attn` (q, k, v stacked, with bias); `c_proj` without bias; MLP
`c_proj(w1(x) * silu(w2(x)))`, so `w2` is Qwen2's gate_proj and `w1` its up_proj, and its config's
`intermediate_size` is twice the MLP width. This file presents its tensors under the Qwen1.5
(Qwen2) names the MoE-LLaVA importer reads, and its config as Qwen2 fields.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from vlmoe.interop.tensors import CheckpointTensors

_RENAMES = (  # (Qwen-1 pattern, Qwen2 name), tried in order
    (r"transformer\.wte\.", "model.embed_tokens."),
    (r"transformer\.ln_f\.", "model.norm."),
    (r"transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.input_layernorm."),
    (r"transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.post_attention_layernorm."),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.(.*)w2\.", r"model.layers.\1.mlp.\2gate_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.(.*)w1\.", r"model.layers.\1.mlp.\2up_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.(.*)c_proj\.", r"model.layers.\1.mlp.\2down_proj."),
    (r"transformer\.h\.(\d+)\.", r"model.layers.\1."),  # the MoE gate keeps its name
    (r"transformer\.", "model."),  # mm_projector, image_tower, rotary buffers
)
_FUSED_QKV = re.compile(r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$")


class Qwen1Tensors:
    """A Qwen-1 checkpoint's tensors under Qwen2 names; `unused()` reports Qwen-1 names."""

    def __init__(self, tensors: CheckpointTensors) -> None:
        self._inner = tensors
        self.path: Path = tensors.path
        self._source: dict[str, tuple[str, int | None]] = {}  # Qwen2 name -> (Qwen-1 name, q/k/v part)
        for name in tensors.names():
            fused = _FUSED_QKV.match(name)
            if fused:
                layer, leaf = fused.groups()
                for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    self._source[f"model.layers.{layer}.self_attn.{proj}.{leaf}"] = (name, part)
                continue
            renamed = name
            for pattern, replacement in _RENAMES:
                renamed, count = re.subn(f"^{pattern}", replacement, name)
                if count:
                    break
            self._source[renamed] = (name, None)

    def names(self) -> list[str]:
        return sorted(self._source)

    def __contains__(self, name: str) -> bool:
        return name in self._source

    def take(self, name: str) -> torch.Tensor:
        if name not in self._source:
            raise ValueError(f"{self.path}: the checkpoint has no tensor for {name!r} (Qwen-1 layout)")
        original, part = self._source[name]
        tensor = self._inner.take(original)
        return tensor if part is None else tensor.chunk(3, dim=0)[part]

    def describe(self, name: str) -> str:
        """The Qwen-1 name in the file, which errors give (the Qwen2 name is in no file)."""
        original, part = self._source.get(name, (name, None))
        if original == name:
            return name
        piece = "" if part is None else f"its {('q', 'k', 'v')[part]} third, "
        return f"{original} ({piece}read as {name})"

    def dtype(self) -> torch.dtype:
        return self._inner.dtype()

    def unused(self) -> list[str]:
        return self._inner.unused()


def qwen2_fields(config: dict[str, Any], where: str) -> dict[str, Any]:
    """Qwen2Config fields for a Qwen-1 (`QWenConfig`) config dict; refuses what Qwen2 cannot express."""
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size"):
        if not isinstance(config.get(key), int):
            raise ValueError(f"{where}: {key!r} is missing or not an integer ({config.get(key)!r})")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    if config.get("kv_channels", hidden // heads) * heads != hidden:
        raise ValueError(f"{where}: kv_channels * num_attention_heads != hidden_size; Qwen2 cannot hold it")
    if config.get("rotary_pct", 1.0) != 1.0:
        raise ValueError(
            f"{where}: rotary_pct {config['rotary_pct']} (partial rotary) has no Qwen2 equivalent"
        )
    if not config.get("no_bias", True):
        raise ValueError(f"{where}: no_bias=false (biased c_proj/MLP) has no Qwen2 equivalent")
    return {
        "vocab_size": config["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": config["intermediate_size"] // 2,  # Qwen-1 halves it for w1 and w2
        "num_hidden_layers": config["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "hidden_act": "silu",
        "max_position_embeddings": config.get("seq_length", config.get("max_position_embeddings", 8192)),
        "rms_norm_eps": config.get("layer_norm_epsilon", 1e-6),
        "rope_theta": config.get("rotary_emb_base", 10000),
        "tie_word_embeddings": config.get("tie_word_embeddings", False),
        "use_sliding_window": False,
    }
