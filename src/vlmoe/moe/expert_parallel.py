"""Expert parallelism: the experts of an `MoEFeedForward` sharded over the ranks of a process group.

Shape legend: S token-slots of this rank (sorted by expert, dropped ones last), R slots received
from all ranks, E experts, L = E / W local experts, W ranks, I/O expert input/output size.

Rank r holds experts [r*L, (r+1)*L). The router stays replicated and the layer's dispatch is
unchanged: `ExpertParallelExperts` is an expert container (the `Experts` protocol) whose
`forward(x_sorted, plan)` sends each expert's rows to its owner with `all_to_all_single`
(counts first, so every rank knows what it receives), runs the local experts through their own
grouped path, and sends the results back. The combine (the weighted sum over the top-k slots)
happens on the rank that owns the token, as it does without parallelism.

    shard_experts(model, group)      # in place, every rank: each MoEFeedForward keeps its L experts
    unshard_experts(model)           # in place, every rank: all-gather back the full experts

Gradients: an expert's weights get the gradient of every rank's tokens (the backward of the
exchange is the reverse exchange). Under DDP those weights must be left out of DDP's all-reduce
and divided by W to be a mean like the replicated ones: `expert_parallel_ddp(model)` does both.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vlmoe.moe.dispatch import DispatchPlan
from vlmoe.moe.experts import GLUExperts, LoRAExperts, MLPExperts
from vlmoe.moe.layers import MoEFeedForward


class _AllToAll(torch.autograd.Function):
    """Rows exchanged between ranks; the backward sends the gradients the reverse way."""

    @staticmethod
    def forward(ctx, x: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        send_splits, recv_splits = ctx.splits
        grad_x = grad_out.new_empty(sum(send_splits), *grad_out.shape[1:])
        dist.all_to_all_single(grad_x, grad_out.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_x, None, None, None


class ExpertParallelExperts(nn.Module):
    """This rank's share of E experts, answering dispatch as if it held all of them.

    Example (on every rank of an initialised process group):
        >>> experts = ExpertParallelExperts.shard(full_experts, group=None)  # doctest: +SKIP
    """

    def __init__(self, local: nn.Module, num_experts: int, group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.local = local
        self.num_experts = num_experts
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_local = num_experts // self.world_size

    @classmethod
    def shard(cls, experts: nn.Module, group: dist.ProcessGroup | None = None) -> ExpertParallelExperts:
        """Keep this rank's contiguous block of `experts` (stacked [E, ...] weights)."""
        if not isinstance(experts, (GLUExperts, MLPExperts, LoRAExperts)):
            raise ValueError(
                f"expert parallelism needs stacked experts (GLUExperts, MLPExperts, LoRAExperts), got "
                f"{type(experts).__name__}; ModuleExperts cannot be sharded"
            )
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        if experts.num_experts % world_size:
            raise ValueError(
                f"{experts.num_experts} experts do not split evenly over {world_size} ranks; "
                "choose num_experts divisible by the expert-parallel group size"
            )
        num_local = experts.num_experts // world_size
        block = slice(rank * num_local, (rank + 1) * num_local)
        # deepcopy with the stacked weights pre-mapped to their slices: no full copy is made.
        memo = {
            id(p): nn.Parameter(p.detach()[block].clone(), requires_grad=p.requires_grad)
            for p in experts.parameters(recurse=False)
        }
        local = copy.deepcopy(experts, memo)
        local.num_experts = num_local
        return cls(local, experts.num_experts, group)

    def gather(self) -> nn.Module:
        """All experts back in one container (every rank receives them: a collective)."""
        full = copy.deepcopy(self.local)
        for name, local in self.local.named_parameters(recurse=False):
            pieces = [torch.empty_like(local) for _ in range(self.world_size)]
            dist.all_gather(pieces, local.detach().contiguous(), group=self.group)
            setattr(full, name, nn.Parameter(torch.cat(pieces), requires_grad=local.requires_grad))
        full.num_experts = self.num_experts
        return full

    def forward(self, x_sorted: Tensor, plan: DispatchPlan) -> Tensor:
        """x_sorted # [S, I] sorted by (global) expert -> [S, O], dropped rows zero."""
        world, num_local = self.world_size, self.num_local
        # Counts first: recv_counts[s * L + e] = rows rank s sends to my local expert e.
        send_counts = plan.tokens_per_expert  # [E]
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        recv_matrix = recv_counts.view(world, num_local)  # [W, L]
        send_splits = send_counts.view(world, num_local).sum(dim=1).tolist()
        recv_splits = recv_matrix.sum(dim=1).tolist()
        num_sent = sum(send_splits)
        x_recv = _AllToAll.apply(x_sorted[:num_sent], send_splits, recv_splits, self.group)  # [R, I]

        # Received rows are source-major; the local experts want them expert-major.
        local_ids = torch.arange(num_local, device=x_sorted.device).repeat(world)  # [W*L]
        row_local_expert = torch.repeat_interleave(local_ids, recv_counts)  # [R]
        order = torch.sort(row_local_expert, stable=True).indices  # expert-major row -> received row
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        tokens_per_local = recv_matrix.sum(dim=0)  # [L]
        local_plan = DispatchPlan(
            sorted_slots=order,
            slot_rows=inverse,
            row_experts=row_local_expert[order].to(torch.int32),
            tokens_per_expert=tokens_per_local,
            offsets=torch.cumsum(tokens_per_local, dim=0).to(torch.int32),
            row_valid=None,
            top_k=1,
        )
        if getattr(self.local, "gathers_token_rows", False):
            # The local experts put the received rows in expert order inside their first matmul.
            y_local = self.local(x_recv, local_plan, token_rows=True)  # [R, O]
        else:
            y_local = self.local(local_plan.gather(x_recv), local_plan)  # [R, O]
        y_recv = y_local.index_select(0, inverse)  # back to source-major
        y_sent = _AllToAll.apply(y_recv, recv_splits, send_splits, self.group)  # [num_sent, O]
        dropped = x_sorted.shape[0] - num_sent
        return torch.cat([y_sent, y_sent.new_zeros(dropped, y_sent.shape[-1])]) if dropped else y_sent

    def expert_forward(self, expert: int, x: Tensor) -> Tensor:
        raise ValueError(
            "expert-parallel experts run only through the grouped backend; set layer.backend='grouped' "
            "(shard_experts does)"
        )

    def gated_forward(self, x: Tensor, gates: Tensor) -> Tensor:
        return self.expert_forward(0, x)


