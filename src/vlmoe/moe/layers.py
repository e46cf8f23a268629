"""The three sparse layers, thin compositions of router -> dispatch -> experts.

- `MoEFeedForward`: E full FFN experts in place of a dense MLP (MoE-LLaVA).
- `MoLELinear`: a frozen linear plus LoRA experts, token- or cluster-routed, with an optional
  always-on universal LoRA (LLaVA-MoLE, MoCLE); with no routed experts it is plain LoRA.
- `MoEConnector`: projector experts between vision tower and LM (ChartMoE).

Each layer keeps its last routing on the module (see `vlmoe.moe.records`); no global state.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import Tensor, nn

from vlmoe.moe import graphs
from vlmoe.moe.config import RouterConfig
from vlmoe.moe.dispatch import (
    Experts,
    check_backend,
    chosen_backend,
    dispatch,
    gate_matrix,
    grouped_mm_runs,
    resolve_backend,
)
from vlmoe.moe.experts import (
    GLUExperts,
    LoRAExperts,
    MLPExperts,
    ModuleExperts,
    _linear_pair,
    experts_from_dense,
)
from vlmoe.moe.kernels import quack_gemm
from vlmoe.moe.router import Router, Routing, check_cluster_ids_type


def _expert_weights(experts: GLUExperts | MLPExperts) -> tuple[Tensor, ...]:
    if isinstance(experts, GLUExperts):
        return experts.gate_up_proj, experts.down_proj
    return experts.fc1_weight, experts.fc2_weight


class SparseLayer(nn.Module):
    """Shared plumbing: routing inputs, dispatch, and the routing record."""

    # Whether the layer sees the language model's tokens, so `routing_inputs` (an attention mask
    # over the text sequence, per-sample cluster ids) applies to it.
    routes_text_tokens: ClassVar[bool] = True

    def __init__(self, router: Router | None, experts: Experts | None, backend: str = "auto") -> None:
        super().__init__()
        check_backend(backend)
        self.router = router
        self.experts = experts
        self.backend = backend
        # Per-forward inputs an HF model does not pass down; set by `routing_inputs(...)`.
        self.token_mask: Tensor | None = None
        self.cluster_ids: Tensor | None = None
        # The record of the last forward: aux losses always (training reads them), the full
        # routing only while `record_routing` is on (analysis reads it).
        self.record_routing = False
        self.last_aux_losses: dict[str, Tensor] = {}
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return 0 if self.router is None else self.router.config.num_experts

    @property
    def top_k(self) -> int:
        return 0 if self.router is None else self.router.config.top_k

    @property
    def input_size(self) -> int | None:
        """The last dimension inputs must have (None when the router does not read the input)."""
        if self.router is None or self.router.cluster_embedding is not None:
            return None
        return self.router.gate.in_features

    def route(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        cluster_ids: Tensor | None = None,
        logits: Tensor | None = None,
    ) -> Routing:
        """Route the tokens of x # [..., I] and keep the record; the routing is in token order.
        `logits` # [T, E]: the gate's output if the caller computed it (see `Router.forward`)."""
        self._check_input(x)
        token_mask, cluster_ids = self._flat_routing_inputs(x.shape[:-1], token_mask, cluster_ids)
        x_tokens = x.reshape(-1, x.shape[-1])
        routing = self.router(x_tokens, token_mask=token_mask, cluster_ids=cluster_ids, logits=logits)
        # Plain attributes, written past nn.Module.__setattr__: its parameter/buffer/module
        # bookkeeping costs microseconds per call, and decoding routes once per layer and token.
        self.__dict__["last_aux_losses"] = routing.aux_losses
        self.__dict__["last_routing"] = routing.detached() if self.record_routing else None
        return routing

    def _check_input(self, x: Tensor) -> None:
        if not x.is_floating_point():
            raise ValueError(
                f"{type(self).__name__} got a {x.dtype} input of shape {tuple(x.shape)}; it takes hidden "
                "states (a floating-point tensor), not token ids or masks"
            )
        input_size = self.input_size
        if input_size is not None and (x.dim() == 0 or x.shape[-1] != input_size):
            raise ValueError(
                f"{type(self).__name__} expects inputs whose last dimension is {input_size}, "
                f"got shape {tuple(x.shape)}"
            )

    def _decoding_tokens(self, x: Tensor) -> int | None:
        """The token count of x when this forward may replay a CUDA graph (`vlmoe.moe.graphs`),
        else None: autograd off on CUDA (`graphs.can_capture`), no routing record, a routing
        that reads nothing but x, the parameters and the cluster ids (`Router.routing_replays`),
        and a decoding step (one position per sequence, [batch, 1, d], or flat [tokens, d]) of
        at most `graphs.MAX_TOKENS` tokens. The layer adds what its own dispatch needs."""
        router = self.router
        if not graphs.can_capture(x) or self.record_routing or router is None:
            return None
        input_size = self.input_size  # None routing by cluster: the layer's linears check x
        if x.dim() < 2 or (input_size is not None and x.shape[-1] != input_size):
            return None
        if not router.routing_replays():
            return None
        if x.dim() > 2 and x.shape[-2] != 1:
            # A prompt, not a decoding step: its lengths vary, each would be a capture of its own.
            return None
        num_tokens = x.numel() // x.shape[-1]
        return num_tokens if 0 < num_tokens <= graphs.MAX_TOKENS else None

    def _router_key(self) -> tuple:
        """What a captured routing reads besides x: part of a graph's key."""
        router = self.router
        config = router.config
        return (
            torch.is_autocast_enabled("cuda"),
            id(router),
            config.top_k,
            config.temperature,
            config.normalize_top_k,
            # Every parameter, not only the gate's weight and bias: the matmul-and-top-k routing
            # runs the gate module as it is (a wrapped gate brings parameters of its own).
            graphs.parameter_addresses(router),
        )

    def _replay(
        self,
        x: Tensor,
        key: tuple,
        forward,
        token_mask: Tensor | None,
        cluster_ids: Tensor | None,
    ) -> Tensor:
        """forward(x, cluster_ids) through this layer's graphs under `key`; the record as a
        no-grad forward leaves it (no losses, no routing). Routing by cluster, the ids (one per
        token) are the graph's second input; otherwise they are None and the forward's one."""
        given = (token_mask, cluster_ids, self.token_mask, self.cluster_ids)
        if any(value is not None for value in given):
            # The mask changes no output here (no losses, no record), but is checked as eagerly.
            _, cluster_ids = self._flat_routing_inputs(x.shape[:-1], token_mask, cluster_ids)
        if self.router.cluster_embedding is None:
            extra = ()
        elif cluster_ids is None:
            return forward(x, None)  # the router's error: no cluster ids given
        else:
            extra = (cluster_ids.to(x.device),)
        cache = self.__dict__.get("_forward_graphs")
        if cache is None:
            cache = self.__dict__["_forward_graphs"] = graphs.ForwardGraphs()
        out = cache.run(forward, x, key, extra)
        self.__dict__["last_aux_losses"] = {}
        self.__dict__["last_routing"] = None
        return out

    def route_and_dispatch(
        self, x: Tensor, token_mask: Tensor | None, cluster_ids: Tensor | None
    ) -> tuple[Tensor, Routing]:
        """x # [..., I] -> expert output # [..., O], and the routing that produced it."""
        routing = self.route(x, token_mask, cluster_ids)
        out = dispatch(x.reshape(-1, x.shape[-1]), routing, self.experts, self.backend)  # [T, O]
        return out.view(*x.shape[:-1], out.shape[-1]), routing

    def _flat_routing_inputs(
        self, lead_shape: torch.Size, token_mask: Tensor | None, cluster_ids: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        if token_mask is None and self.token_mask is not None:
            token_mask = self.token_mask
            # During cached generation the model sees only the newest positions of the mask.
            if token_mask.dim() == len(lead_shape) and token_mask.shape[-1] > lead_shape[-1]:
                token_mask = token_mask[..., -lead_shape[-1] :]
        if token_mask is not None:
            if token_mask.shape != lead_shape:
                raise ValueError(
                    f"token_mask must have the input's leading shape {tuple(lead_shape)}, "
                    f"got {tuple(token_mask.shape)}"
                )
            token_mask = token_mask.reshape(-1)
        if cluster_ids is None:
            cluster_ids = self.cluster_ids
        if cluster_ids is not None:
            check_cluster_ids_type(cluster_ids)
            if cluster_ids.shape == lead_shape:
                cluster_ids = cluster_ids.reshape(-1)
            elif len(lead_shape) >= 2 and cluster_ids.shape == lead_shape[:1]:
                cluster_ids = cluster_ids.view(-1, *([1] * (len(lead_shape) - 1))).expand(lead_shape)
                cluster_ids = cluster_ids.reshape(-1)  # one id per sample -> one per token
            else:
                raise ValueError(
                    f"cluster_ids must have one id per sample {tuple(lead_shape[:1])} or per token "
                    f"{tuple(lead_shape)}, got shape {tuple(cluster_ids.shape)}"
                )
        return token_mask, cluster_ids


class MoEFeedForward(SparseLayer):
    """E FFN experts and a top-k router in place of one dense MLP; output shaped like the input.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaMLP, LlamaConfig
        >>> mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2))
        >>> moe = MoEFeedForward.from_dense(mlp, num_experts=4, top_k=2)
        >>> x = torch.randn(2, 3, 8)
        >>> torch.allclose(moe(x), mlp(x), atol=1e-6)
        True
    """

    def forward(
        self, x: Tensor, token_mask: Tensor | None = None, cluster_ids: Tensor | None = None
    ) -> Tensor:
        path = self._graph_path(x)
        if path is not None:
            return self._graphed_forward(x, path, token_mask, cluster_ids)
        out, _ = self.route_and_dispatch(x, token_mask, cluster_ids)
        return out

    def _graph_path(self, x: Tensor) -> str | None:
        """The dispatch ("decode" or "grouped") a CUDA graph of this forward captures and
        replays (`vlmoe.moe.graphs`), or None to run it eagerly: a decoding step that may replay
        (`SparseLayer._decoding_tokens`) and a dispatch that never reads the host: the decode
        kernels, or grouped_mm below QuACK's sizes."""
        num_tokens = self._decoding_tokens(x)
        if num_tokens is None:
            return None
        experts, router = self.experts, self.router
        num_slots = num_tokens * router.config.top_k
        # The dispatcher's own choice (no capacity here: a routing that replays has none).
        chosen = chosen_backend(self.backend, x, experts)
        if chosen == "decode":
            return "decode" if isinstance(experts, GLUExperts) else None  # else its eager error
        if (
            chosen == "grouped"
            and isinstance(experts, (GLUExperts, MLPExperts))
            and num_slots < quack_gemm.MIN_ROWS
            and grouped_mm_runs(x, _expert_weights(experts))
        ):
            return "grouped"
        return None

    def _graphed_forward(
        self, x: Tensor, path: str, token_mask: Tensor | None, cluster_ids: Tensor | None
    ) -> Tensor:
        experts = self.experts
        # Everything the captured forward reads besides x (the module note of vlmoe.moe.graphs).
        key = (
            path,
            *self._router_key(),
            id(experts),
            id(experts.act_fn),
            graphs.parameter_addresses(experts),
        )
        return self._replay(x, key, self._eager_forward, token_mask, cluster_ids)

    def _eager_forward(self, x: Tensor, cluster_ids: Tensor | None = None) -> Tensor:
        """What a graph captures: routing and dispatch only. Without the layer's padding mask
        (no output reads it here); cluster ids # [T] only when the router routes by them."""
        x_tokens = x.reshape(-1, x.shape[-1])
        out = dispatch(x_tokens, self.router(x_tokens, cluster_ids=cluster_ids), self.experts, self.backend)
        return out.view(*x.shape[:-1], out.shape[-1])

    @classmethod
    def from_dense(
        cls,
        mlp: nn.Module,
        num_experts: int = 4,
        top_k: int = 2,
        *,
        load_balance_coef: float = 0.01,
        z_loss_coef: float = 0.0,
        capacity_factor: float | None = None,
        min_capacity: int = 0,
        jitter_noise: float = 0.0,
        normalize_top_k: bool = True,
        load_balance_first_choice: bool = False,
        backend: str = "auto",
    ) -> MoEFeedForward:
        """Upcycle: every expert is a copy of `mlp`, so the layer computes `mlp`'s function.

        Exact for top_k >= 2 with renormalised weights (the MoE-LLaVA setting). With top_k=1 the
        chosen probability scales the output (Switch / DeepSpeed top-1), so the layer starts as
        gate * mlp(x).
        """
        config = RouterConfig(
            num_experts=num_experts,
            top_k=top_k,
            normalize_top_k=normalize_top_k,
            jitter_noise=jitter_noise,
            capacity_factor=capacity_factor,
            min_capacity=min_capacity,
            load_balance_coef=load_balance_coef,
            load_balance_first_choice=load_balance_first_choice,
            z_loss_coef=z_loss_coef,
        )
        experts = experts_from_dense(mlp, num_experts)
        hidden_size = (
            experts.gate_up_proj.shape[-1]
            if hasattr(experts, "gate_up_proj")
            else experts.fc1_weight.shape[-1]
        )
        reference = next(iter(experts.parameters()))
        router = Router(hidden_size, config).to(device=reference.device, dtype=reference.dtype)
        return cls(router, experts, backend=backend)


class MoLELinear(SparseLayer):
    """A frozen linear plus K routed LoRA experts and/or an always-on universal LoRA.

    y = base(x) + s * B_u A_u x (universal, if any) + sum_chosen w_e * s * B_e A_e x.
    Every B starts at zero, so the layer starts equal to `base`. With `num_experts=0` and
    `universal=True` it is plain LoRA (what LLaVA-MoLE puts on attention).

    Example:
        >>> base = nn.Linear(8, 16)
        >>> mole = MoLELinear(base, num_experts=4, rank=2, alpha=4, top_k=1)
        >>> x = torch.randn(3, 8)
        >>> torch.equal(mole(x), base(x))
        True
    """

    def __init__(
        self,
        base: nn.Linear,
        num_experts: int = 4,
        rank: int = 16,
        alpha: float = 32.0,
        top_k: int = 1,
        *,
        dropout: float = 0.0,
        universal: bool = False,
        router_input: str = "token",
        num_clusters: int = 0,
        temperature: float = 1.0,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        straight_through: bool = False,
        backend: str = "auto",
    ) -> None:
        if not isinstance(base, nn.Linear):
            raise ValueError(f"base must be an nn.Linear, got {type(base).__name__}")
        if num_experts < 0:
            raise ValueError(f"num_experts must be >= 0 (0 = plain LoRA), got {num_experts}")
        if num_experts == 0 and not universal:
            raise ValueError("num_experts=0 leaves no adapter: set universal=True for plain LoRA")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        router = experts = None
        if num_experts > 0:
            config = RouterConfig(
                num_experts=num_experts,
                top_k=top_k,
                input=router_input,
                num_clusters=num_clusters,
                temperature=temperature,
                load_balance_coef=load_balance_coef,
                z_loss_coef=z_loss_coef,
                straight_through=straight_through,
            )
            router = Router(base.in_features, config).to(**factory)
            experts = LoRAExperts(num_experts, base.in_features, base.out_features, rank, alpha, dropout).to(
                **factory
            )
        super().__init__(router, experts, backend)
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.universal = (
            LoRAExperts(1, base.in_features, base.out_features, rank, alpha, dropout).to(**factory)
            if universal
            else None
        )

    @classmethod
    def plain(cls, base: nn.Linear, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0) -> MoLELinear:
        """Plain LoRA on `base` (no routing)."""
        return cls(base, num_experts=0, rank=rank, alpha=alpha, dropout=dropout, universal=True)

    @property
    def input_size(self) -> int:
        return self.base.in_features

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        # HF code sometimes reads `.weight` of a projection (e.g. for its dtype).
        return self.base.weight

    def forward(
        self,
        x: Tensor,
        token_mask: Tensor | None = None,
        cluster_ids: Tensor | None = None,
        routing: Routing | None = None,
    ) -> Tensor:
        """x # [..., in] -> [..., out]. `routing` reuses a decision made elsewhere (a shared router)."""
        if self.experts is None and self.universal is None:
            # Every adapter merged (`vlmoe.merge_lora`): the base linear alone, no wrapper work, as
            # a decoding step at batch 1 is bound by the host's time per op.
            return self.base(x)
        self._check_input(x)
        x_tokens = x.reshape(-1, x.shape[-1])
        if self.experts is None:  # plain LoRA
            return self._plain_forward(x, x_tokens)
        if resolve_backend(self.backend, x_tokens, self.experts) == "dense":
            return self._dense_forward(x, x_tokens, token_mask, cluster_ids, routing)
        out = self.base(x)
        if routing is None:
            routing = self.route(x, token_mask, cluster_ids)
        delta = dispatch(x_tokens, routing, self.experts, self.backend)
        if self.universal is not None:
            delta = delta + self.universal.expert_forward(0, x_tokens)
        return out + delta.view(*x.shape[:-1], delta.shape[-1])

    def _plain_forward(self, x: Tensor, x_tokens: Tensor) -> Tensor:
        """base(x) + s * B A x with the adapter's second matmul adding, scaled, in place into the
        base output (as `_dense_forward` does): three kernels, where a separate scaling and sum
        would add two passes over [T, out]."""
        out = self.base(x_tokens)
        universal = self.universal
        if universal is not None:
            low_rank = universal.dropout(x_tokens) @ universal.lora_A[0].t()  # [T, r]
            # The operands in the output's dtype: in-place ops do not autocast (see _dense_forward).
            lora_B = universal.lora_B[0].t().to(out.dtype)
            out = out.addmm_(low_rank.to(out.dtype), lora_B, alpha=universal.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])

    def _dense_forward(
        self,
        x: Tensor,
        x_tokens: Tensor,
        token_mask: Tensor | None,
        cluster_ids: Tensor | None,
        routing: Routing | None,
    ) -> Tensor:
        """Routed experts (and the universal one, gate 1) in two matmuls, the second adding in
        place into the base output: no [T, out] pass for the scaling, the sum or a copy. In
        training the router's gate rides in the first matmul too (one read of x, one input
        gradient; benchmarks/NOTES.md v7)."""
        experts, router = self.experts, self.router
        stacked_A = experts.stacked_A(self.universal)  # [n, in]
        fold_gate = (
            routing is None
            and torch.is_grad_enabled()
            and router.gate_is_plain_linear
            and isinstance(experts.dropout, nn.Identity)
            and router.gate.weight.dtype == stacked_A.dtype
        )
        if fold_gate:
            num_rows, num_experts = stacked_A.shape[0], router.config.num_experts
            # Zero rows pad the width to a multiple of 8: unaligned widths (e.g. 4 * 64 + 4)
            # send cuBLAS to kernels twice as slow (measured on an H200).
            padding = stacked_A.new_zeros(-(num_rows + num_experts) % 8, stacked_A.shape[1])
            both = x_tokens @ torch.cat([stacked_A, router.gate.weight, padding]).t()  # [T, n + E + pad]
            low_rank, logits = both[:, :num_rows], both[:, num_rows : num_rows + num_experts]
            routing = self.route(x, token_mask, cluster_ids, logits=logits)
        else:
            if routing is None:
                routing = self.route(x, token_mask, cluster_ids)
            low_rank = experts.dropout(x_tokens) @ stacked_A.t()
        # The routing's block gates, made once for every linear that shares this routing.
        universal = self.universal

        def block_gates() -> Tensor:
            return experts.block_gates(gate_matrix(routing).to(x.dtype), universal)

        key = ("lora block gates", x.dtype, experts.scaling, universal is not None)
        low_rank = experts.apply_block_gates(low_rank, routing.derived(key, block_gates))
        # In place into the base output, which nothing saves for backward (the frozen linear
        # keeps its input): one matmul reading and writing [T, out] once. In-place ops do not
        # autocast: under mixed precision the base output is bf16 while the adapters are
        # float32, so the operands take the output's dtype, as autocast's own matmul would.
        out = self.base(x_tokens)
        stacked_B = experts.stacked_B(self.universal)
        out = out.addmm_(low_rank.to(out.dtype), stacked_B.t().to(out.dtype))
        return out.view(*x.shape[:-1], out.shape[-1])

    @torch.no_grad()
    def merge_universal(self) -> MoLELinear:
        """Fold the universal (or plain) LoRA into the base weight; logits stay the same up to one
        rounding of the merged weight (W + s B A is summed in float32 or wider, then cast once)."""
        if self.universal is not None:
            weight = self.base.weight
            compute = torch.promote_types(weight.dtype, torch.float32)
            delta = self.universal.delta_weight(0, compute)
            weight.copy_((weight.to(compute) + delta).to(weight.dtype))
            self.universal = None
        return self


