"""What vlmoe needs to know about one family of HF vision-language models, declared as data.

Paths are dotted module names relative to the `...ForConditionalGeneration` model; linear names
are relative to their decoder layer's MLP or attention module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn
from transformers import PretrainedConfig

ExportStyle = Literal["mixtral", "qwen2_moe"]


@dataclass(frozen=True)
class FamilyAdapter:
    """Where a family keeps its parts. One instance per family, in `vlmoe/models/families/`."""

    name: str
    config_class: type[PretrainedConfig]  # detection is by this class, never by the model's name
    vision_tower: str
    # The row-wise projector the MoE connector replaces: called on image features # [..., D_in]
    # and returning # [..., D_out], with nothing but row-wise maps inside (see each family's notes).
    projector: str
    language_model: str  # the decoder stack (embed_tokens, layers, norm)
    image_token_id_attr: str  # attribute of the model's config holding the image token id
    export_style: ExportStyle  # the standard HF MoE architecture an upcycled LM exports to
    decoder_layers: str = "layers"  # relative to `language_model`
    mlp: str = "mlp"  # relative to one decoder layer
    mlp_linears: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    attention: str = "self_attn"
    attention_linears: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lm_head: str = "lm_head"
    # Parameters outside `projector` that belong to the vision-to-LM connector (trained with it).
    connector_parameters: tuple[str, ...] = ()

    def matches(self, config: PretrainedConfig) -> bool:
        return isinstance(config, self.config_class)

    def image_token_id(self, model: nn.Module) -> int:
        return int(getattr(model.config, self.image_token_id_attr))

    def decoder_layer_list(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(f"{self.language_model}.{self.decoder_layers}")

    def layer_path(self, index: int) -> str:
        return f"{self.language_model}.{self.decoder_layers}.{index}"

    def mlp_path(self, index: int) -> str:
        return f"{self.layer_path(index)}.{self.mlp}"

    def attention_path(self, index: int) -> str:
        return f"{self.layer_path(index)}.{self.attention}"
