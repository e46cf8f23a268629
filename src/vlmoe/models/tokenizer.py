"""A tiny byte-level BPE tokenizer trained in memory, so test models need no downloads."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Enough text for a few hundred merges; chart and VQA words so decoded samples read sensibly.
_CORPUS = [
    "What is shown in the image? The image shows a bar chart with four bars.",
    "What is the highest value in the chart? The highest value is 42.",
    "Describe the picture. A small red square on a white background.",
    "Answer with a single word or phrase. Yes. No. Red. Blue. Green.",
    "Write Python code that prints the sum of the values: print(3 + 4 + 5)",
    "The table has two columns, year and sales, and five rows of numbers 0 1 2 3 4 5 6 7 8 9.",
    "user assistant system: you are a helpful assistant that reads charts and answers questions.",
]


def tiny_tokenizer(
    special_tokens: list[str],
    *,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    extra_special_tokens: dict[str, str] | None = None,
    chat_template: str | None = None,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
) -> PreTrainedTokenizerFast:
    """Byte-level BPE over a built-in corpus (or `corpus`); `special_tokens` take ids 0, 1, ... in order.

    Byte-level means every string round-trips through encode/decode, however small the vocab.

    Example:
        >>> specials = ["<pad>", "<s>", "</s>"]
        >>> tok = tiny_tokenizer(specials, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
        >>> tok.decode(tok("a chart").input_ids)
        'a chart'
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS if corpus is None else corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=extra_special_tokens or {},
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast
