"""The processor of an imported model: the checkpoint's tokenizer with the image token at the id the
model uses, the vision tower's image processor, and the conversation format it was trained with.

Both projects keep their prompt format in code (`conversation.py`: `SeparatorStyle.TWO`, i.e.
`SYSTEM USER: <image>\\nQ ASSISTANT: A<sep2>USER: ...`) and their image preprocessing in the tower
directory (`preprocessor_config.json`, with the image padded to a square of the mean colour
first). Here both become a stock `LlavaProcessor` with a chat template, so `vlmoe train` / `eval`
and `AutoProcessor.from_pretrained(DST)` use the imported model as it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from transformers import AutoTokenizer, CLIPVisionConfig, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor
from transformers.utils import logging as hf_logging

from vlmoe.interop.tiktoken_files import TIKTOKEN_FILES, read_tiktoken
from vlmoe.models.checkpoint import read_json_object

IMAGE_TOKEN = "<image>"
_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# The JSON files AutoTokenizer reads; damaged, transformers and tokenizers fail on them with an
# AttributeError, a TypeError or a bare Exception that names no file.
_TOKENIZER_JSON_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json")
# Image processor settings a tower's preprocessor_config.json may carry that LLaVA's takes too.
_IMAGE_FIELDS = (
    "size",
    "crop_size",
    "do_resize",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "resample",
    "do_convert_rgb",
)


@dataclass(frozen=True)
class ConversationFormat:
    """One of their `SeparatorStyle.TWO` conversations: `system` + `user_end`, then turns
    `USER: text` + `user_end` and `ASSISTANT: text` + `reply_end`; `image` is what an image
    becomes (`<image>` stands for the processor's image token). Images come before the text of
    their turn, as their preprocessing moves them."""

    name: str
    reply_end: str
    generation_prompt: str = "ASSISTANT:"
    image: str = IMAGE_TOKEN + "\n"
    user_end: str = " "
    system: str = _SYSTEM

    def chat_template(self, image_token: str = IMAGE_TOKEN) -> str:
        """A Jinja chat template rendering their prompt string (a system message replaces theirs).

        Example:
            >>> from jinja2 import Template
            >>> text = Template(CONVERSATIONS["phi"].chat_template()).render(
            ...     messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
            >>> text.endswith("questions. USER: Hi ASSISTANT:")
            True
        """
        image = self.image.replace(IMAGE_TOKEN, image_token)
        return (
            "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
            "{% set turns = messages[1:] %}{% else %}"
            + self.system
            + "{% set turns = messages %}{% endif %}"
            + self.user_end
            + "{% for message in turns %}"
            "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for item in message['content'] %}{% if item['type'] == 'image' %}" + image + "{% endif %}"
            "{% endfor %}{{ message['content'] | selectattr('type', 'equalto', 'text') "
            "| map(attribute='text') | join(' ') }}{% endif %}"
            "{% if message['role'] == 'user' %}"
            + self.user_end
            + "{% else %}"
            + self.reply_end
            + "{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}" + self.generation_prompt + "{% endif %}"
        )


# MoE-LLaVA's conv_templates by --version (moellava/conversation.py; "qwen" is their conv_phi), and
# LLaVA-MoLE's build_chat_input (vicuna_conversation.py: sep2 "</s> ", "ASSISTANT: " with a space,
# "<image>\n" cut out of the text and the image wrapped in its learned start/end vectors).
CONVERSATIONS = {
    "phi": ConversationFormat("phi", "<|endoftext|>"),
    "qwen": ConversationFormat("qwen", "<|endoftext|>"),
    "stablelm": ConversationFormat("stablelm", "<|endoftext|>"),
    "v1": ConversationFormat("v1", "</s>"),
    "mistral": ConversationFormat("mistral", "</s>"),
    "openchat": ConversationFormat("openchat", "<|end_of_turn|>"),
    "llava-mole": ConversationFormat(
        "llava-mole", "</s> ", generation_prompt="ASSISTANT: ", image="<im_start>" + IMAGE_TOKEN + "<im_end>"
    ),
}


def conversation(name: str) -> ConversationFormat:
    if name not in CONVERSATIONS:
        raise ValueError(f"unknown conversation format {name!r}; known: {sorted(CONVERSATIONS)}")
    return CONVERSATIONS[name]


def read_tokenizer(path: str | Path, whose: str) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path` (`whose` names the directory's role in errors), with a pad token.

    What stock transformers reads without remote code (tokenizer.json, vocab.json + merges.txt, a
    SentencePiece tokenizer.model with the `sentencepiece` package), or Qwen-1's / StableLM-2's
    tiktoken file (`tiktoken_files.py`).
    """
    path = Path(path)
    fix = "or pass --tokenizer DIR (tokenizer= in Python) with the tokenizer it was trained with"
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        known = [path / name for name in TIKTOKEN_FILES if (path / name).is_file()]
        if known:
            return read_tiktoken(known[0])
        tiktoken = sorted(p.name for p in path.glob("*.tiktoken")) if path.is_dir() else []
        if tiktoken:
            raise FileNotFoundError(
                f"{path / tiktoken[0]}: a tiktoken tokenizer vlmoe does not know (it reads "
                f"{', '.join(TIKTOKEN_FILES)}); convert it to a tokenizer.json, {fix}"
            )
        raise FileNotFoundError(
            f"{path} ({whose}) has no tokenizer files ({', '.join(_TOKENIZER_FILES)} with "
            f"tokenizer_config.json, or {' / '.join(TIKTOKEN_FILES)}): copy them from the published "
            f"checkpoint, {fix}"
        )
    for name in _TOKENIZER_JSON_FILES:
        if (path / name).is_file():
            read_json_object(path / name, f"copy it again from the published checkpoint, {fix}")
    # AutoTokenizer also reads the folder's config.json, whose model_type is MoE-LLaVA's own
    # (moe_llava_phi, ...), to guess a tokenizer class, and warns that it instantiates a model of
    # another type; no model is built from it here, so that warning is silenced for this call.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, ImportError) as error:
        raise ValueError(f"{path}: transformers cannot read this tokenizer ({error}); {fix}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if tokenizer.pad_token is None:  # their training pads with the unk token (MoE-LLaVA sets pad = unk)
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def add_image_token(
    tokenizer: PreTrainedTokenizerBase, image_token_id: int | None, vocab_size: int, where: str
) -> tuple[str, int]:
    """(image token, its id): the tokenizer's `<image>` if it has one, else `<image>` added at id
    `len(tokenizer)`; an explicit `image_token_id` must be that id or one of the tokenizer's own
    added special tokens (which then stands for the image). The id may equal `vocab_size` (the
    model then appends one row) but not exceed it."""
    if len(tokenizer) > vocab_size:
        raise ValueError(
            f"{where}: the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embedding "
            "rows: it is not this checkpoint's tokenizer"
        )
    existing = tokenizer.get_vocab().get(IMAGE_TOKEN)
    if image_token_id is None or (image_token_id == len(tokenizer) and existing is None):
        if existing is None:
            tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        return IMAGE_TOKEN, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id == existing:
        return IMAGE_TOKEN, existing
    added = tokenizer.added_tokens_decoder.get(image_token_id)
    if added is None or not added.special:
        raise ValueError(
            f"{where}: image_token_id {image_token_id} is not a special token of the tokenizer, so no prompt "
            f"text can produce it; leave it out (vlmoe adds {IMAGE_TOKEN} at id {len(tokenizer)}) or give "
            "the id of one of its unused special tokens"
        )
    return added.content, image_token_id


def image_processor_for(
    tower_dir: str | Path, vision_config: PretrainedConfig, pad: bool
) -> LlavaImageProcessorPil:
    """LLaVA's image processor with the tower's preprocessing (preprocessor_config.json); `pad` pads
    to a square of the mean colour first, as their `image_aspect_ratio: pad` does."""
    config_file = Path(tower_dir) / "preprocessor_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} is missing: the tower's image preprocessing (size, crop, normalisation) comes "
            "from it; copy preprocessor_config.json from the tower's published repository into that directory"
        )
    settings = read_json_object(config_file, "copy it again from the tower's published repository")
    fields = {key: settings[key] for key in _IMAGE_FIELDS if key in settings}
    # CLIP crops (its config says so); SigLIP resizes to height x width and has no crop.
    processor = LlavaImageProcessorPil(
        **fields, do_center_crop=settings.get("do_center_crop", False), do_pad=pad
    )
    side = vision_config.image_size
    pixels = processor(Image.new("RGB", (2 * side, side)), return_tensors="pt")["pixel_values"]
    if tuple(pixels.shape[-2:]) != (side, side):
        raise ValueError(
            f"{config_file}: its settings give {tuple(pixels.shape[-2:])} images but the tower takes "
            f"{side}x{side}; it belongs to another tower"
        )
    return processor


def llava_processor(
    tokenizer: PreTrainedTokenizerBase,
    image_processor: LlavaImageProcessorPil,
    vision_config: PretrainedConfig,
    strategy: str,
    conversation_format: ConversationFormat,
    image_token: str = IMAGE_TOKEN,
) -> LlavaProcessor:
    """A LlavaProcessor whose `<image>` expands to as many tokens as the model has image features."""
    template = conversation_format.chat_template(image_token)
    tokenizer.chat_template = template
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        chat_template=template,
        image_token=image_token,
        # CLIP puts a class token before the patches; "default" drops the first token in either case.
        num_additional_image_tokens=int(isinstance(vision_config, CLIPVisionConfig)),
    )
