"""`MoETrainer`: HF `Trainer` that adds the router losses, feeds routing inputs, and checkpoints
atomically.

- Loss = LM loss + `aux_loss_scale * vlmoe.aux_loss(model)`; the aux loss and each layer's losses
  are logged (TensorBoard by default) as running means since the last log, summed on the device
  and read to the host once per log (not once per step and layer).
- The batch's attention mask (padding takes no part in routing) and MoCLE cluster ids reach the
  sparse layers through `vlmoe.moe.routing_inputs`; the collator's tags never reach the model.
- One learning rate per part (router, experts, lora, connector, lm, vision_tower).
- A checkpoint counts only once `COMPLETE` is written in it, after everything else; older
  checkpoints are removed only after that, so a kill at any moment leaves a usable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import Trainer

from vlmoe.atomic import write_atomically
from vlmoe.data.collator import split_model_inputs
from vlmoe.models.checkpoint import without_tied
from vlmoe.models.parts import parameter_parts
from vlmoe.moe import aux_loss, routing_inputs, sparse_layers
from vlmoe.train.distributed import is_sharded, load_full_state_dict

COMPLETE = "COMPLETE"
WEIGHTS = "vlmoe_weights.safetensors"


def fused_adamw_applies(parameters: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW runs fused (one kernel per step for all tensors): every parameter a plain
    floating-point CUDA tensor. On an H200 that made the upcycled model's training step 4.5%
    shorter than torch's default foreach AdamW (benchmarks/train_step.py). Sharded (DTensor)
    parameters and CPU runs keep the default implementation."""
    from torch.distributed.tensor import DTensor

    return bool(parameters) and all(
        p.is_cuda and p.is_floating_point() and not isinstance(p, DTensor) for p in parameters
    )


class MoETrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        learning_rates: dict[str, float],
        aux_loss_scale: float = 1.0,
        keep_checkpoints: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.learning_rates = learning_rates
        self.aux_loss_scale = aux_loss_scale
        self.keep_checkpoints = keep_checkpoints
        self._aux_sums: dict[str, torch.Tensor] = {}
        self._aux_count = 0
        self._routing_active = False

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        # Gradient checkpointing recomputes forwards inside backward: the routing inputs must still
        # be set then, so they span the whole step, not only compute_loss.
        with self._routing_inputs(model, inputs):
            return super().training_step(model, inputs, *args, **kwargs)

    @contextmanager
    def _routing_inputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> Iterator[None]:
        if self._routing_active:
            yield
            return
        cluster_ids = batch.get("cluster_ids")
        if cluster_ids is not None and bool((cluster_ids < 0).any()):
            cluster_ids = None  # samples without a cluster: only a cluster router needs them
        self._routing_active = True
        try:
            with routing_inputs(model, attention_mask=batch.get("attention_mask"), cluster_ids=cluster_ids):
                yield
        finally:
            self._routing_active = False

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        # HF's compute_loss gives the LM loss over the label tokens of the whole accumulated step
        # (num_items_in_batch) when the model takes it, so that accumulation equals the large batch;
        # training_step then no longer divides by the accumulation steps, and the router loss (a
        # mean over this micro-batch) is divided here instead.
        with self._routing_inputs(model, inputs):
            model_inputs, _ = split_model_inputs(inputs)
            lm_loss, outputs = super().compute_loss(
                model, model_inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        router_loss = aux_loss(model)
        spans_step = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        router_scale = 1 / self.current_gradient_accumulation_steps if spans_step else 1
        loss = lm_loss + self.aux_loss_scale * router_scale * router_loss
        if model.training:
            self._accumulate_aux_losses(model, router_loss)
        return (loss, outputs) if return_outputs else loss

    def _accumulate_aux_losses(self, model: torch.nn.Module, router_loss: torch.Tensor) -> None:
        """Running sums of the router losses, kept on the device: reading each to the host every
        step (`float(loss)`) would make the host wait for the GPU's forward once per step and
        layer; they are read once per log instead."""
        entries = [("aux_loss", router_loss)] + [
            (f"aux/{layer_name}/{name}", value)
            for layer_name, layer in sparse_layers(model)
            for name, value in layer.last_aux_losses.items()
        ]
        for key, value in entries:
            value = value.detach().float()
            self._aux_sums[key] = value if key not in self._aux_sums else self._aux_sums[key] + value
        self._aux_count += 1

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._aux_count and "loss" in logs:  # training logs carry the aux losses since the last one
            keys = list(self._aux_sums)
            device = self._aux_sums[keys[0]].device  # a model split over devices: gather first
            sums = torch.stack([self._aux_sums[k].to(device) for k in keys])
            means = (sums / self._aux_count).tolist()  # the one host read per log
            logs.update(zip(keys, means, strict=True))
            self._aux_sums.clear()
            self._aux_count = 0
        super().log(logs, *args, **kwargs)

    def create_optimizer(self, model: torch.nn.Module | None = None) -> torch.optim.Optimizer:
        """AdamW (or SGD) with one parameter group per part, each at its own learning rate."""
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        parts = parameter_parts(model)
        groups: dict[str, list[torch.nn.Parameter]] = defaultdict(list)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                groups[parts.get(name, "lm")].append(parameter)
        default = self.learning_rates.get("default", self.args.learning_rate)
        param_groups = [
            {"params": params, "lr": self.learning_rates.get(part, default), "part": part}
            for part, params in sorted(groups.items())
        ]
        if not param_groups:
            raise ValueError("no trainable parameters: the stage's `trainable` parts are all empty")
        args = self.args
        if args.optim == "sgd":
            self.optimizer = torch.optim.SGD(param_groups, lr=default, weight_decay=args.weight_decay)
        else:
            betas = (args.adam_beta1, args.adam_beta2)
            fused = fused_adamw_applies([p for group in param_groups for p in group["params"]])
            self.optimizer = torch.optim.AdamW(
                param_groups, lr=default, betas=betas, weight_decay=args.weight_decay, fused=fused or None
            )
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The module's own state dict: HF's save_pretrained renames keys to the stock layout,
        which a surgered model is not, and its checkpoint would not load back on resume. Under
        FSDP (full state dict) and DeepSpeed ZeRO-3 the Trainer passes the gathered weights."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return None
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if state_dict is None:
            safetensors.torch.save_model(model, os.path.join(output_dir, WEIGHTS))
        else:
            state = {name: tensor.contiguous() for name, tensor in without_tied(model, state_dict).items()}
            safetensors.torch.save_file(state, os.path.join(output_dir, WEIGHTS), metadata={"format": "pt"})
        return None

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        path = Path(resume_from_checkpoint) / WEIGHTS
        if not path.is_file():  # a checkpoint written by FSDP (sharded state dict) or DeepSpeed
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        if is_sharded(target):  # FSDP2: every rank reads the whole file and keeps its shard
            load_full_state_dict(target, safetensors.torch.load_file(str(path)))
        else:
            safetensors.torch.load_model(target, str(path), device=str(next(target.parameters()).device))
        return None

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        text = json.dumps({"step": self.state.global_step})
        write_atomically(folder / COMPLETE, lambda temp: temp.write_text(text))
        for old in complete_checkpoints(self.args.output_dir)[: -self.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints with their `COMPLETE` marker, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("checkpoint-*") if (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def last_complete_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; unfinished ones (a kill mid-save) are removed."""
    run_dir = Path(run_dir)
    if run_dir.is_dir() and os.environ.get("RANK", "0") == "0":  # under DDP/FSDP, one rank cleans
        for folder in run_dir.glob("checkpoint-*"):
            if not (folder / COMPLETE).is_file():
                shutil.rmtree(folder, ignore_errors=True)
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None
