"""MoETrainer: the router loss reaches the routers' gradients; one learning rate per part."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import TrainingArguments

import vlmoe
from vlmoe.data import ConversationCollator, ConversationSample
from vlmoe.models import parameter_parts, set_trainable
from vlmoe.train.trainer import MoETrainer


def _batch(processor):
    samples = [
        ConversationSample(
            str(i),
            [Image.new("RGB", (28, 28), color)],
            [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": word}],
            cluster_id=i,
        )
        for i, (color, word) in enumerate([((200, 0, 0), "red"), ((0, 0, 200), "blue")])
    ]
    return ConversationCollator(processor)(samples)


def _trainer(model, tmp_path, aux_loss_scale=1.0, learning_rates=None):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    return MoETrainer(
        model=model,
        args=args,
        learning_rates=learning_rates or {"default": 1e-3},
        aux_loss_scale=aux_loss_scale,
    )


def _router_grads(tmp_path, aux_loss_scale):
    torch.manual_seed(0)
    model, processor = vlmoe.models.tiny("llava")
    model = vlmoe.upcycle_ffn(model, num_experts=4, top_k=2, layers="all", load_balance_coef=0.01)
    set_trainable(model, "router")
    model.train()
    trainer = _trainer(model, tmp_path, aux_loss_scale)
    loss = trainer.compute_loss(model, _batch(processor))
    loss.backward()
    parts = parameter_parts(model)
    return loss, [p.grad.clone() for n, p in model.named_parameters() if parts[n] == "router"]


def test_aux_loss_reaches_the_router_gradients(tmp_path):
    loss_without, grads_without = _router_grads(tmp_path, aux_loss_scale=0.0)
    loss_with, grads_with = _router_grads(tmp_path, aux_loss_scale=1.0)
    # Two layers, each Switch loss 0.01 * E * sum f_i P_i >= 0.01: the total grows by at least 0.02.
    assert float((loss_with - loss_without).detach()) >= 0.02 - 1e-6
    assert all(not torch.allclose(a, b) for a, b in zip(grads_with, grads_without, strict=True))


def test_mocle_cluster_ids_reach_the_router(tmp_path):
    model, processor = vlmoe.models.tiny("llava")
    model = vlmoe.add_mole(model, num_experts=2, rank=2, router="cluster", num_clusters=2, universal=True)
    batch = _batch(processor)
    trainer = _trainer(model, tmp_path)
    assert torch.isfinite(trainer.compute_loss(model, batch))  # a cluster router without ids would raise


def test_one_learning_rate_per_part(tmp_path):
    model, _ = vlmoe.models.tiny("llava")
    model = vlmoe.install_moe_connector(model, init="upcycle", num_experts=4, top_k=2)
    set_trainable(model, "connector", "router", "experts")
    rates = {"default": 1e-4, "router": 1e-2}
    optimizer = _trainer(model, tmp_path, learning_rates=rates).create_optimizer()
    lr_of = {group["part"]: group["lr"] for group in optimizer.param_groups}
    assert lr_of == {"experts": 1e-4, "router": 1e-2} or lr_of == {
        "connector": 1e-4,
        "experts": 1e-4,
        "router": 1e-2,
    }
    counted = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    assert counted == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_adamw_is_fused_only_for_plain_cuda_parameters(tmp_path):
    from vlmoe.train.trainer import fused_adamw_applies

    model, _ = vlmoe.models.tiny("llava")
    optimizer = _trainer(model, tmp_path).create_optimizer()
    assert not optimizer.defaults["fused"]  # CPU parameters: torch's default implementation
    assert not fused_adamw_applies([])
    assert not fused_adamw_applies([torch.nn.Parameter(torch.zeros(2))])
    assert not fused_adamw_applies(
        [torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False)]
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_is_fused_on_cuda(tmp_path):
    from vlmoe.train.trainer import fused_adamw_applies

    model, _ = vlmoe.models.tiny("llava")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    trainer = MoETrainer(model=model.cuda(), args=args, learning_rates={"default": 1e-3})
    assert trainer.create_optimizer().defaults["fused"]
    cuda, cpu = torch.nn.Parameter(torch.zeros(2, device="cuda")), torch.nn.Parameter(torch.zeros(2))
    assert fused_adamw_applies([cuda]) and not fused_adamw_applies([cuda, cpu])


def test_router_losses_are_logged_as_means_read_once_per_log(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model, processor = vlmoe.models.tiny("llava")
    model = vlmoe.upcycle_ffn(model, num_experts=4, top_k=2, layers="all", z_loss_coef=0.001)
    model.train()
    trainer = _trainer(model, tmp_path)
    batches = [_batch(processor), _batch(processor)]
    batches[1]["input_ids"] = batches[1]["input_ids"].flip(-1)  # another routing, other losses
    expected: dict[str, list[float]] = {}

    def no_host_read(*args, **kwargs):
        raise AssertionError("the router losses were read to the host during a training step")

    accumulate = trainer._accumulate_aux_losses

    def accumulate_without_host_reads(*args):  # (HF's own forward may read; vlmoe's part must not)
        with monkeypatch.context() as patch:
            for name in ("__float__", "item", "tolist"):
                patch.setattr(torch.Tensor, name, no_host_read)
            accumulate(*args)

    monkeypatch.setattr(trainer, "_accumulate_aux_losses", accumulate_without_host_reads)
    for batch in batches:
        loss = trainer.compute_loss(model, batch)
        expected.setdefault("aux_loss", []).append(float(vlmoe.aux_loss(model).detach()))
        for layer, losses in vlmoe.moe.aux_losses_by_layer(model).items():
            for name, value in losses.items():
                expected.setdefault(f"aux/{layer}/{name}", []).append(value)
        loss.backward()
    assert len(expected) == 1 + 2 * 2  # the total, and balance + z-loss of both LM layers
    trainer.log({"loss": 1.0})
    logged = trainer.state.log_history[-1]
    for key, values in expected.items():
        assert logged[key] == pytest.approx(sum(values) / len(values), rel=1e-6)
    assert trainer._aux_count == 0 and not trainer._aux_sums  # reset for the next window


def _one_step(tmp_path, batch_size, accumulation, load_balance_coef):
    """One SGD step (learning rate 1, no clipping) on two samples of unequal reply lengths: the
    update is minus the gradient. Returns (logged step, update per trainable parameter)."""
    torch.manual_seed(0)
    model, processor = vlmoe.models.tiny("llava")
    model = vlmoe.upcycle_ffn(
        model, num_experts=4, top_k=2, layers="all", load_balance_coef=load_balance_coef
    )
    set_trainable(model, "experts", "router")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    replies = ["red", "a much longer blue answer with many more words to learn from"]
    samples = [
        ConversationSample(
            str(i),
            [Image.new("RGB", (28, 28), (60 * i, 0, 0))],
            [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": reply}],
        )
        for i, reply in enumerate(replies)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path / f"{batch_size}x{accumulation}-{load_balance_coef}"),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0,
        logging_steps=1,
        save_strategy="no",
        remove_unused_columns=False,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=ConversationCollator(processor),
        learning_rates={"default": 1.0},
    )
    trainer.train()
    update = {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return trainer.state.log_history[0], update


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    # Without the router loss (which is not linear in the batch) the two are the same computation:
    # the LM loss is the mean over every label token of the step, however the step is split.
    large, large_update = _one_step(tmp_path, batch_size=2, accumulation=1, load_balance_coef=0.0)
    split, split_update = _one_step(tmp_path, batch_size=1, accumulation=2, load_balance_coef=0.0)
    assert split["loss"] == pytest.approx(large["loss"], rel=1e-5)
    for name, update in large_update.items():
        torch.testing.assert_close(split_update[name], update, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_the_router_loss_is_added_once_per_step_at_its_scale(tmp_path, accumulation):
    # The forward before the first update is the same with or without the balance loss, so the
    # logged losses differ by exactly the step's router loss: the mean over its micro-batches.
    batch_size = 2 // accumulation
    without, _ = _one_step(tmp_path, batch_size, accumulation, load_balance_coef=0.0)
    with_balance, _ = _one_step(tmp_path, batch_size, accumulation, load_balance_coef=0.01)
    assert with_balance["aux_loss"] >= 0.02 - 1e-6  # two layers, each at least the coefficient
    assert with_balance["loss"] - without["loss"] == pytest.approx(with_balance["aux_loss"], rel=1e-3)
