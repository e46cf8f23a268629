"""Expert parallelism on gloo CPU processes equals the single-process layer: outputs and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.gloo import run_on_ranks
from tests.moe.helpers import FcMLP, SwiGLU, randomize_
from vlmoe.moe import MoEFeedForward
from vlmoe.moe.expert_parallel import expert_parallel_ddp, shard_experts, unshard_experts

HIDDEN, TOKENS_PER_RANK = 6, 7


def build_layer(mlp_kind: str, num_experts: int, capacity_factor: float | None) -> MoEFeedForward:
    torch.manual_seed(0)
    mlp = SwiGLU(HIDDEN, 10) if mlp_kind == "glu" else FcMLP(HIDDEN, 10)
    layer = MoEFeedForward.from_dense(
        mlp.double(), num_experts=num_experts, top_k=2, load_balance_coef=0.0, capacity_factor=capacity_factor
    )
    randomize_(layer.experts, seed=1)  # distinct experts, so a misrouted row shows
    with torch.no_grad():
        # Feature 0 of every token is 3 (see batch): expert E-1 scores far below the rest and
        # never gets a token; the others get uneven loads.
        layer.router.gate.weight[:, 0] = torch.linspace(1.0, -4.0, num_experts, dtype=torch.float64)
        layer.router.gate.weight[-1, 0] = -40.0
    return layer


def batch(world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(world_size * TOKENS_PER_RANK, HIDDEN, generator=generator, dtype=torch.float64)
    x[:, 0] = 3.0
    upstream = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    return x, upstream


def reference(mlp_kind, num_experts, capacity_factor, world_size):
    """The full layer on one process; with capacity, per rank's tokens (capacity is per device)."""
    layer = build_layer(mlp_kind, num_experts, capacity_factor)
    x, upstream = batch(world_size)
    x.requires_grad_(True)
    chunks = x.split(TOKENS_PER_RANK) if capacity_factor is not None else [x]
    out = torch.cat([layer(chunk) for chunk in chunks])
    (out * upstream).sum().backward()
    counts = layer.router(x.detach()).tokens_per_expert()
    grads = {name: p.grad for name, p in layer.named_parameters()}
    return out.detach(), x.grad, grads, counts


def sharded(rank, world_size, mlp_kind, num_experts, capacity_factor):
    layer = shard_experts(build_layer(mlp_kind, num_experts, capacity_factor))
    x, upstream = batch(world_size)
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    x_mine = x[mine].clone().requires_grad_(True)
    out = layer(x_mine)
    (out * upstream[mine]).sum().backward()
    router_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(router_grad)  # replicated: the full-batch gradient is the sum over ranks
    expert_grads = {name: p.grad.clone() for name, p in layer.experts.local.named_parameters()}
    unshard_experts(layer)
    gathered = {name: p.detach().clone() for name, p in layer.named_parameters()}
    return out.detach(), x_mine.grad, router_grad, expert_grads, gathered


@pytest.mark.parametrize(
    ("mlp_kind", "world_size", "capacity_factor"),
    [("glu", 2, None), ("fc", 2, None), ("glu", 2, 0.6), ("glu", 4, None)],
)
def test_expert_parallel_equals_one_process(tmp_path, mlp_kind, world_size, capacity_factor):
    num_experts = 4
    ref_out, ref_x_grad, ref_grads, counts = reference(mlp_kind, num_experts, capacity_factor, world_size)
    assert counts[-1] == 0 and len(set(counts[:-1].tolist())) > 1  # an idle expert, uneven loads
    results = run_on_ranks(sharded, world_size, tmp_path, mlp_kind, num_experts, capacity_factor)
    num_local = num_experts // world_size
    full = build_layer(mlp_kind, num_experts, capacity_factor)
    for rank, (out, x_grad, router_grad, expert_grads, gathered) in enumerate(results):
        mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
        torch.testing.assert_close(out, ref_out[mine], rtol=0, atol=1e-12)
        torch.testing.assert_close(x_grad, ref_x_grad[mine], rtol=0, atol=1e-12)
        torch.testing.assert_close(router_grad, ref_grads["router.gate.weight"], rtol=0, atol=1e-12)
        block = slice(rank * num_local, (rank + 1) * num_local)
        for name, grad in expert_grads.items():
            torch.testing.assert_close(grad, ref_grads[f"experts.{name}"][block], rtol=0, atol=1e-12)
        # Gathered back, every rank holds the original layer, under the original names.
        assert gathered.keys() == dict(full.named_parameters()).keys()
        for name, parameter in full.named_parameters():
            assert torch.equal(gathered[name], parameter.detach())


def ddp_step(rank, world_size):
    layer = expert_parallel_ddp(shard_experts(build_layer("glu", 4, None)))
    ddp = torch.nn.parallel.DistributedDataParallel(layer)
    x, upstream = batch(world_size)
    mine = slice(rank * TOKENS_PER_RANK, (rank + 1) * TOKENS_PER_RANK)
    (ddp(x[mine]) * upstream[mine]).sum().backward()
    return layer.router.gate.weight.grad, {n: p.grad for n, p in layer.experts.local.named_parameters()}


def test_expert_parallel_under_ddp_gives_mean_gradients(tmp_path):
    """DDP averages the router's gradient; the expert weights' are divided to the same mean."""
    world_size = 2
    _, _, ref_grads, _ = reference("glu", 4, None, world_size)
    for rank, (router_grad, expert_grads) in enumerate(run_on_ranks(ddp_step, world_size, tmp_path)):
        torch.testing.assert_close(router_grad, ref_grads["router.gate.weight"] / world_size)
        for name, grad in expert_grads.items():
            expected = ref_grads[f"experts.{name}"][rank * 2 : rank * 2 + 2] / world_size
            torch.testing.assert_close(grad, expected)


def refuse_uneven(rank, world_size):
    layer = build_layer("glu", 3, None)
    try:
        shard_experts(layer)
    except ValueError as error:
        return str(error)
    return ""


def test_shard_experts_refuses_an_uneven_split(tmp_path):
    messages = run_on_ranks(refuse_uneven, 2, tmp_path)
    assert all("3 experts do not split evenly over 2 ranks" in m for m in messages)
