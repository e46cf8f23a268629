"""Surgery on Hugging Face vision-language models: family adapters, MoE/MoLE/connector surgery,
save/load with the surgery recorded in `config.json`, export to standard HF MoE architectures,
and a tiny-model factory for tests and the demo."""

from vlmoe.models.card import CardInfo, model_card
from vlmoe.models.checkpoint import load, save
from vlmoe.models.export import export_hf
from vlmoe.models.families import ADAPTERS, FamilyAdapter, adapter_for
from vlmoe.models.parts import (
    PARTS,
    ParameterReport,
    freeze,
    parameter_parts,
    parameter_report,
    set_trainable,
    unfreeze,
)
from vlmoe.models.record import SurgeryRecord, read_record
from vlmoe.models.surgery import add_mole, install_moe_connector, merge_lora, upcycle_ffn
from vlmoe.models.tiny import TINY_FAMILIES, tiny

__all__ = [
    "ADAPTERS",
    "PARTS",
    "TINY_FAMILIES",
    "CardInfo",
    "FamilyAdapter",
    "ParameterReport",
    "SurgeryRecord",
    "adapter_for",
    "add_mole",
    "export_hf",
    "freeze",
    "install_moe_connector",
    "load",
    "merge_lora",
    "model_card",
    "parameter_parts",
    "parameter_report",
    "read_record",
    "save",
    "set_trainable",
    "tiny",
    "unfreeze",
    "upcycle_ffn",
]
