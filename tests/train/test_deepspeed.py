"""DeepSpeed ZeRO-2/3 on 2 gloo CPU processes trains like one plain-torch process (same global batch).

DeepSpeed is not a vlmoe dependency: the test runs only where it is installed (it was run by hand
with deepspeed 0.19.8 and DS_ACCELERATOR=cpu; see README "Multi-GPU").
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist

from tests.gloo import run_on_ranks
from tests.train.test_distributed import GLOBAL_BATCH, LOSS_RTOL, STEPS, _my_half, setup, train
from vlmoe.moe import aux_loss

deepspeed = pytest.importorskip("deepspeed")
__all__ = ["setup"]  # the fixture, shared with test_distributed


def zero_run(rank, world_size, model, batch, stage):
    model = copy.deepcopy(model)
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 unless told (HF passes the recipe's)
    }
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    half = _my_half(batch, rank, world_size)
    losses = []
    for _ in range(STEPS):
        loss = engine(**half).loss + aux_loss(model)
        engine.backward(loss)
        engine.step()
        loss = loss.detach().clone()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(float(loss))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_losses_equal_one_process(setup, tmp_path, stage, monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", os.environ.get("DS_ACCELERATOR", "cpu"))
    model, batch = setup
    reference = train(copy.deepcopy(model), batch)
    for losses in run_on_ranks(zero_run, 2, tmp_path, model, batch, stage):
        assert losses == pytest.approx(reference, rel=LOSS_RTOL)
