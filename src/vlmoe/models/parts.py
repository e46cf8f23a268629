"""Which part of a surgered model each parameter belongs to; freezing by part; parameter counts.

Parts: "vision_tower", "connector", "router", "experts", "lora", "lm". Every parameter is in
exactly one part, decided by the first that claims it in that order of precedence: lora, router,
experts, then the module path (connector, vision tower), and everything else is "lm" (embeddings,
attention, norms, dense MLPs, LM head, the frozen bases under LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vlmoe.models.families import adapter_for
from vlmoe.moe import GLUExperts, LoRAExperts, MLPExperts, ModuleExperts, Router, SparseLayer

PARTS = ("vision_tower", "connector", "router", "experts", "lora", "lm")


def parameter_parts(model: nn.Module) -> dict[str, str]:
    """{parameter name: part} for every parameter of `model`.

    Example:
        >>> import vlmoe
        >>> parameter_parts(vlmoe.models.tiny("llava")[0])["model.multi_modal_projector.linear_1.weight"]
        'connector'
    """
    adapter = adapter_for(model)
    claimed: dict[str, str] = {}
    for part, kinds in (
        ("lora", (LoRAExperts,)),
        ("router", (Router,)),
        ("experts", (GLUExperts, MLPExperts, ModuleExperts)),
    ):
        for module_name, module in model.named_modules():
            if isinstance(module, kinds):
                for param_name, _ in module.named_parameters():
                    claimed.setdefault(f"{module_name}.{param_name}", part)
    parts = {}
    for name, _ in model.named_parameters():
        if name in claimed:
            parts[name] = claimed[name]
        elif name.startswith(f"{adapter.projector}.") or name in adapter.connector_parameters:
            parts[name] = "connector"
        elif name.startswith(f"{adapter.vision_tower}."):
            parts[name] = "vision_tower"
        else:
            parts[name] = "lm"
    return parts


def set_trainable(model: nn.Module, *parts: str) -> nn.Module:
    """Make exactly `parts` trainable and freeze the rest; returns the model.

    Example (MoE-LLaVA stage 3 trains only the FFN experts and the routers):
        >>> import vlmoe
        >>> model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0])
        >>> model = set_trainable(model, "experts", "router")
        >>> parameter_report(model).trainable > 0
        True
    """
    _check_parts(parts)
    for param in model.parameters():
        param.requires_grad_(False)
    return unfreeze(model, *parts)


def freeze(model: nn.Module, *parts: str) -> nn.Module:
    """Freeze the parameters of `parts`, leaving the others as they are.

    Example:
        >>> import vlmoe
        >>> model = freeze(vlmoe.models.tiny("llava")[0], "vision_tower", "lm")
        >>> sorted({part for name, part in parameter_parts(model).items()
        ...         if model.get_parameter(name).requires_grad})
        ['connector']
    """
    return _set(model, parts, False)


def unfreeze(model: nn.Module, *parts: str) -> nn.Module:
    """Make the parameters of `parts` trainable, leaving the others as they are.

    Example:
        >>> import vlmoe
        >>> model = unfreeze(set_trainable(vlmoe.models.tiny("llava")[0], "connector"), "lm")
        >>> parameter_report(model).trainable == parameter_report(model).total - 22_496  # all but the tower
        True
    """
    return _set(model, parts, True)


def _set(model: nn.Module, parts: tuple[str, ...], trainable: bool) -> nn.Module:
    _check_parts(parts)
    part_of = parameter_parts(model)
    for name, param in model.named_parameters():
        if part_of[name] in parts:
            param.requires_grad_(trainable)
    return model


def _check_parts(parts: tuple[str, ...]) -> None:
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        raise ValueError(f"unknown part(s) {unknown}; parts are {list(PARTS)}")


@dataclass
class ParameterReport:
    """Parameter counts: all, trainable, and those one token uses (unchosen experts excluded)."""

    total: int
    trainable: int
    active_per_token: int
    by_part: dict[str, int]

    def __str__(self) -> str:
        parts = ", ".join(f"{part} {count:,}" for part, count in self.by_part.items())
        return (
            f"total {self.total:,} | trainable {self.trainable:,} | active per token "
            f"{self.active_per_token:,} | {parts}"
        )


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count parameters; a top-k-of-E expert container counts k/E of its size as active.

    Shared tensors (tied embeddings) count once, as in `model.parameters()`.

    Example:
        >>> import vlmoe
        >>> model = vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0], num_experts=4, top_k=2)
        >>> report = parameter_report(model)
        >>> report.total - report.active_per_token == report.by_part["experts"] // 2
        True
    """
    part_of = parameter_parts(model)
    named = dict(model.named_parameters())
    by_part = {part: 0 for part in PARTS}
    for name, param in named.items():
        by_part[part_of[name]] += param.numel()
    inactive = 0
    for layer in _routed_layers(model):
        top_k, num_experts = layer.router.config.top_k, layer.router.config.num_experts
        for container in _expert_containers(layer):
            size = sum(p.numel() for p in container.parameters())
            inactive += size - size * top_k // num_experts
    total = sum(by_part.values())
    trainable = sum(p.numel() for p in named.values() if p.requires_grad)
    return ParameterReport(total, trainable, total - inactive, {k: v for k, v in by_part.items() if v})


def _routed_layers(model: nn.Module) -> list[SparseLayer]:
    return [m for m in model.modules() if isinstance(m, SparseLayer) and m.router is not None]


def _expert_containers(layer: SparseLayer) -> list[nn.Module]:
    """The routed expert containers a layer's router chooses among (a shared router has several)."""
    containers = [
        m for m in layer.modules() if m is not layer and isinstance(m, SparseLayer) and m.experts is not None
    ]
    if layer.experts is not None:
        containers.append(layer)
    return [c.experts for c in containers]
