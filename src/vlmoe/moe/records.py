"""Reading what the sparse layers did in the last forward pass, and feeding them per-forward inputs.

Everything lives on the layer modules themselves (`SparseLayer.last_aux_losses`,
`SparseLayer.last_routing`); these helpers walk a model to collect or set it. No global state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlmoe.moe.config import BalanceScope
from vlmoe.moe.layers import SparseLayer
from vlmoe.moe.router import Routing, check_cluster_ids


def _routes_by_cluster(layer: SparseLayer) -> bool:
    return layer.router is not None and layer.router.config.input == "cluster"


def routes_by_cluster(model: nn.Module) -> bool:
    """Whether any sparse layer of `model` routes by instruction cluster (MoCLE), so every forward
    needs per-sample cluster ids (`routing_inputs(model, cluster_ids=...)`).

    Example:
        >>> from vlmoe.moe import MoLELinear
        >>> layer = MoLELinear(nn.Linear(4, 4), num_experts=2, rank=2, router_input="cluster", num_clusters=3)
        >>> routes_by_cluster(layer), routes_by_cluster(MoLELinear(nn.Linear(4, 4), num_experts=2, rank=2))
        (True, False)
    """
    return any(_routes_by_cluster(layer) for _, layer in sparse_layers(model))


def sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseLayer]]:
    """Every routed sparse layer of `model` with its qualified name (plain LoRA layers excluded)."""
    for name, module in model.named_modules():
        if isinstance(module, SparseLayer) and module.router is not None:
            yield name, module


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of every router loss of the last forward pass (already scaled by its coefficient).

    Example:
        >>> from vlmoe.moe import MoEFeedForward
        >>> mlp = nn.Sequential()
        >>> mlp.fc1, mlp.fc2, mlp.act = nn.Linear(8, 16), nn.Linear(16, 8), nn.GELU()
        >>> moe = MoEFeedForward.from_dense(mlp, num_experts=4, top_k=2)
        >>> _ = moe(torch.randn(4, 8)); aux_loss(moe).item() > 0
        True
    """
    losses = [loss for _, layer in sparse_layers(model) for loss in layer.last_aux_losses.values()]
    if not losses:
        reference = next(model.parameters(), None)
        return torch.zeros((), device=None if reference is None else reference.device)
    return torch.stack([loss.float() for loss in losses]).sum()


def aux_losses_by_layer(model: nn.Module) -> dict[str, dict[str, float]]:
    """{layer name: {loss name: value}} of the last forward pass, for logging."""
    return {
        name: {loss_name: float(loss.detach()) for loss_name, loss in layer.last_aux_losses.items()}
        for name, layer in sparse_layers(model)
    }


def routing_records(model: nn.Module) -> dict[str, Routing]:
    """{layer name: routing of the last forward} for layers recorded with `record_routing`."""
    return {
        name: layer.last_routing for name, layer in sparse_layers(model) if layer.last_routing is not None
    }


def set_load_balance_scope(
    model: nn.Module, scope: BalanceScope, group: dist.ProcessGroup | None = None
) -> nn.Module:
    """Set every router's `load_balance_scope` (and, for "global", its data-parallel `group`).

    "global" all-reduces the balance loss's expert counts over `group` (None: every process)
    before the loss; "device" uses each process's own batch. Returns the model.

    Example:
        >>> from vlmoe.moe import MoEConnector
        >>> con = MoEConnector.upcycle(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8)))
        >>> set_load_balance_scope(con, "global").router.config.load_balance_scope
        'global'
    """
    for _, layer in sparse_layers(model):
        # The config is replaced, not edited: surgery may share one RouterConfig between layers.
        layer.router.config = replace(layer.router.config, load_balance_scope=scope)
        layer.router.balance_group = group
    return model


@contextmanager
def record_routing(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Keep each layer's full routing (indices, weights, probs, mask) while inside the block.

    Example:
        >>> from vlmoe.moe import MoEConnector
        >>> con = MoEConnector.upcycle(nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8)))
        >>> with record_routing(con):
        ...     _ = con(torch.randn(3, 4))
        >>> routing_records(con)[""].expert_indices.shape
        torch.Size([3, 2])
    """
    with temporarily(model, [layer for _, layer in sparse_layers(model)], "record_routing", enabled):
        yield model


@contextmanager
def temporarily(model: nn.Module, owners: list[object], attribute: str, value: object) -> Iterator[nn.Module]:
    """Set `attribute` to `value` on every owner inside the block; restore each one's own on exit."""
    previous = [getattr(owner, attribute) for owner in owners]
    for owner in owners:
        setattr(owner, attribute, value)
    try:
        yield model
    finally:
        for owner, was in zip(owners, previous, strict=True):
            setattr(owner, attribute, was)


@contextmanager
def routing_inputs(
    model: nn.Module, attention_mask: Tensor | None = None, cluster_ids: Tensor | None = None
) -> Iterator[nn.Module]:
    """Give the LM's sparse layers the padding mask and/or per-sample cluster ids for a forward.

    `attention_mask` # [batch, seq] (1 = real token): padding takes no capacity and no part in
    the router losses. `cluster_ids` # [batch] (MoCLE): the instruction cluster of each sample.
    Entering clears every sparse layer's record (losses and routing): a layer the forward inside
    does not reach (the connector in a text-only batch) then adds no loss of an earlier forward,
    whose graph is gone, to `aux_loss`.

    Example:
        >>> from vlmoe.moe import MoLELinear
        >>> layer = MoLELinear(nn.Linear(4, 4), num_experts=2, rank=2, router_input="cluster", num_clusters=3)
        >>> with routing_inputs(layer, cluster_ids=torch.tensor([2, 0])):
        ...     layer(torch.randn(2, 5, 4)).shape
        torch.Size([2, 5, 4])
    """
    all_layers = [module for module in model.modules() if isinstance(module, SparseLayer)]
    for layer in all_layers:  # plain attributes, as SparseLayer.route writes them
        layer.__dict__["last_aux_losses"] = {}
        layer.__dict__["last_routing"] = None
    layers = [layer for layer in all_layers if layer.routes_text_tokens]
    mask = None if attention_mask is None else attention_mask.bool()
    if cluster_ids is not None:
        for num_clusters in {
            layer.router.config.num_clusters for layer in layers if _routes_by_cluster(layer)
        }:
            check_cluster_ids(cluster_ids, num_clusters)  # once here, not once per layer and forward
    # An input left out (None) keeps what an enclosing block set: MoCLE cluster ids given around
    # `vlmoe.eval.generate` survive the padding mask it sets inside. On exit, each layer gets
    # back what it had.
    previous = [(layer.token_mask, layer.cluster_ids) for layer in layers]
    for layer in layers:
        if mask is not None:
            layer.token_mask = mask
        if cluster_ids is not None:
            layer.cluster_ids = cluster_ids
    try:
        yield model
    finally:
        for layer, (was_mask, was_ids) in zip(layers, previous, strict=True):
            layer.token_mask, layer.cluster_ids = was_mask, was_ids
