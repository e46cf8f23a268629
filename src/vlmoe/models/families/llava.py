"""LLaVA-1.5 (`LlavaForConditionalGeneration`): CLIP tower, Linear-GELU-Linear projector, Llama LM."""

from transformers import LlavaConfig

from vlmoe.models.families.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="llava",
    config_class=LlavaConfig,
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",  # linear_1 -> act -> linear_2, row-wise
    language_model="model.language_model",
    image_token_id_attr="image_token_id",
    export_style="mixtral",
)
