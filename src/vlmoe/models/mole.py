"""LLaVA-MoLE's feed-forward: one router per MLP, shared by its gate, up and down projections.

The router looks at the MLP input once; the three `MoLELinear` layers receive that routing
through their `routing=` argument, so a token uses the same LoRA expert in all three.
"""

from __future__ import annotations

from torch import Tensor, nn

from vlmoe.moe import MoLELinear, Router, RouterConfig, SparseLayer


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
        lead_shape = x.shape[:-1]
        token_mask, cluster_ids = self._flat_routing_inputs(lead_shape, token_mask, cluster_ids)
        routing = self.router(x.reshape(-1, x.shape[-1]), token_mask=token_mask, cluster_ids=cluster_ids)
        self.last_aux_losses = routing.aux_losses
        self.last_routing = routing.detached() if self.record_routing else None
        hidden = self.act_fn(self.gate_proj(x, routing=routing)) * self.up_proj(x, routing=routing)
        return self.down_proj(hidden, routing=routing)
