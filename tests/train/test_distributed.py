"""DDP and FSDP2 on 2 gloo CPU processes train a tiny upcycled model exactly as one process does,
and a checkpoint written under sharding loads on one process (and back under sharding)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from PIL import Image

import vlmoe
from tests.gloo import run_on_ranks, start_method
from vlmoe.moe import aux_loss, set_load_balance_scope
from vlmoe.train.distributed import full_state_dict, is_sharded, load_full_state_dict

STEPS, GLOBAL_BATCH = 3, 4
LOSS_RTOL, WEIGHT_RTOL, WEIGHT_ATOL = 1e-6, 1e-5, 1e-7


@pytest.fixture(scope="module")
def setup():
    """One float64 upcycled tiny LLaVA and a batch of 4 equal-length samples (no padding, so every
    rank's mean LM loss weighs its tokens as the one-process mean does)."""
    model, processor = vlmoe.models.tiny("llava")
    vlmoe.upcycle_ffn(model, num_experts=4, top_k=2, load_balance_coef=0.01)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # distinct experts and a non-trivial router, so routing matters
        for name, parameter in model.named_parameters():
            if ".mlp." in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    prompt = "USER: <image>\nWhat is the highest value? ASSISTANT: seven"
    colours = [(200, 30, 30), (20, 90, 200), (30, 160, 60), (240, 200, 10)]
    batch = dict(
        processor(
            text=[prompt] * GLOBAL_BATCH,
            images=[Image.new("RGB", (32, 32), c) for c in colours],
            return_tensors="pt",
        )
    )
    batch["pixel_values"] = batch["pixel_values"].double()
    # The tower's last layer feeds nothing (LLaVA reads layer -2): frozen, as MoE-LLaVA's stage 3.
    model.model.vision_tower.requires_grad_(False)
    labels = batch["input_ids"].clone()
    labels[labels == model.config.image_token_id] = -100
    batch["labels"] = labels
    return set_load_balance_scope(model.double().train(), "global"), batch


def train(model, batch, wrapped=None):
    """STEPS of SGD on `batch`; the losses (LM + router aux) of each step.

    The weights are float64, but transformers' LM loss upcasts the logits to float32 only: the
    tolerances below are float32's.
    """
    wrapped = wrapped or model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = wrapped(**batch).loss + aux_loss(model)
        loss.backward()
        optimizer.step()
        loss = loss.detach()
        if dist.is_initialized():  # each rank's LM loss is its half's mean: report the global mean
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(float(loss))
    return losses


def _my_half(batch, rank, world_size):
    per_rank = GLOBAL_BATCH // world_size
    return {k: v[rank * per_rank : (rank + 1) * per_rank] for k, v in batch.items()}


def ddp_run(rank, world_size, model, batch):
    model = copy.deepcopy(model)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    losses = train(model, _my_half(batch, rank, world_size), wrapped=ddp)
    return losses, full_state_dict(model)


def fsdp_run(rank, world_size, model, batch, save_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    pristine = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert is_sharded(model)
    losses = train(model, _my_half(batch, rank, world_size))
    state = full_state_dict(model)  # a collective
    if rank == 0:  # what run_stage does with the gathered weights
        vlmoe.save(model, save_dir, state_dict=state)
    dist.barrier()
    # And back: the one-device file loads into a freshly sharded model.
    again = pristine
    fully_shard(again, mesh=mesh)
    load_full_state_dict(again, vlmoe.load(save_dir).state_dict())
    reloaded = full_state_dict(again)
    return losses, state, reloaded


@pytest.mark.slow  # 3-6 s: two 2-process runs of a tiny LLaVA
def test_ddp_and_fsdp2_losses_equal_one_process_and_the_sharded_checkpoint_loads(setup, tmp_path):
    if start_method() == "spawn":  # this process used CUDA: the ranks cannot be forked
        pytest.skip(
            "an HF VLM unpickled in a spawned process lacks transformers' output-capture hooks (its "
            "vision tower returns no hidden_states); runs where the ranks can be forked (no CUDA used)"
        )
    model, batch = setup
    reference_model = copy.deepcopy(model)
    reference = train(reference_model, batch)
    assert reference[0] != pytest.approx(reference[-1], rel=1e-3)  # it trains

    for losses, state in run_on_ranks(ddp_run, 2, tmp_path, model, batch):
        assert losses == pytest.approx(reference, rel=LOSS_RTOL)
        for name, tensor in reference_model.state_dict().items():
            torch.testing.assert_close(state[name], tensor, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)

    save_dir = tmp_path / "fsdp-final"
    for losses, state, reloaded in run_on_ranks(fsdp_run, 2, tmp_path, model, batch, save_dir):
        assert losses == pytest.approx(reference, rel=LOSS_RTOL)
        for name, tensor in reference_model.state_dict().items():
            torch.testing.assert_close(state[name], tensor, rtol=WEIGHT_RTOL, atol=WEIGHT_ATOL)
        assert all(torch.equal(reloaded[name], state[name]) for name in state)
    loaded = vlmoe.load(save_dir)  # one process, no process group
    assert all(torch.equal(t, state[name]) for name, t in loaded.state_dict().items())
