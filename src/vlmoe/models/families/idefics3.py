"""Idefics3 / SmolVLM (`Idefics3ForConditionalGeneration`): SigLIP-style tower, Llama LM.

The connector is pixel-shuffle (a reshape that folds scale_factor^2 patches into one row)
followed by `modality_projection`, a single bias-free Linear. Only `modality_projection` is
row-wise, so the MoE connector replaces it: each expert is a copy of that one-layer projector.
"""

from transformers import Idefics3Config

from vlmoe.models.families.base import FamilyAdapter

ADAPTER = FamilyAdapter(
    name="idefics3",
    config_class=Idefics3Config,
    vision_tower="model.vision_model",
    projector="model.connector.modality_projection",
    language_model="model.text_model",
    image_token_id_attr="image_token_id",
    export_style="mixtral",
)
