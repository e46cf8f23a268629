"""The model card (`README.md`) that `vlmoe.save` and `vlmoe.export_hf` write beside the weights.

It says what the model is without opening it: the base model, each method applied with its
settings (from the surgery record), parameter counts (total and active per token), and, when the
caller knows them, the training recipe, the data and evaluation results (`CardInfo`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from vlmoe.models.parts import parameter_report
from vlmoe.models.record import read_record

CARD_NAME = "README.md"

_METHODS = {
    "upcycle_ffn": "MoE-Tuning (MoE-LLaVA): FFN experts upcycled from the dense MLP",
    "add_mole": "LoRA experts (LLaVA-MoLE; MoCLE when routed by instruction cluster)",
    "install_moe_connector": "MoE connector (ChartMoE): projector experts",
    "import": "imported from a published checkpoint (vlmoe.interop)",
    "merge_lora": "plain and universal LoRA merged into the base weights (vlmoe.merge_lora)",
}


@dataclass
class CardInfo:
    """What the weights cannot tell: how the model was trained and how it scored."""

    recipe: str | None = None  # e.g. a recipe name or path ("moe-llava", "recipes/chartmoe.yaml")
    data: str | None = None  # the training data, in words or paths
    evaluation: dict[str, float] = field(default_factory=dict)  # {"chartqa relaxed accuracy": 0.61}


def model_card(model: nn.Module, info: CardInfo | None = None, *, exported_as: str | None = None) -> str:
    """The card of `model` as Markdown.

    Example:
        >>> import vlmoe
        >>> model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0], num_experts=4, top_k=2)
        >>> "| num experts | 4 |" in model_card(model)
        True
    """
    info = info or CardInfo()
    config = model.config
    text = config.get_text_config()
    record = read_record(model)
    lines = [
        f"# {type(model).__name__} with sparse experts (vlmoe)",
        "",
        "## Base model",
        "",
        f"- base: `{getattr(config, '_name_or_path', '') or 'not recorded'}`",
        f"- architecture: `{type(model).__name__}`, language model `{text.model_type}` "
        f"({text.num_hidden_layers} layers, hidden size {text.hidden_size})",
    ]
    if exported_as:
        lines.append(f"- exported as: `{exported_as}` (stock transformers, no vlmoe needed to load)")
    lines += ["", "## Method", ""]
    if record is None or not record.steps:
        lines.append("No surgery: the dense base model.")
    for number, step in enumerate(record.steps if record else [], start=1):
        lines += [f"{number}. {_METHODS[step.kind]}", "", "| setting | value |", "|---|---|"]
        for name, value in vars(step).items():
            if name != "kind":
                lines.append(f"| {name.replace('_', ' ')} | {value} |")
        lines.append("")
    report = parameter_report(model)
    lines += [
        "## Parameters",
        "",
        "| | count |",
        "|---|---|",
        f"| total | {report.total:,} |",
        f"| active per token | {report.active_per_token:,} |",
        *(f"| {part} | {count:,} |" for part, count in report.by_part.items()),
        "",
        "## Training",
        "",
        f"- recipe: {info.recipe or 'not recorded'}",
        f"- data: {info.data or 'not recorded'}",
        "",
        "## Evaluation",
        "",
    ]
    if info.evaluation:
        lines += ["| benchmark | score |", "|---|---|"]
        lines += [f"| {name} | {score:.4g} |" for name, score in info.evaluation.items()]
    else:
        lines.append("No evaluation results recorded (run `vlmoe eval`).")
    return "\n".join(lines) + "\n"
