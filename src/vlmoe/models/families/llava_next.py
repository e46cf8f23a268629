"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): as LLaVA, plus any-resolution image tiling."""

from transformers import LlavaNextConfig

from vlmoe.models.families.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="llava_next",
    config_class=LlavaNextConfig,
    vision_tower="model.vision_tower",
    projector="model.multi_modal_projector",  # linear_1 -> act -> linear_2, row-wise
    language_model="model.language_model",
    image_token_id_attr="image_token_id",
    export_style="mixtral",
    connector_parameters=("model.image_newline",),  # the learned row separator of tiled images
)