def _ffn_layers(model: nn.Module) -> list[MoEFeedForward]:
    return [m for m in model.modules() if isinstance(m, MoEFeedForward)]


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> nn.Module:
    """Shard the experts of every `MoEFeedForward` in `model` over `group`, in place; returns model.

    Call on every rank with the same (replicated) model. Each rank then feeds its own tokens.

    Example (under torchrun):
        >>> model = shard_experts(vlmoe.upcycle_ffn(model, num_experts=4))  # doctest: +SKIP
    """
    layers = _ffn_layers(model)
    if not layers:
        raise ValueError("shard_experts: the model has no MoEFeedForward layer (run upcycle_ffn first)")
    for layer in layers:
        if not isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = ExpertParallelExperts.shard(layer.experts, group)
            layer.backend = "grouped"  # the reference and dense paths need every expert here
    return model


def unshard_experts(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Gather every sharded expert container back (a collective: every rank calls it), in place.

    Afterwards each rank holds the full model, which saves and loads on one device as usual.
    """
    for layer in _ffn_layers(model):
        if isinstance(layer.experts, ExpertParallelExperts):
            layer.experts = layer.experts.gather()
            layer.backend = backend
    return model


def expert_parallel_ddp(model: nn.Module) -> nn.Module:
    """Ready a sharded model for `DistributedDataParallel`: DDP skips the expert weights, and
    their gradients (the sum over every rank's tokens) are divided by the group size, so they are
    the same mean over ranks that DDP takes of the replicated weights. Returns model.

    Example (under torchrun):
        >>> ddp = DistributedDataParallel(expert_parallel_ddp(shard_experts(model)))  # doctest: +SKIP
    """
    ignored = []
    for prefix, module in model.named_modules():
        if not isinstance(module, ExpertParallelExperts):
            continue
        for name, parameter in module.local.named_parameters():
            ignored.append(f"{prefix}.local.{name}" if prefix else f"local.{name}")
            if parameter.requires_grad and not getattr(parameter, "_vlmoe_grad_mean", False):
                parameter.register_hook(functools.partial(torch.div, other=module.world_size))
                parameter._vlmoe_grad_mean = True  # once, however often this is called
    model._ddp_params_and_buffers_to_ignore = ignored
    return model
