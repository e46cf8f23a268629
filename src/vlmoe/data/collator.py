"""Batch conversations for a vision-language model with its own processor and chat template.

Labels are -100 everywhere except the assistant replies: exactly the reply tokens and the
end-of-turn token. Each conversation is cut into parts at the template's turn boundaries
(prompt parts, reply parts) and every part is tokenized on its own, so the prompt tokens are the
ones the model sees at inference (where the prompt ends with the generation prompt) and the
supervised tokens decode exactly to the reply. Image placeholders become the template's image
items and the processor expands them (LLaVA's repeated `<image>`, Qwen2-VL's `<|image_pad|>`
run, Idefics3's tiled grid). Truncation never cuts inside image tokens.

Batch keys: the model inputs (input_ids, attention_mask, labels, pixel_values, ... as the
processor makes them) and the tags in `TAG_KEYS`, which training pops before the forward pass.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from vlmoe.data.conversations import IMAGE_PLACEHOLDER, ConversationSample

IGNORE_INDEX = -100
TAG_KEYS = ("sample_ids", "domains", "tasks", "cluster_ids")


def split_model_inputs(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model inputs, tags): the batch without and with the `TAG_KEYS` entries.

    >>> inputs, tags = split_model_inputs({"input_ids": 1, "domains": ["chart"], "tasks": [None],
    ...                                     "sample_ids": ["a"], "cluster_ids": [3]})
    >>> sorted(inputs), tags["domains"]
    (['input_ids'], ['chart'])
    """
    return {k: v for k, v in batch.items() if k not in TAG_KEYS}, {k: batch[k] for k in TAG_KEYS}


