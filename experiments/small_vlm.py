"""The small LLaVA every experiment trains from scratch: a CLIP tower, an MLP projector, a Llama
LM and a byte-level BPE tokenizer fitted to the chart texts, with a working LLaVA processor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelSize:
    """The small LLaVA: CLIP vision tower, two-layer MLP projector, Llama LM."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    vocab_size: int


def build_small_vlm(size: ModelSize, corpus: list[str], seed: int = 0) -> tuple[Any, Any]:
    """A random LLaVA of `size` with a byte-level BPE tokenizer fitted to `corpus`.

    >>> from experiments.common import SMOKE
    >>> model, processor = build_small_vlm(SMOKE.model, ["a bar chart", "| a | b |"])
    >>> model.config.image_seq_length, len(processor.tokenizer) <= SMOKE.model.vocab_size
    (16, True)
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    from vlmoe.models.tiny import _LLAVA_TEMPLATE
    from vlmoe.models.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=_LLAVA_TEMPLATE,
        vocab_size=size.vocab_size,
        corpus=["USER: ASSISTANT:", *corpus],
    )
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.lm_hidden,
        intermediate_size=size.lm_intermediate,
        num_hidden_layers=size.lm_layers,
        num_attention_heads=size.lm_heads,
        num_key_value_heads=size.lm_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        vision_feature_layer=-1,
    )
    config._attn_implementation = "sdpa"
    side = size.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.float(), processor
