"""LLaVA-MoLE's feed-forward: one router per MLP, shared by its gate, up and down projections.

The router looks at the MLP input once; the three `MoLELinear` layers receive that routing
through their `routing=` argument, so a token uses the same LoRA expert in all three. With
autograd off on CUDA, a decoding step replays the whole feed-forward (routing and the three
linears) from a CUDA graph, as `MoEFeedForward` does (`vlmoe.moe.graphs`); routed by cluster
(MoCLE), the cluster ids are copied into the graph with x.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlmoe.moe import MoLELinear, Router, RouterConfig, SparseLayer, graphs
from vlmoe.moe.dispatch import resolve_backend


class MoLEFeedForward(SparseLayer):
    """A gated MLP, down(act(gate(x)) * up(x)), whose projections share one LoRA-expert router.

    Example:
        >>> import torch
        >>> from transformers.models.llama.modeling_llama import LlamaMLP, LlamaConfig
        >>> mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2))
        >>> mole = MoLEFeedForward.from_mlp(mlp, RouterConfig(num_experts=4), rank=2, alpha=4)
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(mole(x), mlp(x))
        True
    """

    def __init__(
        self,
        router: Router,
        gate_proj: MoLELinear,
        up_proj: MoLELinear,
        down_proj: MoLELinear,
        act_fn: nn.Module,
    ) -> None:
        super().__init__(router, experts=None)
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act_fn = act_fn

    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Module,
        config: RouterConfig,
        *,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        universal: bool = False,
    ) -> MoLEFeedForward:
        """Wrap a gated MLP (gate_proj, up_proj, down_proj, act_fn); every LoRA B starts at zero."""
        linears = []
        for name in ("gate_proj", "up_proj", "down_proj"):
            base = getattr(mlp, name, None)
            if not isinstance(base, nn.Linear):
                raise ValueError(
                    f"{type(mlp).__name__} has no nn.Linear '{name}'; MoLE's shared router needs a gated MLP "
                    "(gate_proj, up_proj, down_proj, act_fn)"
                )
            linear = MoLELinear(
                base, config.num_experts, rank, alpha, config.top_k, dropout=dropout, universal=universal
            )
            # The routing comes from the shared router below; a per-linear router would be dead weight.
            linear.router = None
            linears.append(linear)
        reference = mlp.gate_proj.weight
        router = Router(mlp.gate_proj.in_features, config).to(device=reference.device, dtype=reference.dtype)
        return cls(router, *linears, act_fn=mlp.act_fn)

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, cluster_ids: Tensor | None = None
    ) -> Tensor:
        key = self._graph_key(x)
        if key is not None:
            return self._replay(x, key, self._eager_forward, token_mask, cluster_ids)
        routing = self.route(x, token_mask, cluster_ids)
        return self._linears(x, routing)

    def _linears(self, x: Tensor, routing) -> Tensor:
        hidden = self.act_fn(self.gate_proj(x, routing=routing)) * self.up_proj(x, routing=routing)
        return self.down_proj(hidden, routing=routing)

    def _graph_key(self, x: Tensor) -> tuple | None:
        """The key of this forward's CUDA graph, or None to run it eagerly: a decoding step that
        may replay (`SparseLayer._decoding_tokens`; routed by token, or by MoCLE's clusters with
        the ids as the graph's second input) whose three linears take the dense LoRA dispatch
        (no host reads) without a live dropout."""
        if self._decoding_tokens(x) is None:
            return None
        linears = (self.gate_proj, self.up_proj, self.down_proj)
        for linear in linears:
            experts = linear.experts
            if experts is None or resolve_backend(linear.backend, x, experts) != "dense":
                return None
            if linear.training and not isinstance(experts.dropout, nn.Identity):
                return None  # a fresh dropout mask every call
        scalings = tuple(
            (linear.experts.scaling, None if linear.universal is None else linear.universal.scaling)
            for linear in linears
        )
        # Everything the captured forward reads besides x (the module note of vlmoe.moe.graphs).
        return (
            "mole",
            *self._router_key(),
            id(self.act_fn),
            scalings,
            graphs.parameter_addresses(self),
        )

    def _eager_forward(self, x: Tensor, cluster_ids: Tensor | None = None) -> Tensor:
        """What a graph captures: the routing and the three linears, no record. cluster_ids # [T]
        only when the router routes by them."""
        return self._linears(x, self.router(x.reshape(-1, x.shape[-1]), cluster_ids=cluster_ids))
