"""Top-k router: which experts each token goes to, with what weight, and the router losses.

Shape legend: T tokens, E experts, K top_k, D hidden size, C cluster-embedding size.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from vlmoe.moe.config import BalanceScope, RouterConfig
from vlmoe.moe.kernels import use_triton
from vlmoe.moe.kernels.routing import route_triton, topk_softmax

# With autograd off, up to this many tokens are routed by one fused kernel on CUDA
# (`vlmoe.moe.kernels.routing`): decoding steps, where the six torch launches dominate.
FUSED_ROUTING_MAX_TOKENS = 256
# ... and while the gate (experts x hidden elements) is this small: each token's program reads
# all of it in E x D / 4096 dependent steps of ~1.5 us. Past it the gate's matmul and
# `topk_softmax` take over (three launches): at 64 experts x 2048 the one-kernel routing costs 48
# us of GPU time more per layer and token (H200, NOTES.md v21); at 4 x 2048 it saves 3.
FUSED_ROUTING_MAX_GATE = 16384
# With autograd on (training), softmax, top-k and renormalising run in `topk_softmax`'s two Triton
# kernels on CUDA, which also count the slots per expert for the balance loss and the dispatch plan.
FUSED_TOPK = True


@dataclass
class Routing:
    """One routing decision for T tokens. Tensors are in token order."""

    expert_indices: Tensor  # [T, K] int64, the chosen experts, best first
    combine_weights: Tensor  # [T, K] float, 0 for dropped slots
    router_probs: Tensor  # [T, E] float32 (float64 for float64 inputs)
    router_logits: Tensor  # [T, E]
    kept: Tensor | None = None  # [T, K] bool; None means every slot is computed (dropless)
    token_mask: Tensor | None = None  # [T] bool, True for real (non-padding) tokens
    aux_losses: dict[str, Tensor] = field(default_factory=dict)  # already scaled by coefficients
    # [E] int, token-slots per expert, where the fused router counted them (nothing dropped).
    expert_counts: Tensor | None = None
    # What layers sharing this routing derive from it alike (`derived`); not copied by replace().
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return self.router_probs.shape[-1]

    def derived(self, key: Hashable, make: Callable[[], Tensor]) -> Tensor:
        """make(), once per routing and key: the three linears of a MoLE feed-forward share one
        routing, and each would otherwise rebuild the same gate matrix (three to five small
        kernels apiece). `key` must name everything make() reads besides this routing.

        Example:
            >>> probs = torch.full((2, 3), 1 / 3)
            >>> routing = Routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), probs, probs.log())
            >>> routing.derived("n", lambda: torch.ones(1)) is routing.derived("n", lambda: torch.zeros(1))
            True
        """
        value = self._derived.get(key)
        if value is None:
            value = self._derived[key] = make()
        return value

    def tokens_per_expert(self) -> Tensor:
        """Computed token-slots per expert (dropped and padding slots excluded). # [E]"""
        if self.expert_counts is not None and self.kept is None and self.token_mask is None:
            return self.expert_counts
        indices = self.expert_indices
        if self.kept is not None:
            indices = indices[self.kept]
        elif self.token_mask is not None:  # dropless: padding is routed too, but is no load
            indices = indices[self.token_mask]
        return torch.bincount(indices.flatten(), minlength=self.num_experts)

    def detached(self) -> Routing:
        return replace(
            self,
            combine_weights=self.combine_weights.detach(),
            router_probs=self.router_probs.detach(),
            router_logits=self.router_logits.detach(),
            aux_losses={name: loss.detach() for name, loss in self.aux_losses.items()},
        )


