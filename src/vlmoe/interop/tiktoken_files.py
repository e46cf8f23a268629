"""The tiktoken tokenizers of MoE-LLaVA-Qwen (Qwen-1, `qwen.tiktoken`) and MoE-LLaVA-StableLM
(StableLM-2, `arcade100k.tiktoken`), read without their remote-code tokenizer classes.

A `.tiktoken` file is one `base64(token bytes) rank` line per BPE token. transformers'
`TikTokenConverter` rebuilds the byte-level BPE from the ranks (merges in rank order) with the
pre-tokenizing regex; the special tokens are not in the file: their classes append a fixed list
right after the last rank (Qwen-1: from 151643, StableLM-2's Arcade100k: from 100257), which is
what appending them in order does here. Neither adds a BOS token.
"""

from __future__ import annotations

import base64
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

# The split regex both classes use (tokenization_qwen.py PAT_STR, tokenization_arcade100k.py pat_str):
# digits one at a time, unlike GPT-4's \p{N}{1,3}.
_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)
_QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
_ARCADE = (
    ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
    + ["<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>"]
    + ["<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>"]
    + ["<commit_msg>", "<commit_after>", "<reponame>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>"]
    + ["<|pause|>"]
    + [f"<|reg{i}|>" for i in range(8)]
    + ["<|extra0|>"]
)
# File name -> (special tokens in id order, roles as MoE-LLaVA's training set them: eos <|endoftext|>,
# unk <|extra_0|> (Qwen) / <|reg0|> (StableLM), pad = unk).
TIKTOKEN_FILES = {
    "qwen.tiktoken": (_QWEN, {"eos_token": "<|endoftext|>", "unk_token": "<|extra_0|>"}),
    "arcade100k.tiktoken": (_ARCADE, {"eos_token": "<|endoftext|>", "unk_token": "<|reg0|>"}),
}


class _FileConverter(TikTokenConverter):
    """TikTokenConverter reading the ranks itself (it would otherwise need the `tiktoken` package)."""

    @staticmethod
    def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
        return read_ranks(Path(tiktoken_url))


def read_ranks(file: Path) -> dict[bytes, int]:
    """{token bytes: rank} of a `.tiktoken` file; ranks must be 0..N-1 (the specials follow them)."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(file.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(
                f"{file}:{number}: not a 'base64-token rank' line; the file is damaged"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{file}: ranks are not 0..{len(ranks) - 1}, so the special tokens' ids are unknown")
    return ranks


def read_tiktoken(file: Path) -> PreTrainedTokenizerFast:
    """A fast tokenizer equal to their tiktoken class for `file` (qwen.tiktoken or arcade100k.tiktoken).

    Example:
        >>> tokenizer = read_tiktoken(Path("MoE-LLaVA-Qwen-1.8B-4e/qwen.tiktoken"))  # doctest: +SKIP
        >>> tokenizer.convert_tokens_to_ids("<|endoftext|>")  # doctest: +SKIP
        151643
    """
    if file.name not in TIKTOKEN_FILES:
        raise ValueError(
            f"{file}: vlmoe reads {sorted(TIKTOKEN_FILES)}; for another tiktoken file pass --tokenizer"
        )
    specials, roles = TIKTOKEN_FILES[file.name]
    backend = _FileConverter(str(file), pattern=_PATTERN, extra_special_tokens=specials).converted()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=roles["unk_token"], **roles)
