import math

import pytest
import torch

from tests.gloo import run_on_ranks
from vlmoe.moe import Router, RouterConfig, capacity_keep_mask, load_balancing_loss, router_z_loss
from vlmoe.moe.router import check_cluster_ids


def _router(seed=0, hidden=8, **config):
    torch.manual_seed(seed)
    return Router(hidden, RouterConfig(**config))


def test_topk_weights_renormalised_and_probs_float32_for_bf16():
    router = _router(num_experts=4, top_k=2).to(torch.bfloat16)
    routing = router(torch.randn(16, 8, dtype=torch.bfloat16))
    assert routing.router_probs.dtype == torch.float32
    assert torch.allclose(routing.router_probs.sum(-1), torch.ones(16))
    assert torch.allclose(routing.combine_weights.sum(-1), torch.ones(16))
    chosen = routing.router_probs.gather(1, routing.expert_indices)
    assert torch.all(chosen[:, 0] >= chosen[:, 1])  # best first
    assert torch.equal(routing.expert_indices, routing.router_probs.topk(2).indices)


def test_without_renormalisation_weights_are_the_probabilities():
    router = _router(num_experts=4, top_k=2, normalize_top_k=False)
    routing = router(torch.randn(16, 8))
    assert torch.allclose(routing.combine_weights, routing.router_probs.gather(1, routing.expert_indices))


def test_top1_weight_is_the_probability_so_the_router_learns():
    router = _router(num_experts=4, top_k=1)
    routing = router(torch.randn(16, 8))
    assert torch.allclose(routing.combine_weights[:, 0], routing.router_probs.max(-1).values)
    routing.combine_weights.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_straight_through_forward_is_one_gradient_flows():
    router = _router(num_experts=4, top_k=1, straight_through=True)
    routing = router(torch.randn(16, 8))
    assert torch.equal(routing.combine_weights, torch.ones(16, 1))
    routing.combine_weights.sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="straight_through.*top_k"):
        _router(num_experts=4, top_k=2, straight_through=True)


def test_load_balancing_loss_hand_checked():
    # 4 tokens, 2 experts, top-1. f = (3/4, 1/4); P = (0.6, 0.4); loss = 2 * (0.45 + 0.1) = 1.1
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    indices = torch.tensor([[0], [0], [0], [1]])
    assert math.isclose(float(load_balancing_loss(probs, indices)), 1.1, rel_tol=1e-6)
    # Padding excluded: drop the last token -> f = (1, 0), P = (0.7333, 0.2667) -> 2 * 0.7333
    mask = torch.tensor([True, True, True, False])
    assert math.isclose(float(load_balancing_loss(probs, indices, mask)), 2 * 2.2 / 3, rel_tol=1e-6)
    # Uniform routing gives exactly 1.
    uniform = torch.full((4, 4), 0.25)
    assert math.isclose(float(load_balancing_loss(uniform, torch.tensor([[0], [1], [2], [3]]))), 1.0)


def test_router_losses_scaled_by_coefficients_and_ignore_padding():
    router = _router(num_experts=4, top_k=2, load_balance_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(10, 8)
    mask = torch.tensor([True] * 7 + [False] * 3)
    routing = router(x, token_mask=mask)
    expected_balance = 0.01 * load_balancing_loss(routing.router_probs[:7], routing.expert_indices[:7])
    expected_z = 0.001 * torch.logsumexp(routing.router_logits[:7], -1).square().mean()
    assert torch.allclose(routing.aux_losses["load_balance"], expected_balance)
    assert torch.allclose(routing.aux_losses["z_loss"], expected_z)
    # Padding values do not matter.
    x2 = x.clone()
    x2[7:] = 100.0
    routing2 = router(x2, token_mask=mask)
    for name in ("load_balance", "z_loss"):
        assert torch.allclose(routing.aux_losses[name], routing2.aux_losses[name])
    assert router_z_loss(routing.router_logits, torch.zeros(10, dtype=torch.bool)) == 0


def test_balance_loss_from_first_choices_only_is_deepspeeds_top2_loss():
    # DeepSpeed top-2: l_aux = E * E * mean_e(mean gate_e * fraction of tokens whose FIRST choice is e).
    router = _router(num_experts=4, top_k=2, load_balance_coef=1.0, load_balance_first_choice=True)
    routing = router(torch.randn(12, 8))
    first = torch.nn.functional.one_hot(routing.router_probs.argmax(-1), 4).float()
    expected = 4 * 4 * torch.mean(routing.router_probs.mean(0) * first.mean(0))
    assert torch.allclose(routing.aux_losses["load_balance"], expected)


def test_capacity_drops_exactly_the_overflow_in_priority_order():
    # 5 tokens, top-2 over 3 experts, capacity 2 per expert.
    indices = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0], [2, 0]])
    keep = capacity_keep_mask(indices, num_experts=3, capacity=2)
    # First choices in token order: e0 <- t0, t1 (t2 dropped); e1 <- t3; e2 <- t4.
    # Second choices: e1 <- t0 (e1 now full); e2 <- t1 (full); e1 <- t2 dropped; e0 <- t3, t4 dropped.
    expected = torch.tensor([[True, True], [True, True], [False, False], [True, False], [True, False]])
    assert torch.equal(keep, expected)
    counts = torch.bincount(indices[keep], minlength=3)
    assert counts.max() <= 2