def _structured(content: str) -> list[dict[str, str]] | str:
    """`"<image>\\nWhat?"` -> [{"type": "image"}, {"type": "text", "text": "What?"}] (template items)."""
    if IMAGE_PLACEHOLDER not in content:
        return content
    items: list[dict[str, str]] = []
    for i, text in enumerate(content.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            items.append({"type": "image"})
        if text.strip():
            items.append({"type": "text", "text": text.strip()})
    return items


@dataclass
class _Encoded:
    ids: list[int]
    labels: list[int]
    image_outputs: list[dict[str, Any]]  # the processor's image tensors, one dict per part with images
    mm_token_types: bool  # the processor also returns per-token modality ids


@dataclass
class _Part:
    text: str
    supervised: bool
    num_images: int = 0


def _load_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")


@dataclass
class ConversationCollator:
    """Turns `ConversationSample`s into a padded training batch for `processor`'s model.

    max_length: cut longer samples after their last image token (text after it is dropped);
    a sample whose image tokens alone exceed it raises a ValueError naming the sample; one cut
    before its first reply token (nothing left to learn from) is warned about, once per sample,
    and counted in `unsupervised_samples`.

    >>> from vlmoe.models import tiny
    >>> from vlmoe.data.conversations import ConversationSample
    >>> _, processor = tiny("qwen2_vl")
    >>> sample = ConversationSample("s", [], [{"role": "user", "content": "2+2?"},
    ...                                       {"role": "assistant", "content": "4"}])
    >>> batch = ConversationCollator(processor)([sample])
    >>> processor.tokenizer.decode(batch["labels"][0][batch["labels"][0] != -100])
    '4<|im_end|>'
    """

    processor: Any
    max_length: int | None = None
    _image_token_ids: set[int] = field(init=False, default_factory=set)
    # Ids of samples truncated to no supervised token (their loss is 0: a silent waste otherwise).
    unsupervised_samples: set[str] = field(init=False, default_factory=set)

    def __post_init__(self) -> None:
        tokenizer = self.tokenizer
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before collating")
        # Tokens that belong to an image's expansion (never cut inside those).
        candidates = [
            getattr(self.processor, "image_token", None),
            getattr(self.processor, "fake_image_token", None),
            "<|vision_start|>",
            "<|vision_end|>",
            "<fake_token_around_image>",
            "<global-img>",
        ]
        vocab = tokenizer.get_vocab()
        self._image_token_ids = {vocab[t] for t in candidates if t is not None and t in vocab}

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )

    def _end_of_turn(self, after_reply: str) -> tuple[str, str]:
        """(end-of-turn text to supervise, rest) from the template's text after a reply.

        Templates that close a reply with a special token (`<|im_end|>`, `<end_of_utterance>`)
        keep it; templates that close with plain text (LLaVA's " ") get the EOS token, so the
        model learns to stop.
        """
        specials = [t for t in self.tokenizer.all_special_tokens if t]
        found = [(after_reply.find(t), t) for t in specials if after_reply.find(t) >= 0]
        if found:
            position, token = min(found)
            if not after_reply[:position].strip():
                end = position + len(token)
                return after_reply[:end], after_reply[end:]
        return self.tokenizer.eos_token, after_reply

    @staticmethod
    def _reply_end(sample: ConversationSample, turn: int, reply: str) -> int:
        """Where the reply text ends in the template's rendering of it (some templates trim it)."""
        content = sample.messages[turn]["content"]
        for text in (content, content.strip()):
            if text and text in reply:
                return reply.rfind(text) + len(text)
        raise ValueError(
            f"sample {sample.id!r} ({sample.source}:{sample.line}): turn {turn}'s text does not appear "
            "in the chat template's rendering of it, so its tokens cannot be labelled; use a template "
            "that writes assistant messages verbatim"
        )

    def _parts(self, sample: ConversationSample) -> list[_Part]:
        messages = [{"role": m["role"], "content": _structured(m["content"])} for m in sample.messages]
        parts: list[_Part] = []
        rendered = ""
        for i, message in enumerate(messages):
            num_images = sample.messages[i]["content"].count(IMAGE_PLACEHOLDER)
            full = self._render(messages[: i + 1], generation_prompt=False)
            if message["role"] == "assistant":
                prompt = self._render(messages[:i], generation_prompt=True)
                if not (prompt.startswith(rendered) and full.startswith(prompt)):
                    raise ValueError(
                        f"sample {sample.id!r}: the chat template does not render turn {i} as an extension "
                        "of the earlier turns, so assistant tokens cannot be located; use a template whose "
                        "output for a prefix of the conversation is a prefix of its output"
                    )
                reply = full[len(prompt) :]
                end = self._reply_end(sample, i, reply)
                end_of_turn, rest = self._end_of_turn(reply[end:])
                parts += [_Part(prompt[len(rendered) :], False), _Part(reply[:end] + end_of_turn, True)]
                if rest:
                    parts.append(_Part(rest, False))
            else:
                if not full.startswith(rendered):
                    raise ValueError(
                        f"sample {sample.id!r}: the chat template re-renders earlier turns differently"
                    )
                parts.append(_Part(full[len(rendered) :], False, num_images))
            rendered = full
        # Prompt text between two replies is tokenized as one piece, as it is at inference.
        merged: list[_Part] = []
        for part in parts:
            if merged and not part.supervised and not merged[-1].supervised:
                merged[-1] = _Part(
                    merged[-1].text + part.text, False, merged[-1].num_images + part.num_images
                )
            else:
                merged.append(part)
        return merged

    def _encode(self, sample: ConversationSample, images: list[Image.Image]) -> _Encoded:
        ids: list[int] = []
        labels: list[int] = []
        image_outputs: list[dict[str, Any]] = []
        mm_token_types = False
        next_image = 0
        for k, part in enumerate(self._parts(sample)):
            first = k == 0  # special tokens (BOS) once, as when the whole prompt is tokenized
            if part.num_images:
                part_images = images[next_image : next_image + part.num_images]
                next_image += part.num_images
                encoded = self.processor(
                    text=[part.text], images=[part_images], add_special_tokens=first, return_tensors="pt"
                )
                part_ids = encoded["input_ids"][0].tolist()
                image_outputs.append({k: v for k, v in encoded.items() if k not in _TEXT_KEYS})
                mm_token_types |= "mm_token_type_ids" in encoded
            else:
                part_ids = self.tokenizer(part.text, add_special_tokens=first)["input_ids"]
            ids += part_ids
            labels += part_ids if part.supervised else [IGNORE_INDEX] * len(part_ids)
        ids, labels = self._truncate(sample, ids, labels)
        return _Encoded(ids, labels, image_outputs, mm_token_types)

    def _truncate(
        self, sample: ConversationSample, ids: list[int], labels: list[int]
    ) -> tuple[list[int], list[int]]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids, labels
        image_end = max((i + 1 for i, t in enumerate(ids) if t in self._image_token_ids), default=0)
        if image_end > self.max_length:
            raise ValueError(
                f"sample {sample.id!r} ({sample.source}:{sample.line}): its image tokens reach position "
                f"{image_end} but max_length is {self.max_length}; raise max_length to at least {image_end} "
                "or give the processor smaller images"
            )
        labels = labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels) and sample.id not in self.unsupervised_samples:
            self.unsupervised_samples.add(sample.id)
            warnings.warn(
                f"sample {sample.id!r} ({sample.source}:{sample.line}): max_length {self.max_length} cuts it "
                f"before its first reply token ({len(ids)} tokens in all), so it teaches nothing; raise "
                "max_length or shorten the prompt",
                stacklevel=2,
            )
        return ids[: self.max_length], labels

    def __call__(self, samples: list[ConversationSample]) -> dict[str, Any]:
        images = [[_load_image(image) for image in sample.images] for sample in samples]
        encoded = [
            self._encode(sample, sample_images) for sample, sample_images in zip(samples, images, strict=True)
        ]
        length = max(len(e.ids) for e in encoded)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(samples), length), pad, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, e in enumerate(encoded):  # right padding, for training
            input_ids[row, : len(e.ids)] = torch.tensor(e.ids)
            labels[row, : len(e.ids)] = torch.tensor(e.labels)
            attention_mask[row, : len(e.ids)] = 1
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if any(images):
            # Each image is processed once, for its part, unless its tensors need the batch's padding.
            joined = _joined_image_inputs([output for e in encoded for output in e.image_outputs])
            if joined is None:
                joined = self._image_inputs(samples, images, input_ids)
            elif any(e.mm_token_types for e in encoded):
                joined["mm_token_type_ids"] = self._mm_token_type_ids(input_ids)
            batch.update(joined)
        batch["sample_ids"] = [s.id for s in samples]
        batch["domains"] = [s.domain for s in samples]
        batch["tasks"] = [s.task for s in samples]
        batch["cluster_ids"] = torch.tensor([-1 if s.cluster_id is None else s.cluster_id for s in samples])
        return batch

    def _mm_token_type_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Per-token modality ids must follow our token layout, not the processor's."""
        return torch.tensor(self.processor.create_mm_token_type_ids(input_ids.tolist()))

    def _image_inputs(
        self, samples: list[ConversationSample], images: list[list[Image.Image]], input_ids: torch.Tensor
    ) -> dict[str, Any]:
        """Pixel tensors from one processor call on the whole batch (so family-specific padding of
        tiles and image counts is the processor's), checked against the image tokens we placed.
        Used when the parts' own image outputs do not simply concatenate (`_joined_image_inputs`)."""
        texts = []
        for sample in samples:
            messages = [{"role": m["role"], "content": _structured(m["content"])} for m in sample.messages]
            texts.append(self._render(messages, generation_prompt=False))
        reference = self.processor(text=texts, images=images, padding=True, return_tensors="pt")
        image_token = getattr(self.processor, "image_token", IMAGE_PLACEHOLDER)
        image_token_id = self.tokenizer.convert_tokens_to_ids(image_token)
        for row, sample in enumerate(samples):
            ours = int((input_ids[row] == image_token_id).sum())
            theirs = int((reference["input_ids"][row] == image_token_id).sum())
            if ours != theirs:
                raise ValueError(
                    f"sample {sample.id!r}: {ours} image tokens after truncation but the processor makes "
                    f"{theirs}; raise max_length so no image is cut"
                )
        inputs = {k: v for k, v in reference.items() if k not in ("input_ids", "attention_mask")}
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = self._mm_token_type_ids(input_ids)
        return inputs


# What a processor call returns about the text; the rest describes the images.
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids"}
# Image outputs whose rows, one block per image, concatenate along dim 0 into exactly what one
# processor call over the whole batch returns (LLaVA's and Qwen2-VL's pixels, sizes, grids).
_ROW_KEYS = {"pixel_values", "image_sizes", "image_grid_thw"}


def _joined_image_inputs(outputs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The batch's image inputs from the parts' processor outputs, in sample and part order, so
    each image is processed once. None when the outputs have other keys or rows of different
    shapes (Idefics3's tiles and pixel masks, LLaVA-NeXT's patch counts of unequal images): the
    processor pads those across the batch, and one processor call over the batch does it."""
    if not outputs:
        return None
    keys = set(outputs[0])
    if "pixel_values" not in keys or not keys <= _ROW_KEYS:
        return None
    for output in outputs:
        if set(output) != keys:
            return None
        if not all(isinstance(output[k], torch.Tensor) for k in keys):
            return None
    for key in keys:
        if len({tuple(output[key].shape[1:]) for output in outputs}) != 1:
            return None
    return {key: torch.cat([output[key] for output in outputs]) for key in sorted(keys)}
