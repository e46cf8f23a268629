"""Tiny tokenizer and image-processor files in the layouts the published checkpoints ship.

- Phi-2 / Qwen1.5 (MoE-LLaVA saves its slow tokenizer): vocab.json, merges.txt, tokenizer_config.json,
  special_tokens_map.json, with their training's added `<|extra_0|>` as unk and pad.
- StableLM-2 / Qwen-1: a `*.tiktoken` file read by their remote-code tokenizer class (`TIKTOKEN_SIZE`
  ranks, then their fixed special tokens).
- Vicuna (LLaVA-MoLE's base LLM): a transformers tokenizer.json (the hub's tokenizer.model needs
  `sentencepiece`, which the test environment does not have).
- CLIP / SigLIP towers: preprocessor_config.json as the hub repositories have it.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from transformers.convert_slow_tokenizer import bytes_to_unicode

from vlmoe.models.tokenizer import tiny_tokenizer

TRAINED = 300  # byte-level BPE size: 256 bytes, the specials and some merges
TIKTOKEN_SIZE = TRAINED - 1  # the same BPE without its special token
EXTRA = "<|extra_0|>"  # MoE-LLaVA's training adds it as unk (= pad) for Phi and Qwen
_FAMILY = {  # (tokenizer class in tokenizer_config.json, tokens at ids 0.., eos)
    "phi": ("CodeGenTokenizer", ["<|endoftext|>"], "<|endoftext|>"),
    "qwen1_5": ("Qwen2Tokenizer", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|endoftext|>"),
}


def write_gpt2_style(folder: Path, family: str = "phi", size: int | None = None) -> Path:
    """The slow-tokenizer files of a Phi-2 or Qwen1.5 MoE-LLaVA checkpoint; `size` pads the
    tokenizer with unused special tokens up to that many tokens."""
    tokenizer_class, specials, eos = _FAMILY[family]
    tokenizer = tiny_tokenizer(specials, bos_token=eos, eos_token=eos, pad_token=eos, vocab_size=TRAINED)
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = ["#version: 0.2"] + [" ".join(pair) for pair in model["merges"]]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    added = [EXTRA] + [f"<|extra_{i}|>" for i in range(1, (size or 0) - len(model["vocab"]))]
    decoder = {str(model["vocab"][t]): _added(t) for t in specials}
    decoder.update({str(len(model["vocab"]) + i): _added(t) for i, t in enumerate(added)})
    special = {"bos_token": eos, "eos_token": eos, "unk_token": EXTRA, "pad_token": EXTRA}
    config = {"tokenizer_class": tokenizer_class, "add_prefix_space": False, "model_max_length": 2048}
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, **special, "added_tokens_decoder": decoder})
    )
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    return folder


def _added(content: str) -> dict:
    return {
        "content": content,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "single_word": False,
        "special": True,
    }


def write_tiktoken(folder: Path, file_name: str) -> Path:
    """A `.tiktoken` file (base64 token bytes and rank 0..N-1 per line; their classes append the
    special tokens after it) and the remote-code tokenizer_config.json their training saved."""
    tokenizer = tiny_tokenizer(
        ["<|endoftext|>"],
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        vocab_size=TRAINED,
    )
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["vocab"]
    tokens = [
        token for token, _ in sorted(vocab.items(), key=lambda item: item[1]) if token != "<|endoftext|>"
    ]
    lines = [
        f"{base64.b64encode(bytes(byte_of[c] for c in token)).decode()} {rank}"
        for rank, token in enumerate(tokens)
    ]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / file_name).write_text("\n".join(lines) + "\n")
    name = "QWenTokenizer" if file_name == "qwen.tiktoken" else "Arcade100kTokenizer"
    module = "tokenization_qwen" if file_name == "qwen.tiktoken" else "tokenization_arcade100k"
    config = {"tokenizer_class": name, "auto_map": {"AutoTokenizer": [f"{module}.{name}", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def write_vicuna_tokenizer(folder: Path) -> Path:
    """A Llama-style tokenizer (<unk>, <s>, </s> at 0-2) saved by transformers: tokenizer.json and
    tokenizer_config.json. Returns the folder; the tokenizer has `TRAINED` tokens."""
    tokenizer = tiny_tokenizer(
        ["<unk>", "<s>", "</s>"], bos_token="<s>", eos_token="</s>", pad_token="<unk>", vocab_size=TRAINED
    )
    tokenizer.unk_token = "<unk>"
    tokenizer.save_pretrained(folder)
    return folder


def write_preprocessor_config(folder: Path, image_size: int, siglip: bool = False) -> Path:
    """The tower's preprocessor_config.json, with the fields and values its hub repository has."""
    if siglip:
        config = {
            "do_normalize": True,
            "do_rescale": True,
            "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5],
            "image_processor_type": "SiglipImageProcessor",
            "image_std": [0.5, 0.5, 0.5],
            "processor_class": "SiglipProcessor",
            "resample": 3,
            "rescale_factor": 1 / 255,
            "size": {"height": image_size, "width": image_size},
        }
    else:
        config = {
            "crop_size": image_size,
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "CLIPFeatureExtractor",
            "image_mean": [0.48145466, 0.4578275, 0.40821073],
            "image_std": [0.26862954, 0.26130258, 0.27577711],
            "resample": 3,
            "size": image_size,
        }
    (folder / "preprocessor_config.json").write_text(json.dumps(config, indent=2))
    return folder