def load_balancing_loss(
    router_probs: Tensor,
    expert_indices: Tensor,
    token_mask: Tensor | None = None,
    *,
    scope: BalanceScope = "device",
    group: dist.ProcessGroup | None = None,
    expert_counts: Tensor | None = None,
) -> Tensor:
    """Switch-Transformer balance loss E * sum_i f_i * P_i over real tokens (1.0 when uniform).

    f_i is the fraction of token-slots whose router chose expert i, P_i the mean router
    probability of expert i. Only P carries a gradient. With `scope="global"` (and
    torch.distributed initialised) the expert counts, probability sums and token count are all-reduced
    over `group` (None: every process) first: every rank gets the global batch's loss, and the
    mean of the ranks' gradients (what DDP takes) is its gradient. `expert_counts` # [E]: the
    slots per expert of `expert_indices`, where the caller has them (the fused router); only
    used without a token mask.

    Example:
        >>> probs = torch.full((4, 2), 0.5); idx = torch.tensor([[0], [1], [0], [1]])
        >>> float(load_balancing_loss(probs, idx))
        1.0
    """
    num_tokens, num_experts = router_probs.shape
    top_k = expert_indices.shape[-1]
    if token_mask is None:  # the common case, in few kernels (each small launch costs GPU time)
        if expert_counts is not None:
            slots_per_expert = expert_counts.to(router_probs.dtype)
        else:
            slots_per_expert = router_probs.new_zeros(num_experts).index_add_(
                0, expert_indices.reshape(-1), router_probs.new_ones(expert_indices.numel())
            )
        prob_sum = router_probs.sum(dim=0)  # [E]
        num_real: Tensor | int = num_tokens
    else:
        # Masks as weights, not boolean indexing: no host sync on CUDA.
        token_weight = token_mask.to(router_probs.dtype)
        slot_weight = token_weight.unsqueeze(-1).expand_as(expert_indices)  # [T, K]
        slots_per_expert = router_probs.new_zeros(num_experts).scatter_add_(
            0, expert_indices.reshape(-1), slot_weight.reshape(-1)
        )
        prob_sum = (router_probs * token_weight.unsqueeze(-1)).sum(dim=0)  # [E]
        num_real = token_weight.sum()
    if scope == "global" and dist.is_available() and dist.is_initialized():
        return _global_balance_loss(slots_per_expert, prob_sum, num_real, top_k, group)
    num_real = num_real.clamp_min(1.0) if isinstance(num_real, Tensor) else max(num_real, 1)
    # E * sum_i (slots_i / (N * K)) * (prob_sum_i / N), with N the real-token count.
    return torch.dot(slots_per_expert, prob_sum) * (num_experts / top_k) / (num_real * num_real)


def _global_balance_loss(
    slots_per_expert: Tensor, prob_sum: Tensor, num_real: Tensor | int, top_k: int, group
) -> Tensor:
    """The balance loss of the batch of every rank in `group`, from one all-reduce of 2E+1 numbers.

    Its value is the global loss on every rank; its gradient is this rank's share (its tokens'
    P_i against the global f_i, times the world size), so the mean over ranks that DDP takes is
    the gradient of the global loss. The counts are constants to autograd.
    """
    num_experts = prob_sum.shape[0]
    real = torch.as_tensor(num_real, dtype=prob_sum.dtype, device=prob_sum.device).reshape(1)
    stats = torch.cat([slots_per_expert, prob_sum, real]).detach()
    dist.all_reduce(stats, group=group)
    global_slots, global_prob_sum = stats[:num_experts], stats[num_experts:-1]
    num_global = stats[-1].clamp_min(1.0)
    scale = num_experts / (top_k * num_global * num_global)
    value = torch.dot(global_slots, global_prob_sum) * scale
    share = torch.dot(global_slots, prob_sum) * (scale * dist.get_world_size(group))
    return value + (share - share.detach())


