"""Qwen-1's and StableLM-2's tiktoken files read without their remote code, checked against tiktoken's
algorithm written here: split with their regex, then merge the adjacent pair whose join ranks lowest."""

import itertools

import pytest
import regex

from tests.interop.moe_llava_checkpoints import write_moe_llava, write_vision_tower
from tests.interop.tiny_tokenizers import TIKTOKEN_SIZE, write_tiktoken
from vlmoe.interop import import_moe_llava
from vlmoe.interop.tiktoken_files import _PATTERN, read_ranks, read_tiktoken

TEXT = "What is shown in the image? The image shows a bar chart with four bars.\nAnswer: 42 apples"


def _tiktoken_encode(ranks, text):
    ids = []
    for word in regex.findall(_PATTERN, text):
        parts = [bytes([b]) for b in word.encode()]
        while True:
            pairs = [
                (ranks[a + b], i) for i, (a, b) in enumerate(itertools.pairwise(parts)) if a + b in ranks
            ]
            if not pairs:
                break
            _, i = min(pairs)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[part] for part in parts]
    return ids


@pytest.mark.parametrize(
    ("file_name", "specials"),
    [
        ("qwen.tiktoken", {"<|endoftext|>": 0, "<|im_start|>": 1, "<|extra_0|>": 3, "<|extra_204|>": 207}),
        ("arcade100k.tiktoken", {"<|endoftext|>": 0, "<|im_end|>": 21, "<|reg0|>": 23, "<|extra0|>": 31}),
    ],
)
def test_a_tiktoken_file_reads_as_their_tokenizer(tmp_path, file_name, specials):
    file = write_tiktoken(tmp_path, file_name) / file_name
    tokenizer = read_tiktoken(file)
    ranks = read_ranks(file)
    assert len(ranks) == TIKTOKEN_SIZE
    assert tokenizer(TEXT).input_ids == _tiktoken_encode(ranks, TEXT)  # no BOS, same BPE
    assert tokenizer.decode(tokenizer(TEXT).input_ids) == TEXT
    for token, offset in specials.items():  # appended after the ranks in their classes' order
        assert tokenizer.convert_tokens_to_ids(token) == TIKTOKEN_SIZE + offset
    assert tokenizer("a<|endoftext|>").input_ids[-1] == TIKTOKEN_SIZE  # specials are never split
    assert tokenizer.pad_token == tokenizer.unk_token != tokenizer.eos_token == "<|endoftext|>"


@pytest.mark.parametrize("family", ["qwen1", "stablelm"])
def test_their_qwen1_and_stablelm_checkpoints_import_with_their_own_tokenizer(tmp_path, family):
    write_moe_llava(tmp_path / "ckpt", family)
    model, processor = import_moe_llava(tmp_path / "ckpt", write_vision_tower(tmp_path / "clip"))
    specials = 208 if family == "qwen1" else 32
    assert model.config.image_token_id == processor.image_token_id == TIKTOKEN_SIZE + specials
    assert processor.tokenizer.convert_tokens_to_ids("<|endoftext|>") == TIKTOKEN_SIZE


def test_a_damaged_tiktoken_file_names_the_line(tmp_path):
    file = write_tiktoken(tmp_path, "qwen.tiktoken") / "qwen.tiktoken"
    lines = file.read_text().splitlines()
    file.write_text("\n".join([*lines[:5], "not base64!", *lines[5:]]))
    with pytest.raises(ValueError, match=r"qwen.tiktoken:6: not a 'base64-token rank' line"):
        read_tiktoken(file)
    file.write_text("\n".join(lines[1:]))
    with pytest.raises(ValueError, match="ranks are not 0"):
        read_tiktoken(file)
