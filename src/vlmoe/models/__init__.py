"""Surgery on Hugging Face vision-language models: family adapters, MoE/MoLE/connector surgery,
save/load with the surgery recorded in `config.json`, export to standard HF MoE architectures,
and a tiny-model factory for tests and the demo."""

from vlmoe.models.tiny import TINY_FAMILIES, tiny

__all__ = ["TINY_FAMILIES", "tiny"]