def test_padding_takes_no_capacity():
    indices = torch.tensor([[0], [0], [0], [0]])
    mask = torch.tensor([False, False, True, True])
    keep = capacity_keep_mask(indices, num_experts=2, capacity=2, token_mask=mask)
    assert torch.equal(keep[:, 0], torch.tensor([False, False, True, True]))


def test_capacity_router_zeroes_dropped_weights_and_renormalises_the_rest():
    router = _router(num_experts=2, top_k=2, capacity_factor=0.5)  # capacity = ceil(0.5*8*2/2) = 4
    routing = router(torch.randn(8, 8))
    assert routing.kept is not None
    assert torch.all(routing.combine_weights[~routing.kept] == 0)
    assert routing.tokens_per_expert().max() <= 4
    both = routing.kept.all(-1)
    assert torch.allclose(routing.combine_weights[both].sum(-1), torch.ones(int(both.sum())))


def test_cluster_router_routes_by_cluster_only():
    router = _router(num_experts=4, top_k=1, input="cluster", num_clusters=5, temperature=0.1)
    x = torch.randn(6, 8)
    ids = torch.tensor([3, 3, 0, 4, 3, 0])
    routing = router(x, cluster_ids=ids)
    # Same cluster -> same logits, whatever the hidden state.
    assert torch.equal(routing.router_logits[0], routing.router_logits[1])
    assert torch.equal(routing.router_logits[2], routing.router_logits[5])
    expected = router.gate(router.cluster_embedding(ids))
    assert torch.allclose(routing.router_logits, expected)
    assert torch.allclose(routing.router_probs, torch.softmax(expected / 0.1, -1))
    with pytest.raises(ValueError, match="cluster_ids must be in"):
        router(x, cluster_ids=torch.tensor([0, 1, 2, 3, 4, 5]))
    with pytest.raises(ValueError, match="no cluster_ids"):
        router(x)
    with pytest.raises(ValueError, match="one id per token"):
        router(x, cluster_ids=torch.tensor([0, 1]))


def test_jitter_only_in_training():
    router = _router(num_experts=4, top_k=2, jitter_noise=0.5)
    x = torch.randn(32, 8)
    router.eval()
    assert torch.equal(router(x).router_logits, router(x).router_logits)
    router.train()
    assert not torch.equal(router(x).router_logits, router(x).router_logits)


def test_forced_expert():
    router = _router(num_experts=4, top_k=2)
    router.forced_expert = 3
    routing = router(torch.randn(5, 8))
    assert torch.all(routing.expert_indices == 3)
    assert torch.allclose(routing.combine_weights.sum(-1), torch.ones(5))
    router.forced_expert = 4
    with pytest.raises(ValueError, match="forced_expert"):
        router(torch.randn(5, 8))


def test_router_losses_only_where_an_optimiser_can_use_them():
    router = _router(num_experts=4, top_k=2, load_balance_coef=0.01, z_loss_coef=0.001)
    x = torch.randn(6, 8)
    assert set(router(x).aux_losses) == {"load_balance", "z_loss"}
    with torch.no_grad():
        assert router(x).aux_losses == {}


def _balance_on_rank(rank, world_size, scope, tokens):
    torch.manual_seed(0)
    router = Router(6, RouterConfig(num_experts=4, top_k=2, load_balance_coef=1.0, load_balance_scope=scope))
    router.double()
    x, mask = _balance_batch(world_size * tokens)
    mine = slice(rank * tokens, (rank + 1) * tokens)
    loss = router(x[mine], token_mask=mask[mine]).aux_losses["load_balance"]
    loss.backward()
    return float(loss.detach()), router.gate.weight.grad


def _balance_batch(num_tokens):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(num_tokens, 6, generator=generator, dtype=torch.float64)
    mask = torch.rand(num_tokens, generator=generator) > 0.3  # ranks end up with unequal real tokens
    return x, mask


