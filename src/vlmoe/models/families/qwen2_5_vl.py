"""Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`): laid out as Qwen2-VL (see `qwen2_vl.py`).

The merger is RMSNorm -> merge 2x2 patches -> Linear-GELU-Linear; the MoE connector replaces the
row-wise `merger.mlp`.
"""

from transformers import Qwen2_5_VLConfig

from vlmoe.models.families.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="qwen2_5_vl",
    config_class=Qwen2_5_VLConfig,
    vision_tower="model.visual",
    projector="model.visual.merger.mlp",
    language_model="model.language_model",
    image_token_id_attr="image_token_id",
    export_style="qwen2_moe",
)
