"""Forced-expert evaluation (ChartMoE's ablation): every token to expert i, then back to routing."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

from torch import nn

from vlmoe.moe import MoEConnector, sparse_layers
from vlmoe.moe.records import temporarily

Where = Literal["connector", "all"]


@contextmanager
def forced_expert(model: nn.Module, expert: int, where: Where = "connector") -> Iterator[nn.Module]:
    """Inside the block, the chosen routers send every token to `expert` alone.

    `where="connector"`: only the MoE connector's router (ChartMoE); `"all"`: every routed sparse
    layer (connector, MoE FFNs, MoLE). The previous settings come back on exit, even after an error.

    Example:
        >>> import torch
        >>> proj = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8))
        >>> con = MoEConnector.random(proj, num_experts=4, top_k=2)
        >>> x = torch.randn(3, 4)
        >>> with forced_expert(con, 2):
        ...     torch.allclose(con(x), con.experts.expert_forward(2, x), atol=1e-6)
        True
    """
    if where not in ("connector", "all"):
        raise ValueError(f"forced_expert: where must be 'connector' or 'all', got {where!r}")
    routers = [
        layer.router for _, layer in sparse_layers(model) if where == "all" or isinstance(layer, MoEConnector)
    ]
    if not routers:
        what = "MoE connector" if where == "connector" else "routed sparse layer"
        hint = " (use where='all' for MoE FFN / MoLE layers)" if where == "connector" else ""
        raise ValueError(f"forced_expert: the model has no {what}{hint}; nothing to force")
    for router in routers:
        num_experts = router.config.num_experts
        if not 0 <= expert < num_experts:
            raise ValueError(
                f"forced_expert: expert must be in [0, {num_experts}) for this model, got {expert}"
            )
    with temporarily(model, routers, "forced_expert", expert):
        yield model