def test_global_balance_loss_on_two_ranks_is_the_loss_of_the_whole_batch(tmp_path):
    world_size, tokens = 2, 9
    torch.manual_seed(0)
    router = Router(6, RouterConfig(num_experts=4, top_k=2, load_balance_coef=1.0)).double()
    x, mask = _balance_batch(world_size * tokens)
    whole = router(x, token_mask=mask).aux_losses["load_balance"]
    whole.backward()
    whole_grad = router.gate.weight.grad.clone()
    local = []
    for rank in range(world_size):
        router.zero_grad()
        mine = slice(rank * tokens, (rank + 1) * tokens)
        loss = router(x[mine], token_mask=mask[mine]).aux_losses["load_balance"]
        loss.backward()
        local.append((float(loss.detach()), router.gate.weight.grad.clone()))
    assert mask[:tokens].sum() != mask[tokens:].sum()

    global_scope = run_on_ranks(_balance_on_rank, world_size, tmp_path, "global", tokens)
    for value, _ in global_scope:  # every rank sees the whole batch's loss
        assert value == pytest.approx(float(whole.detach()), rel=1e-12)
    mean_grad = sum(grad for _, grad in global_scope) / world_size  # what DDP applies
    torch.testing.assert_close(mean_grad, whole_grad, rtol=0, atol=1e-14)
    # The default ("device", Switch / DeepSpeed-MoE) is each rank's own batch, all-reduce or not.
    device_scope = run_on_ranks(_balance_on_rank, world_size, tmp_path, "device", tokens)
    for (value, grad), (local_value, local_grad) in zip(device_scope, local, strict=True):
        assert value == pytest.approx(local_value, rel=1e-12)
        torch.testing.assert_close(grad, local_grad, rtol=0, atol=1e-14)
    # The two scopes differ here.
    assert abs(float(whole.detach()) - sum(v for v, _ in local) / world_size) > 1e-4


def test_forced_expert_takes_every_token_whatever_the_capacity():
    # MoE-LLaVA trains with capacity 1.5: forcing expert 1 must still give every token expert 1's
    # output alone, not drop the slots over one expert's capacity (and halve the rest).
    router = _router(num_experts=4, top_k=2, capacity_factor=1.5)
    router.forced_expert = 1
    routing = router(torch.randn(10, 8))
    assert routing.kept is None
    assert torch.all(routing.expert_indices == 1)
    assert torch.equal(routing.combine_weights, torch.full((10, 2), 0.5))
    assert routing.tokens_per_expert().tolist() == [0, 20, 0, 0]


@pytest.mark.parametrize("capacity_factor", [None, 4.0])
def test_tokens_per_expert_counts_real_tokens_only(capacity_factor):
    router = _router(num_experts=4, top_k=2, capacity_factor=capacity_factor)
    x = torch.randn(9, 8)
    mask = torch.tensor([True, True, False, True, False, False, True, True, False])
    routing = router(x, token_mask=mask)
    expected = torch.zeros(4, dtype=torch.long)
    for t in range(9):
        for j in range(2):
            if mask[t] and (routing.kept is None or routing.kept[t, j]):
                expected[routing.expert_indices[t, j]] += 1
    assert int(expected.sum()) == 10  # the 5 real tokens' slots, none dropped at this capacity
    assert torch.equal(routing.tokens_per_expert(), expected)
    # The fused router's counts (every slot) are not taken when there is padding.
    routing.expert_counts = torch.bincount(routing.expert_indices.flatten(), minlength=4)
    assert torch.equal(routing.tokens_per_expert(), expected)


def test_cluster_ids_of_the_wrong_type_are_refused_by_name():
    router = _router(num_experts=4, top_k=1, input="cluster", num_clusters=3)
    x = torch.randn(3, 8)
    # A bool tensor indexed the clusters as a mask: two routed rows for three tokens.
    with pytest.raises(ValueError, match=r"cluster_ids is a torch.bool tensor; .*integer tensor"):
        router(x, cluster_ids=torch.tensor([True, False, True]))
    with pytest.raises(ValueError, match=r"cluster_ids is a torch.float32 tensor; .*cluster_ids.long\(\)"):
        router(x, cluster_ids=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="cluster_ids is a list; pass a tensor"):
        router(x, cluster_ids=[0, 1, 2])
    with pytest.raises(ValueError, match="cluster_ids is a torch.float32 tensor"):
        check_cluster_ids(torch.tensor([0.5, 1.0]), 3)  # what routing_inputs checks
    assert router(x, cluster_ids=torch.tensor([0, 2, 2], dtype=torch.int32)).expert_indices.shape == (3, 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_ties_go_to_the_lower_expert_index(top_k, dtype):
    # Experts 1, 2 and 4 score the same for every token (expert 3 less, 0 least), as bf16 logits
    # often do: the ties break towards the lower index, as argmax and the fused kernels do.
    router = _router(num_experts=5, top_k=top_k, hidden=4)
    scale = torch.rand(6, 1, generator=torch.Generator().manual_seed(0)) * 3 + 0.1
    logits = (torch.tensor([0.0, 1.0, 1.0, 0.5, 1.0]) * scale).to(dtype).requires_grad_(True)
    routing = router(torch.zeros(6, 4), logits=logits)
    expected = torch.tensor([1, 2, 4][:top_k]).expand(6, top_k)
    assert torch.equal(routing.expert_indices, expected)
    if top_k == 1:
        assert torch.equal(routing.expert_indices[:, 0], routing.router_probs.argmax(-1))
    chosen = routing.router_probs.gather(1, expected)
    wanted = chosen / chosen.sum(-1, keepdim=True) if top_k > 1 else chosen
    assert torch.allclose(routing.combine_weights, wanted)
    routing.combine_weights[:, 0].sum().backward()  # the gradient still reaches the logits
    assert logits.grad.abs().sum() > 0
