"""Import published sparse VLM checkpoints (MoE-LLaVA, LLaVA-MoLE) into vlmoe models that run on
stock transformers: no DeepSpeed, no forked modeling files, no remote code."""

from vlmoe.interop.llava_mole import import_llava_mole
from vlmoe.interop.moe_llava import import_moe_llava

__all__ = ["import_llava_mole", "import_moe_llava"]