class MoEConnector(SparseLayer):
    """Projector experts between the vision tower and the LM, with a top-k router (ChartMoE).

    Example:
        >>> proj = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16))
        >>> con = MoEConnector.upcycle(proj, num_experts=4, top_k=2)
        >>> x = torch.randn(2, 5, 8)
        >>> torch.allclose(con(x), proj(x), atol=1e-6)
        True
    """

    routes_text_tokens = False

    def forward(self, image_features: Tensor) -> Tensor:
        out, _ = self.route_and_dispatch(image_features, None, None)
        return out

    @classmethod
    def from_projectors(
        cls,
        projectors: list[nn.Module],
        top_k: int = 2,
        *,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        backend: str = "auto",
    ) -> MoEConnector:
        """Aligned init: expert i is a copy of `projectors[i]` (e.g. general, table, JSON, code)."""
        if not projectors:
            raise ValueError("from_projectors needs at least one projector")
        config = RouterConfig(
            num_experts=len(projectors),
            top_k=top_k,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
        )
        experts = _stack_projectors(projectors)
        reference = next(iter(experts.parameters()))
        input_size = _projector_input_size(projectors[0])
        router = Router(input_size, config).to(device=reference.device, dtype=reference.dtype)
        return cls(router, experts, backend=backend)

    @classmethod
    def upcycle(
        cls,
        projector: nn.Module,
        num_experts: int = 4,
        top_k: int = 2,
        *,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        backend: str = "auto",
    ) -> MoEConnector:
        """Every expert a copy of `projector`: the connector computes the projector's function."""
        return cls.from_projectors(
            [projector] * num_experts,
            top_k,
            load_balance_coef=load_balance_coef,
            z_loss_coef=z_loss_coef,
            backend=backend,
        )

    @classmethod
    def random(
        cls,
        projector: nn.Module,
        num_experts: int = 4,
        top_k: int = 2,
        *,
        load_balance_coef: float = 0.0,
        z_loss_coef: float = 0.0,
        backend: str = "auto",
    ) -> MoEConnector:
        """Experts shaped like `projector`, each freshly initialised by its layers' own init."""
        fresh = [reinitialize(copy.deepcopy(projector)) for _ in range(num_experts)]
        return cls.from_projectors(
            fresh, top_k, load_balance_coef=load_balance_coef, z_loss_coef=z_loss_coef, backend=backend
        )


