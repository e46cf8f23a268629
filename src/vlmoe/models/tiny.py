"""Tiny random vision-language models with working processors, built locally (no downloads).

Each family gets a model with hidden size 32-64 and 2 LM layers, a byte-level BPE tokenizer
trained in memory (`vlmoe.models.tokenizer`), the family's own image processor sized for 28-56
pixel images, and a chat template. Deterministic for a seed; float32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel, ProcessorMixin

from vlmoe.models.tokenizer import tiny_tokenizer

VOCAB_SIZE = 512
TINY_FAMILIES = ("llava", "llava_next", "qwen2_vl", "idefics3")

# One small Llama-style LM shared by the families whose LM is Llama.
_LLAMA_TEXT = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)
_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
    projection_dim=32,
)

# LLaVA-1.5's conversation format; content is a string or a list of {"type": "image"|"text"}.
_LLAVA_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>"
    "{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def tiny(family: str, seed: int = 0) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A tiny random model of `family` and a processor whose outputs it accepts.

    Example:
        >>> from PIL import Image
        >>> model, processor = tiny("llava")
        >>> prompt = "USER: <image>\\nWhat is it? ASSISTANT:"
        >>> inputs = processor(text=prompt, images=Image.new("RGB", (28, 28)), return_tensors="pt")
        >>> model(**inputs).logits.shape[-1]
        512
    """
    builders: dict[str, Callable[[], tuple[PreTrainedModel, ProcessorMixin]]] = {
        "llava": _llava,
        "llava_next": _llava_next,
        "qwen2_vl": _qwen2_vl,
        "idefics3": _idefics3,
    }
    if family not in builders:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {list(TINY_FAMILIES)}")
    # The tokenizer is built before seeding so the model's init depends only on `seed`.
    torch.manual_seed(seed)
    model, processor = builders[family]()
    return model.float().eval(), processor


def _seeded_model(model_class: type[PreTrainedModel], config) -> PreTrainedModel:
    # Attention over eager kernels keeps CPU logits reproducible between the dense and the
    # surgered model (sdpa may pick different paths for different shapes).
    config._attn_implementation = "eager"
    return model_class(config)


def _llava_tokenizer():
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    return tiny_tokenizer(
        specials,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=_LLAVA_TEMPLATE,
        vocab_size=VOCAB_SIZE,
    )


def _llava() -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    tokenizer = _llava_tokenizer()
    image_size, patch_size = _CLIP_VISION["image_size"], _CLIP_VISION["patch_size"]
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_CLIP_VISION),
        text_config=LlamaConfig(**_LLAMA_TEXT, pad_token_id=3, bos_token_id=1, eos_token_id=2),
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    return _seeded_model(LlavaForConditionalGeneration, config), processor


def _llava_next() -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextForConditionalGeneration
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    tokenizer = _llava_tokenizer()
    image_size, patch_size = _CLIP_VISION["image_size"], _CLIP_VISION["patch_size"]
    pinpoints = [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_CLIP_VISION),
        text_config=LlamaConfig(**_LLAMA_TEXT, pad_token_id=3, bos_token_id=1, eos_token_id=2),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_layer=-1,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,
    )
    return _seeded_model(LlavaNextForConditionalGeneration, config), processor


def _qwen2_vl() -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    specials += ["<|image_pad|>", "<|video_pad|>"]
    tokenizer = tiny_tokenizer(
        specials,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        chat_template=_QWEN_TEMPLATE,
        vocab_size=VOCAB_SIZE,
    )
    ids = tokenizer.convert_tokens_to_ids
    text = dict(_LLAMA_TEXT, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    text.pop("tie_word_embeddings")
    config = Qwen2VLConfig(
        text_config=dict(text, bos_token_id=0, eos_token_id=2, pad_token_id=0),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=32, num_heads=4, patch_size=14, spatial_merge_size=2
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=28 * 28, max_pixels=56 * 56, patch_size=14, merge_size=2
    )
    processor = _image_only(Qwen2VLProcessor)(image_processor, tokenizer, chat_template=_QWEN_TEMPLATE)
    return _seeded_model(Qwen2VLForConditionalGeneration, config), processor


def _image_only(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class` without its video processor.

    Qwen2-VL's processor requires a video processor, and those need torchvision, which vlmoe
    does not depend on. Images never touch the video processor, so a subclass that does not
    declare it processes images and text exactly as the stock processor does.
    """

    class ImageOnlyProcessor(processor_class):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            self.image_token = tokenizer.image_token
            self.video_token = tokenizer.video_token
            self.image_token_id = tokenizer.image_token_id
            self.video_token_id = tokenizer.video_token_id
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = f"ImageOnly{processor_class.__name__}"
    return ImageOnlyProcessor


def _idefics3() -> tuple[PreTrainedModel, ProcessorMixin]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    from transformers.models.idefics3.processing_idefics3 import Idefics3Processor

    grid_tokens = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>"]
    specials += ["<global-img>", *grid_tokens]
    tokenizer = tiny_tokenizer(
        specials,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=_IDEFICS3_TEMPLATE,
        vocab_size=VOCAB_SIZE,
    )
    image_size, patch_size, scale_factor = 28, 7, 2
    config = Idefics3Config(
        text_config=dict(_LLAMA_TEXT, model_type="llama", pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch_size,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale_factor,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=_IDEFICS3_TEMPLATE,
    )
    return _seeded_model(Idefics3ForConditionalGeneration, config), processor
