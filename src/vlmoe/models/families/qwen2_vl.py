"""Qwen2-VL (`Qwen2VLForConditionalGeneration`): the projector lives inside the vision tower.

`model.visual.merger` is LayerNorm -> merge 2x2 patches (a reshape) -> Linear-GELU-Linear. Only
the final `merger.mlp` is row-wise over merged patches, so the MoE connector replaces that
Sequential: its experts see the normalised, merged patch features.
"""

from transformers import Qwen2VLConfig

from vlmoe.models.families.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="qwen2_vl",
    config_class=Qwen2VLConfig,
    vision_tower="model.visual",
    projector="model.visual.merger.mlp",
    language_model="model.language_model",
    image_token_id_attr="image_token_id",
    export_style="qwen2_moe",
)