def reinitialize(projector: nn.Module) -> nn.Module:
    """`projector` with every layer inside it freshly initialised by its own `reset_parameters`
    (in place, in module order, from torch's current random state); returns it."""
    for module in projector.modules():
        if module is not projector and callable(getattr(module, "reset_parameters", None)):
            module.reset_parameters()
    return projector


def _projector_input_size(projector: nn.Module) -> int:
    for module in projector.modules():
        if isinstance(module, nn.Linear):
            return module.in_features
    raise ValueError(f"cannot tell the input size of {type(projector).__name__}: it has no nn.Linear")


def _stack_projectors(projectors: list[nn.Module]) -> MLPExperts | ModuleExperts:
    """Stack two-layer MLP projectors of one shape into MLPExperts; anything else is a loop."""
    pairs = [_linear_pair(p) for p in projectors]
    if all(pair is not None for pair in pairs):
        # The activation too (type and settings, e.g. GELU's approximate): stacked experts share one.
        shapes = {
            (
                p[0].weight.shape,
                p[1].weight.shape,
                p[0].bias is None,
                p[1].bias is None,
                type(p[2]),
                repr(p[2]),
            )
            for p in pairs
        }
        if len(shapes) == 1 and pairs[0][0].bias is not None and pairs[0][1].bias is not None:
            fc1, fc2, act = pairs[0]
            experts = MLPExperts(len(projectors), fc1.in_features, fc1.out_features, fc2.out_features, act)
            experts = experts.to(device=fc1.weight.device, dtype=fc1.weight.dtype)
            with torch.no_grad():
                for e, (p_fc1, p_fc2, _) in enumerate(pairs):
                    experts.fc1_weight[e].copy_(p_fc1.weight)
                    experts.fc1_bias[e].copy_(p_fc1.bias)
                    experts.fc2_weight[e].copy_(p_fc2.weight)
                    experts.fc2_bias[e].copy_(p_fc2.bias)
            experts.act_fn = copy.deepcopy(act)
            return experts
    return ModuleExperts([copy.deepcopy(p) for p in projectors])
