"""Batched generation for any HF vision-language model (dense or sparse) with its processor.

Left padding (so every row's last prompt token sits at the end and new tokens line up), the KV
cache, greedy or sampled decoding, stop strings, a progress bar, and a fixed seed per batch so a
rerun with the same settings gives the same text.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn

from vlmoe.moe import routing_inputs


@dataclass(frozen=True)
class GenerationSettings:
    """How to decode. Greedy unless `do_sample`; `stop_strings` end an answer (and are cut off).

    `static_cache` (opt-in): a preallocated KV cache, with which transformers compiles the
    decoding step on CUDA (torch.compile, fullgraph, CUDA graphs). The first batch pays the
    compilation; later steps skip the per-kernel launch cost (benchmarks/README.md).
    """

    max_new_tokens: int = 64
    batch_size: int = 8
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int = 0
    static_cache: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(
                f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens} and {self.batch_size}"
            )
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")


def chat_prompt(processor, text: str, num_images: int) -> str:
    """The model's own chat format for one user turn with `num_images` images, ready to answer.

    Example:
        >>> from vlmoe.models import tiny
        >>> chat_prompt(tiny("llava")[1], "What is shown?", 1)
        'USER: <image>\\nWhat is shown? ASSISTANT:'
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat_template, so vlmoe cannot format prompts for it; "
            "save the model's processor with its chat template (processor.save_pretrained(model_dir))"
        )
    content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def generate(
    model: nn.Module,
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    settings: GenerationSettings | None = None,
    progress: bool = True,
    cluster_ids: Sequence[int] | None = None,
) -> list[str]:
    """Answer each (prompt, images) pair; prompts already in the model's chat format (`chat_prompt`).

    `cluster_ids` (one per prompt) routes a MoCLE model; `vlmoe.eval.clusters` assigns them.

    Example:
        >>> from PIL import Image
        >>> from vlmoe.models import tiny
        >>> model, processor = tiny("llava")
        >>> prompt = chat_prompt(processor, "What is it?", 1)
        >>> answers = generate(model, processor, [prompt], [[Image.new("RGB", (28, 28))]],
        ...                    GenerationSettings(max_new_tokens=4), progress=False)
        >>> len(answers)
        1
    """
    if len(prompts) != len(images):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(images)} image lists")
    if cluster_ids is not None and len(cluster_ids) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(cluster_ids)} cluster ids")
    settings = settings or GenerationSettings()
    answers: list[str] = []
    batches = range(0, len(prompts), settings.batch_size)
    for batch_index, start in enumerate(progress_bar(batches, "generating", progress)):
        stop = start + settings.batch_size
        clusters = None if cluster_ids is None else cluster_ids[start:stop]
        answers += generate_batch(
            model, processor, prompts[start:stop], images[start:stop], settings, batch_index, clusters
        )
    return answers


def generate_batch(
    model: nn.Module,
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    settings: GenerationSettings,
    batch_index: int = 0,
    cluster_ids: Sequence[int] | None = None,
) -> list[str]:
    """One left-padded batch through `model.generate`; returns the decoded new text per row.

    Example:
        >>> from vlmoe.models import tiny
        >>> model, processor = tiny("llava")
        >>> prompts = [chat_prompt(processor, "Hi", 0), chat_prompt(processor, "What is it?", 1)]
        >>> texts = generate_batch(model, processor, prompts, [[], [Image.new("RGB", (28, 28))]],
        ...                        GenerationSettings(max_new_tokens=3))
        >>> len(texts)
        2
    """
    new_tokens = generate_token_ids(model, processor, prompts, images, settings, batch_index, cluster_ids)
    texts = processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [_cut_at_stop(text, settings.stop_strings).strip() for text in texts]


@torch.inference_mode()
def generate_token_ids(
    model: nn.Module,
    processor,
    prompts: Sequence[str],
    images: Sequence[Sequence[Image.Image]],
    settings: GenerationSettings,
    batch_index: int = 0,
    cluster_ids: Sequence[int] | None = None,
) -> torch.Tensor:
    """The new tokens of one left-padded batch. # [batch, <= max_new_tokens]

    `cluster_ids` # [batch]: each prompt's instruction cluster, for a MoCLE model.

    Example:
        >>> from vlmoe.models import tiny
        >>> model, processor = tiny("llava")
        >>> ids = generate_token_ids(model, processor, [chat_prompt(processor, "Hi", 0)], [[]],
        ...                          GenerationSettings(max_new_tokens=3))
        >>> ids.shape
        torch.Size([1, 3])
    """
    tokenizer = processor.tokenizer
    with _left_padding(tokenizer):
        inputs = processor(
            text=list(prompts),
            images=[list(row) for row in images] if any(images) else None,
            return_tensors="pt",
            padding=True,
        )
    reference = next(model.parameters())
    inputs = inputs.to(device=reference.device, dtype=reference.dtype)  # dtype: floating tensors only
    # Seeded per batch: reruns (and resumed runs with the same batch size) sample the same text.
    torch.manual_seed(settings.seed + batch_index)
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p} if settings.do_sample else {}
    eos = tokenizer.eos_token_id
    # Sparse layers learn which positions are padding, so padding takes no expert capacity;
    # eval mode turns off dropout and router jitter even when a training loop calls this.
    clusters = None if cluster_ids is None else torch.tensor(list(cluster_ids), device=reference.device)
    routing = routing_inputs(model, attention_mask=inputs["attention_mask"], cluster_ids=clusters)
    with _eval_mode(model), routing:
        sequences = model.generate(
            **inputs,
            max_new_tokens=settings.max_new_tokens,
            do_sample=settings.do_sample,
            use_cache=True,
            stop_strings=list(settings.stop_strings) or None,
            tokenizer=tokenizer if settings.stop_strings else None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
            **({"cache_implementation": "static"} if settings.static_cache else {}),
            **sampling,
        )
    return sequences[:, inputs["input_ids"].shape[1] :]


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cuts = [text.find(stop) for stop in stop_strings if stop and stop in text]
    return text[: min(cuts)] if cuts else text


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@contextmanager
def _left_padding(tokenizer) -> Iterator[None]:
    previous = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = previous


def progress_bar(items: Sequence, description: str, enabled: bool = True) -> Iterator:
    """`items`, with a rich progress bar on screen while they are consumed (when `enabled`)."""
    if not enabled:
        yield from items
        return
    from rich.progress import track

    yield from track(items, description=description, transient=True)