def router_z_loss(router_logits: Tensor, token_mask: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2; keeps logits small."""
    z_squared = torch.logsumexp(router_logits, dim=-1).square()  # [T]
    if token_mask is None:
        return z_squared.mean() if z_squared.numel() else z_squared.sum()
    token_weight = token_mask.to(z_squared.dtype)
    return (z_squared * token_weight).sum() / token_weight.sum().clamp_min(1.0)


def capacity_keep_mask(
    expert_indices: Tensor, num_experts: int, capacity: int, token_mask: Tensor | None = None
) -> Tensor:
    """Which token-slots fit in their expert's capacity. # [T, K] bool

    Priority follows GShard / DeepSpeed-MoE: every token's first choice before any token's
    second choice, and within one choice rank, earlier tokens first. Padding tokens take no
    capacity and are never kept.
    """
    num_tokens, top_k = expert_indices.shape
    rank_major = expert_indices.t().reshape(-1)  # [K*T]
    one_hot = F.one_hot(rank_major, num_experts)  # [K*T, E]
    if token_mask is not None:
        one_hot = one_hot * token_mask.repeat(top_k).unsqueeze(-1).to(one_hot.dtype)
    position_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # -1 for padding
    keep = (position_in_expert >= 0) & (position_in_expert < capacity)
    return keep.view(top_k, num_tokens).t()


class Router(nn.Module):
    """Top-k router over `config.num_experts` experts.

    The padding mask and MoCLE's cluster ids arrive as arguments; the layers that own a router
    also accept them from `vlmoe.moe.routing_inputs`, since an HF model does not pass them down.

    Example:
        >>> router = Router(8, RouterConfig(num_experts=4, top_k=2))
        >>> router(torch.randn(5, 8)).expert_indices.shape
        torch.Size([5, 2])
    """

    def __init__(self, hidden_size: int, config: RouterConfig) -> None:
        super().__init__()
        if config.straight_through and config.top_k != 1:
            raise ValueError(f"straight_through routing needs top_k=1, got top_k={config.top_k}")
        self.config = config
        if config.input == "cluster":
            self.cluster_embedding = nn.Embedding(config.num_clusters, config.cluster_embed_dim)
            gate_input_size = config.cluster_embed_dim
        else:
            self.cluster_embedding = None
            gate_input_size = hidden_size
        self.gate = nn.Linear(gate_input_size, config.num_experts, bias=config.bias)
        # Ablation switch (ChartMoE's forced-expert evaluation): when set, every token goes to
        # this expert alone, whatever the router would choose.
        self.forced_expert: int | None = None
        # The data-parallel process group of load_balance_scope="global" (None: every process).
        self.balance_group: dist.ProcessGroup | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small random init: upcycled experts are identical, so any routing is exact at step 0.
        nn.init.normal_(self.gate.weight, std=0.02)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)
        if self.cluster_embedding is not None:
            nn.init.normal_(self.cluster_embedding.weight, std=1.0)

    def forward(
        self,
        hidden: Tensor,
        token_mask: Tensor | None = None,
        cluster_ids: Tensor | None = None,
        logits: Tensor | None = None,
    ) -> Routing:
        """Route `hidden` # [T, D]; token_mask # [T] bool; cluster_ids # [T] int (cluster mode).

        `logits` # [T, E]: the gate's output, when the caller computed it inside a matmul of its
        own (allowed while `gate_is_plain_linear`); `hidden` then only gives the token count.
        """
        cfg = self.config
        if token_mask is not None:
            token_mask = token_mask.to(device=hidden.device, dtype=torch.bool)
        if logits is None and self._fused_routing_applies(hidden):
            return self._fused_routing(hidden, token_mask)
        router_logits = self._logits(hidden, cluster_ids) if logits is None else logits  # [T, E]
        compute_dtype = torch.promote_types(router_logits.dtype, torch.float32)
        router_logits = router_logits.to(compute_dtype)
        if self._fused_topk_applies(router_logits):
            return self._fused_topk(router_logits, token_mask)
        scaled_logits = router_logits if cfg.temperature == 1.0 else router_logits / cfg.temperature
        router_probs = torch.softmax(scaled_logits, dim=-1)
        # Ties go to the lower expert index, as argmax (Switch, DeepSpeed-MoE) and the fused
        # kernels break them; torch.topk picks any of the tied experts (bf16 logits tie often).
        sorted_probs, order = torch.sort(router_probs, dim=-1, descending=True, stable=True)
        top_probs, expert_indices = sorted_probs[:, : cfg.top_k], order[:, : cfg.top_k]  # [T, K]
        if self.forced_expert is not None:
            if not 0 <= self.forced_expert < cfg.num_experts:
                raise ValueError(f"forced_expert must be in [0, {cfg.num_experts}), got {self.forced_expert}")
            # All K slots to the forced expert with weights 1/K: the output is that expert's.
            expert_indices = torch.full_like(expert_indices, self.forced_expert)
            top_probs = torch.full_like(top_probs, 1.0 / cfg.top_k)

        kept = None
        # A forced expert takes every token (the ablation's point): its K slots all go to one
        # expert, so a capacity limit would drop most tokens and halve the rest.
        if cfg.capacity_factor is not None and self.forced_expert is None:  # a host sync: only when needed
            capacity = cfg.capacity(int(token_mask.sum()) if token_mask is not None else hidden.shape[0])
            kept = capacity_keep_mask(expert_indices, cfg.num_experts, capacity, token_mask)
            top_probs = top_probs * kept
        combine_weights = top_probs
        if cfg.top_k > 1 and cfg.normalize_top_k and self.forced_expert is None:
            total = top_probs.sum(dim=-1, keepdim=True)  # > 0 unless capacity dropped every slot
            combine_weights = top_probs / (total if kept is None else total.clamp_min(1e-9))
        return self._finish(router_logits, router_probs, expert_indices, combine_weights, kept, token_mask)

    def _finish(
        self,
        router_logits: Tensor,
        router_probs: Tensor,
        expert_indices: Tensor,
        combine_weights: Tensor,
        kept: Tensor | None,
        token_mask: Tensor | None,
        expert_counts: Tensor | None = None,
    ) -> Routing:
        """The straight-through weights and the router losses, the same after either top-k."""
        cfg = self.config
        if cfg.straight_through:
            # Forward value 1 (0 where dropped); gradient of the chosen probability.
            ones = torch.ones_like(combine_weights) if kept is None else kept.to(combine_weights.dtype)
            combine_weights = combine_weights - combine_weights.detach() + ones

        aux_losses: dict[str, Tensor] = {}
        # The losses only matter to an optimiser: skip them under no_grad (generation, eval),
        # where they would be a dozen wasted kernel launches per layer and token.
        wants_losses = torch.is_grad_enabled()
        if cfg.load_balance_coef > 0 and wants_losses:
            first_choice = cfg.load_balance_first_choice and cfg.top_k > 1
            counted = expert_indices[:, :1] if first_choice else expert_indices
            balance = load_balancing_loss(
                router_probs, counted, token_mask, scope=cfg.load_balance_scope, group=self.balance_group,
                expert_counts=None if first_choice else expert_counts,
            )  # fmt: skip
            aux_losses["load_balance"] = cfg.load_balance_coef * balance
        if cfg.z_loss_coef > 0 and wants_losses:
            aux_losses["z_loss"] = cfg.z_loss_coef * router_z_loss(router_logits, token_mask)
        return Routing(
            expert_indices=expert_indices,
            combine_weights=combine_weights,
            router_probs=router_probs,
            router_logits=router_logits,
            kept=kept,
            token_mask=token_mask,
            aux_losses=aux_losses,
            expert_counts=expert_counts,
        )

    def _fused_topk_applies(self, router_logits: Tensor) -> bool:
        """Softmax, top-k and renormalising in `topk_softmax`'s kernels (with autograd): on CUDA,
        float32 logits, no forced expert and no capacity (which drops slots before renormalising)."""
        cfg = self.config
        return (
            FUSED_TOPK
            and use_triton(router_logits)
            and router_logits.dtype == torch.float32
            and router_logits.dim() == 2
            and cfg.num_experts <= 256
            and self.forced_expert is None
            and cfg.capacity_factor is None
        )

    def _fused_topk(self, router_logits: Tensor, token_mask: Tensor | None) -> Routing:
        cfg = self.config
        normalize = cfg.top_k > 1 and cfg.normalize_top_k
        probs, weights, indices, counts = topk_softmax(router_logits, cfg.top_k, cfg.temperature, normalize)
        return self._finish(router_logits, probs, indices, weights, None, token_mask, expert_counts=counts)

    @property
    def gate_is_plain_linear(self) -> bool:
        """Whether the logits are exactly `hidden @ gate.weight.T`: token input, no bias, no jitter
        now. Then a caller may fold the gate into its own matmul over the same input."""
        jitter = self.training and self.config.jitter_noise > 0
        return self.cluster_embedding is None and self.gate.bias is None and not jitter

    def routing_replays(self) -> bool:
        """Whether, with autograd off, this routing is a function of the input and the parameters
        (and, routing by cluster, of the cluster ids: a graph's second input) that reads nothing
        to the host: what a CUDA graph may capture (`vlmoe.moe.graphs`). Not so for a forced
        expert, capacity (a host count), straight-through weights or training-time jitter."""
        cfg = self.config
        return (
            not torch.is_grad_enabled()
            and self.forced_expert is None
            and cfg.capacity_factor is None
            and not cfg.straight_through
            and not (self.training and cfg.jitter_noise > 0)
        )

    def _fused_routing_applies(self, hidden: Tensor) -> bool:
        cfg = self.config
        return (
            self.routing_replays()
            and self.cluster_embedding is None
            and use_triton(hidden)
            and hidden.shape[0] <= FUSED_ROUTING_MAX_TOKENS
            and cfg.num_experts <= 256
            and cfg.num_experts * hidden.shape[-1] <= FUSED_ROUTING_MAX_GATE
            and hidden.dtype == self.gate.weight.dtype
            and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
        )

    def _fused_routing(self, hidden: Tensor, token_mask: Tensor | None) -> Routing:
        cfg = self.config
        normalize = cfg.top_k > 1 and cfg.normalize_top_k
        logits, probs, indices, weights = route_triton(
            hidden, self.gate.weight, self.gate.bias, cfg.top_k, cfg.temperature, normalize
        )
        # No aux losses: they exist for an optimiser, and autograd is off here.
        return Routing(indices, weights, probs, logits, token_mask=token_mask)

    def _logits(self, hidden: Tensor, cluster_ids: Tensor | None) -> Tensor:
        cfg = self.config
        if self.cluster_embedding is None:
            if self.training and cfg.jitter_noise > 0:
                noise = torch.empty_like(hidden).uniform_(1.0 - cfg.jitter_noise, 1.0 + cfg.jitter_noise)
                hidden = hidden * noise
            return self.gate(hidden.to(self.gate.weight.dtype))
        if cluster_ids is None:
            raise ValueError(
                "this router routes by instruction cluster (input='cluster') but got no cluster_ids; "
                "pass cluster_ids=... or wrap the forward in vlmoe.moe.routing_inputs(model, cluster_ids=...)"
            )
        check_cluster_ids_type(cluster_ids)
        cluster_ids = cluster_ids.to(hidden.device)
        if cluster_ids.shape != hidden.shape[:1]:
            raise ValueError(
                f"cluster_ids must have one id per token, shape {tuple(hidden.shape[:1])}, "
                f"got {tuple(cluster_ids.shape)}"
            )
        if (
            not cluster_ids.is_cuda
        ):  # on CUDA, routing_inputs checks once per model forward (no sync per layer)
            check_cluster_ids(cluster_ids, cfg.num_clusters)
        # A handful of clusters: score them all ([C, E]) and index, rather than embed per token.
        logits_per_cluster = self.gate(self.cluster_embedding.weight)
        return logits_per_cluster[cluster_ids]


def check_cluster_ids_type(cluster_ids: object) -> None:
    """Raise a ValueError unless `cluster_ids` is an integer tensor (no host sync): a bool tensor
    would index the clusters as a mask (fewer rows than tokens), a float one fail deep in torch."""
    if not isinstance(cluster_ids, Tensor):
        raise ValueError(
            f"cluster_ids is a {type(cluster_ids).__name__}; pass a tensor of cluster indices, "
            "e.g. torch.tensor([3, 0])"
        )
    if cluster_ids.is_floating_point() or cluster_ids.is_complex() or cluster_ids.dtype == torch.bool:
        raise ValueError(
            f"cluster_ids is a {cluster_ids.dtype} tensor; pass the k-means cluster indices as an "
            "integer tensor (cluster_ids.long())"
        )


def check_cluster_ids(cluster_ids: Tensor, num_clusters: int) -> None:
    """Raise a ValueError unless `cluster_ids` is an integer tensor with every id in [0, num_clusters)."""
    check_cluster_ids_type(cluster_ids)
    if not cluster_ids.numel():
        return
    # Both bounds in one read to the host (one synchronisation on CUDA, not two or four).
    lowest, highest = torch.stack(torch.aminmax(cluster_ids)).tolist()
    if lowest < 0 or highest >= num_clusters:
        raise ValueError(
            f"cluster_ids must be in [0, num_clusters={num_clusters}), got values in [{lowest}, {highest}]"
        )
