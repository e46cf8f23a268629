"""The three surgeries on an HF vision-language model, in place and recorded in its config.

- `upcycle_ffn`: LM MLPs -> `MoEFeedForward`, every expert a copy of the MLP (MoE-LLaVA).
- `add_mole`: LoRA experts on MLP linears with one shared router per MLP, plain LoRA on
  attention (LLaVA-MoLE); routed by instruction cluster with a universal LoRA (MoCLE).
- `install_moe_connector`: the projector -> `MoEConnector` (ChartMoE).

And one for inference after `add_mole`: `merge_lora` folds plain and universal LoRA into the
base weights, as PEFT's merge does, so attention runs as plain linears.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import nn

from vlmoe.models.connector import build_connector
from vlmoe.models.families import FamilyAdapter, adapter_for
from vlmoe.models.mole import MoLEFeedForward
from vlmoe.models.record import (
    AddMoLE,
    InstallConnector,
    MergeLoRA,
    UpcycleFFN,
    append_step,
    read_record,
)
from vlmoe.moe import MoEConnector, MoEFeedForward, MoLELinear, RouterConfig
from vlmoe.moe.config import checked_value

LayerSpec = Literal["all", "every_other"] | Sequence[int]


def upcycle_ffn(
    model: nn.Module,
    num_experts: int = 4,
    top_k: int = 2,
    layers: LayerSpec = "all",
    *,
    load_balance_coef: float = 0.01,
    z_loss_coef: float = 0.0,
    capacity_factor: float | None = None,
    min_capacity: int = 0,
    load_balance_first_choice: bool = False,
) -> nn.Module:
    """Replace the chosen LM layers' MLPs with upcycled `MoEFeedForward` layers (MoE-LLaVA).

    Right after upcycling the model computes the dense model's function: every expert is a copy.
    "every_other" upcycles layers 0, 2, 4, ... (MoE-LLaVA's sparse mode).

    Example:
        >>> import vlmoe
        >>> model, _ = vlmoe.models.tiny("llava")
        >>> model = vlmoe.upcycle_ffn(model, num_experts=4, top_k=2, layers="every_other")
        >>> type(model.model.language_model.layers[0].mlp).__name__
        'MoEFeedForward'
    """
    adapter = adapter_for(model)
    _refuse_repeat(model, "upcycle_ffn")
    indices = _layer_indices(model, adapter, layers)
    # Build every MoE layer before replacing any, so a refusal leaves the model as it was.
    upcycled = {}
    for index in indices:
        mlp = model.get_submodule(adapter.mlp_path(index))
        if isinstance(mlp, (MoEFeedForward, MoLEFeedForward)) or _has_lora(mlp):
            raise ValueError(
                f"{adapter.mlp_path(index)} is already a {type(mlp).__name__} (or carries LoRA); "
                "upcycle_ffn needs a dense MLP: upcycle before add_mole, or pass layers=... without it"
            )
        upcycled[index] = MoEFeedForward.from_dense(
            mlp,
            num_experts,
            top_k,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
            capacity_factor=capacity_factor,
            min_capacity=min_capacity,
            load_balance_first_choice=load_balance_first_choice,
        )
    for index, moe in upcycled.items():
        _replace(model, adapter.mlp_path(index), moe)
    step = UpcycleFFN(
        layers=indices,
        num_experts=num_experts,
        top_k=top_k,
        load_balance_coef=load_balance_coef,
        z_loss_coef=z_loss_coef,
        capacity_factor=capacity_factor,
        min_capacity=min_capacity,
        load_balance_first_choice=load_balance_first_choice,
    )
    append_step(model, adapter.name, step)
    return model


def add_mole(
    model: nn.Module,
    num_experts: int = 4,
    rank: int = 16,
    alpha: float = 32.0,
    top_k: int = 1,
    *,
    router: Literal["token", "cluster"] = "token",
    num_clusters: int = 64,
    universal: bool = False,
    layers: LayerSpec = "all",
    dropout: float = 0.0,
    temperature: float = 1.0,
    load_balance_coef: float = 0.0,
    straight_through: bool = False,
    attention_lora: bool = True,
    router_bias: bool = False,
) -> nn.Module:
    """LoRA experts on the chosen layers' MLP linears, plain LoRA on their attention linears.

    One router per MLP is shared by gate/up/down (LLaVA-MoLE). `router="cluster"` routes each
    sample by its instruction cluster, given per forward with
    `vlmoe.moe.routing_inputs(model, cluster_ids=...)`; with `universal=True` that is MoCLE.
    `num_experts=0` puts plain LoRA on the MLP linears too (ChartMoE's LLM LoRA); on layers
    already upcycled it leaves the FFN experts as they are and adds LoRA to attention. Every LoRA B
    starts at zero, so the model starts equal to the base model.

    Example:
        >>> import vlmoe
        >>> model, _ = vlmoe.models.tiny("llava")
        >>> model = vlmoe.add_mole(model, num_experts=4, rank=4, alpha=8, top_k=1)
        >>> type(model.model.language_model.layers[0].mlp).__name__
        'MoLEFeedForward'
    """
    adapter = adapter_for(model)
    _refuse_repeat(model, "add_mole")
    # Checked here: a rank=2.0 or alpha="8" would fail deep inside the LoRA weights' construction.
    rank = checked_value(rank, int, "rank")
    alpha, dropout = checked_value(alpha, float, "alpha"), checked_value(dropout, float, "dropout")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0 (LoRA scales its output by alpha / rank), got {alpha!r}")
    if router not in ("token", "cluster"):
        raise ValueError(f"router must be 'token' or 'cluster', got {router!r}")
    if not isinstance(num_experts, int) or num_experts < 0:
        raise ValueError(f"num_experts must be an integer >= 0 (0 = plain LoRA), got {num_experts!r}")
    indices = _layer_indices(model, adapter, layers)
    config = None
    if num_experts > 0:
        config = RouterConfig(
            num_experts=num_experts,
            top_k=top_k,
            input=router,
            num_clusters=num_clusters if router == "cluster" else 0,
            temperature=temperature,
            load_balance_coef=load_balance_coef,
            straight_through=straight_through,
            bias=router_bias,
        )
    # Check every layer before changing any, so a refusal leaves the model as it was.
    for index in indices:
        if config is not None and isinstance(model.get_submodule(adapter.mlp_path(index)), MoEFeedForward):
            raise ValueError(
                f"{adapter.mlp_path(index)} is an upcycled MoEFeedForward; MoLE needs a dense MLP. "
                "Pass layers=... without the upcycled layers, or num_experts=0 for attention LoRA only"
            )
    upcycled = [i for i in indices if isinstance(model.get_submodule(adapter.mlp_path(i)), MoEFeedForward)]
    if not attention_lora and upcycled == indices:
        # Recorded, a step that changed no module would make every later surgery refuse the model.
        raise ValueError(
            f"add_mole(num_experts=0, attention_lora=False) adds no LoRA to layers {indices}: their "
            "MLPs are upcycled MoEFeedForward layers, which keep their experts. Pass attention_lora=True, or "
            "layers=... with dense layers"
        )
    for index in indices:
        mlp_path = adapter.mlp_path(index)
        mlp = model.get_submodule(mlp_path)
        if isinstance(mlp, MoEFeedForward):
            pass  # attention LoRA only: the upcycled experts stay as they are
        elif config is not None:
            _replace(
                model,
                mlp_path,
                MoLEFeedForward.from_mlp(
                    mlp, config, rank=rank, alpha=alpha, dropout=dropout, universal=universal
                ),
            )
        else:
            _add_plain_lora(model, mlp_path, adapter.mlp_linears, rank, alpha, dropout)
        if attention_lora:
            _add_plain_lora(
                model, adapter.attention_path(index), adapter.attention_linears, rank, alpha, dropout
            )
    step = AddMoLE(
        layers=indices,
        num_experts=num_experts,
        rank=rank,
        alpha=alpha,
        top_k=top_k,
        router=router,
        num_clusters=num_clusters if router == "cluster" else 0,
        universal=universal,
        dropout=dropout,
        temperature=temperature,
        load_balance_coef=load_balance_coef,
        straight_through=straight_through,
        attention_lora=attention_lora,
        router_bias=router_bias,
    )
    append_step(model, adapter.name, step)
    return model


def install_moe_connector(
    model: nn.Module,
    init: Literal["aligned", "upcycle", "random"] = "upcycle",
    num_experts: int = 4,
    top_k: int = 2,
    *,
    projectors: Sequence[object] | None = None,
    load_balance_coef: float = 0.0,
    z_loss_coef: float = 0.0,
) -> nn.Module:
    """Replace the family's projector with an `MoEConnector` of projector experts (ChartMoE).

    `init="aligned"` loads expert i from `projectors[i]` (a module, a state dict of the
    projector, or a .safetensors/.pt file of one); "upcycle" copies the model's own projector
    into every expert (the connector then computes the projector's function); "random" gives
    fresh experts of the same shape. Switching init is this one argument.

    Example:
        >>> import vlmoe
        >>> model, _ = vlmoe.models.tiny("llava")
        >>> model = vlmoe.install_moe_connector(model, init="upcycle", num_experts=4, top_k=2)
        >>> type(model.model.multi_modal_projector).__name__
        'MoEConnector'
    """
    adapter = adapter_for(model)
    _refuse_repeat(model, "install_moe_connector")
    projector = model.get_submodule(adapter.projector)
    if isinstance(projector, MoEConnector):
        raise ValueError(f"{adapter.projector} is already an MoEConnector")
    connector, num_experts = build_connector(
        projector, adapter.projector, init, num_experts, top_k, projectors, load_balance_coef, z_loss_coef
    )
    _replace(model, adapter.projector, connector)
    append_step(
        model, adapter.name, InstallConnector(init, num_experts, top_k, load_balance_coef, z_loss_coef)
    )
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every plain and universal LoRA into its base weight, in place, for inference.

    Attention's plain LoRA (LLaVA-MoLE, MoCLE, ChartMoE's LLM LoRA) then costs one matmul where it
    cost three, and MoCLE's universal expert leaves its feed-forwards; routed LoRA experts stay as
    they are. Each merged weight is W + s B A summed in float32 and rounded once to W's dtype, so
    logits move by that rounding (in bf16, what an exported model computes too). The step is
    recorded: `vlmoe.save` then writes the merged weights, and `vlmoe.load` rebuilds the merged
    layout. It cannot be undone; merge a copy (`copy.deepcopy`) to keep training the adapters.

    Example:
        >>> import vlmoe
        >>> model, _ = vlmoe.models.tiny("llava")
        >>> model = vlmoe.merge_lora(vlmoe.add_mole(model, num_experts=0, rank=4, alpha=8))
        >>> vlmoe.models.read_record(model).kinds()
        ['add_mole', 'merge_lora']
    """
    adapter = adapter_for(model)
    record = read_record(model)
    if record is not None and "merge_lora" in record.kinds():
        raise ValueError("merge_lora was already applied to this model: its LoRA is in the base weights")
    _refuse_repeat(model, "merge_lora")
    wrapped = [module for module in model.modules() if isinstance(module, MoLELinear)]
    if not any(module.universal is not None for module in wrapped):
        raise ValueError(
            "the model has no plain or universal LoRA to merge (vlmoe.add_mole adds them); routed LoRA "
            "experts cannot be merged into one weight"
        )
    for module in wrapped:
        module.merge_universal()
    append_step(model, adapter.name, MergeLoRA())
    return model


def check_record_agrees(model: nn.Module) -> None:
    """Refuse a model whose config records surgery its modules do not show (or the reverse).

    Example:
        >>> import vlmoe
        >>> check_record_agrees(vlmoe.upcycle_ffn(vlmoe.models.tiny("llava")[0]))  # agrees: no error
    """
    record = read_record(model)
    applied = _applied_kinds(model)
    # An "import" step changes no module kind (see vlmoe.interop), and a merge leaves the LoRA
    # wrappers in place, so the modules cannot show either.
    if record is not None and set(record.kinds()) - {"import", "merge_lora"} != applied:
        raise ValueError(
            f"the model's config records surgery {record.kinds()} but its modules show {sorted(applied)}: "
            "it was built from a vlmoe config without the surgery (e.g. from_pretrained on a vlmoe.save "
            "directory, or a config shared with another model). Load it with vlmoe.load(path)"
        )


def _refuse_repeat(model: nn.Module, kind: str) -> None:
    check_record_agrees(model)
    applied = _applied_kinds(model)
    if kind in applied:
        raise ValueError(
            f"{kind} was already applied to this model (its config records {sorted(applied)}); "
            "applying it twice would wrap experts in experts. Start again from the dense model"
        )


def _applied_kinds(model: nn.Module) -> set[str]:
    """The surgeries visible in the modules themselves (the record must agree with them)."""
    kinds = set()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            kinds.add("upcycle_ffn")
        elif isinstance(module, (MoLEFeedForward, MoLELinear)):
            kinds.add("add_mole")
        elif isinstance(module, MoEConnector):
            kinds.add("install_moe_connector")
    return kinds


def _layer_indices(model: nn.Module, adapter: FamilyAdapter, layers: LayerSpec) -> list[int]:
    num_layers = len(adapter.decoder_layer_list(model))
    # A string is compared first: `layers == "all"` of a numpy array is an array, not a bool.
    if isinstance(layers, str) and layers == "all":
        return list(range(num_layers))
    if isinstance(layers, str) and layers == "every_other":
        return list(range(0, num_layers, 2))
    if isinstance(layers, torch.Tensor | np.ndarray):
        layers = layers.tolist()  # np.arange(0, 8, 2), torch.tensor([1, 3])
    if not isinstance(layers, Sequence) or isinstance(layers, str) or not all(map(_is_index, layers)):
        hint = f"; for layer {layers} alone pass layers=[{layers}]" if _is_index(layers) else ""
        raise ValueError(
            f"layers must be 'all', 'every_other' or a list of layer indices, got {layers!r}{hint}"
        )
    given = [int(i) for i in layers]
    indices = sorted(set(given))
    if not indices or indices[0] < 0 or indices[-1] >= num_layers:
        raise ValueError(f"layers must be non-empty indices in [0, {num_layers}), got {given}")
    if len(indices) != len(given):
        twice = sorted({i for i in given if given.count(i) > 1})
        raise ValueError(f"layers {given} lists layer(s) {twice} more than once; give each layer once")
    return indices


def _is_index(value: object) -> bool:
    # A bool is an int to Python but no layer index; numpy integers (np.arange) count as ints.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _add_plain_lora(
    model: nn.Module, parent_path: str, names: Sequence[str], rank: int, alpha: float, dropout: float
) -> None:
    parent = model.get_submodule(parent_path)
    for name in names:
        linear = getattr(parent, name, None)
        if not isinstance(linear, nn.Linear):
            raise ValueError(
                f"{parent_path}.{name} is {type(linear).__name__}, expected an nn.Linear for LoRA"
            )
        setattr(parent, name, MoLELinear.plain(linear, rank=rank, alpha=alpha, dropout=dropout))


def _has_lora(module: nn.Module) -> bool:
    return any(isinstance(child, MoLELinear) for child in module.modules())


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, new)
