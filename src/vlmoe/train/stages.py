"""Run a recipe stage by stage: start model, surgery, trainable parts, HF training, stage output.

Layout under `recipe.output_dir`:
    recipe.json                      the validated recipe this run was started with
    data/                            generated synthetic data (shared by the stages)
    <stage>/checkpoints/checkpoint-N HF Trainer checkpoints (model, optimiser, scheduler, RNG,
                                     data position), each valid once its COMPLETE marker exists
    <stage>/final/                   the stage's model (vlmoe.save, with the processor)
    <stage>/stage_done.json          written last: the stage is finished and is never re-run
    <stage>/checkpoints/runs/        TensorBoard events (HF's default place)
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn
from transformers import PrinterCallback, set_seed

import vlmoe
from vlmoe.atomic import write_atomically
from vlmoe.console import sharing
from vlmoe.data import ConversationCollator
from vlmoe.device import resolve_device
from vlmoe.json_diff import json_differences
from vlmoe.models import set_trainable
from vlmoe.models.checkpoint import load_local
from vlmoe.moe import set_load_balance_scope
from vlmoe.train.data import stage_samples
from vlmoe.train.distributed import is_main_process, seed_per_rank
from vlmoe.train.preflight import check_base_path, check_local_files, recipe_label
from vlmoe.train.progress import RichProgressCallback, StopAfter
from vlmoe.train.recipe import Recipe, StageConfig, SurgeryConfig
from vlmoe.train.trainer import MoETrainer, last_complete_checkpoint

STAGE_DONE = "stage_done.json"
RESUME_KEYS = ("base", "seed", "stages")  # what a resumed run must share with the started one
# Stage fields a resumed run may change: how it logs, saves and loads, and activation checkpointing
# (the same gradients, recomputed; the way out of an out-of-memory), none of which the weights depend on.
RESUME_FREE_STAGE_KEYS = (
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "report_to",
    "dataloader_workers",
    "gradient_checkpointing",
)


@dataclasses.dataclass
class StageResult:
    name: str
    model_dir: Path
    log_history: list[dict[str, Any]]
    skipped: bool  # finished in an earlier run


def run_recipe(
    recipe: Recipe,
    resume: bool = False,
    device: str | None = None,
    console: Console | None = None,
    stop_after_steps: int | None = None,
) -> list[StageResult]:
    """Train every stage in order; with `resume`, finished stages are skipped and an interrupted
    one continues from its last complete checkpoint.

    `stop_after_steps` ends the run after that many optimiser steps of the first unfinished stage
    (as a kill would, after its checkpoint), for tests of resuming.

    Example:
        >>> from vlmoe.train import load_recipe
        >>> recipe = load_recipe("chartmoe", scale="tiny", output_dir="runs/chartmoe-tiny")
        >>> results = run_recipe(recipe, device="cpu")  # doctest: +SKIP
        >>> results[-1].model_dir  # doctest: +SKIP
        PosixPath('runs/chartmoe-tiny/chart_qa_pot/final')
    """
    console = console or Console(quiet=not is_main_process())  # one progress display, not one per rank
    # Everything that can fail cheaply fails before the run directory is touched, so a corrected
    # rerun into the same directory is a new run, not one to --resume.
    torch_device = training_device(device)
    check_local_files(recipe)
    processor = base_processor(recipe)
    out = Path(recipe.output_dir)
    if is_main_process():  # under torchrun / accelerate launch, one process owns the run directory
        _check_run_directory(recipe, out, resume)
    results: list[StageResult] = []
    # The stage bars' console is the one the kernels' first-use bars draw on too (vlmoe.console).
    with sharing(console):
        for number, stage in enumerate(recipe.stages, start=1):
            stage_dir = out / stage.name
            if (stage_dir / STAGE_DONE).is_file():
                console.print(f"[dim]stage {number}/{len(recipe.stages)} {stage.name}: done earlier, skipped")
                history = json.loads((stage_dir / STAGE_DONE).read_text())["log_history"]
                results.append(StageResult(stage.name, stage_dir / "final", history, skipped=True))
                continue
            console.rule(f"stage {number}/{len(recipe.stages)}: {stage.name}")
            history = run_stage(recipe, stage, results, processor, torch_device, console, stop_after_steps)
            if history is None:  # stopped early on purpose
                return results
            results.append(StageResult(stage.name, stage_dir / "final", history, skipped=False))
    return results


def run_stage(
    recipe: Recipe,
    stage: StageConfig,
    earlier: list[StageResult],
    processor: Any,
    device: torch.device,
    console: Console,
    stop_after_steps: int | None = None,
) -> list[dict[str, Any]] | None:
    stage_dir = Path(recipe.output_dir) / stage.name
    # Surgery draws router and expert inits: seeded, so a rerun (or a resumed run) starts the same.
    set_seed(recipe.seed + len(earlier))
    model = start_model(recipe, stage, earlier)
    for surgery in stage.surgery:
        apply_surgery(model, surgery, recipe, earlier, stage)
    set_trainable(model, *stage.trainable)
    if stage.load_balance_scope != "device":
        set_load_balance_scope(model, stage.load_balance_scope)
    model.train()
    # Before the data: TrainingArguments sets up the process group when launched distributed.
    args = training_arguments(recipe, stage, stage_dir, device)
    with args.main_process_first(local=False, desc="stage data"):  # rank 0 generates, the others read
        samples = stage_samples(stage.data, recipe.output_dir)
    report = vlmoe.models.parameter_report(model)
    console.print(
        f"{len(samples)} samples · trainable {report.trainable:,} of {report.total:,} parameters "
        f"({', '.join(stage.trainable)})"
    )
    progress = RichProgressCallback(console, stage.name)
    callbacks: list[Any] = [progress]
    if stop_after_steps is not None:
        callbacks.append(StopAfter(stop_after_steps))
    trainer = MoETrainer(
        model=model,
        args=args,
        train_dataset=samples,
        data_collator=ConversationCollator(processor, max_length=stage.data.max_length),
        learning_rates=stage.learning_rate,
        aux_loss_scale=stage.aux_loss_scale,
        keep_checkpoints=stage.save_total_limit,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the rich bar shows the logs instead of printed dicts
    # The model is built (the same on every rank); from here on dropout and router jitter differ.
    seed_per_rank(recipe.seed)
    checkpoint = last_complete_checkpoint(stage_dir / "checkpoints")
    if checkpoint is not None:
        console.print(f"resuming {stage.name} from {checkpoint}")
    start = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    finally:
        progress.stop()
    if stop_after_steps is not None:
        return None
    # Sharded weights (FSDP, DeepSpeed ZeRO) are gathered whole first: a collective on every rank.
    sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
    state = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
    history = trainer.state.log_history
    if trainer.is_world_process_zero():
        _write_stage_output(
            recipe, stage, trainer.model, processor, state, history, time.perf_counter() - start
        )
    trainer.accelerator.wait_for_everyone()  # the next stage loads this one's output from disk
    return history


def _write_stage_output(
    recipe: Recipe,
    stage: StageConfig,
    model: nn.Module,
    processor: Any,
    state: dict[str, torch.Tensor] | None,
    history: list[dict[str, Any]],
    seconds: float,
) -> None:
    stage_dir = Path(recipe.output_dir) / stage.name
    final = stage_dir / "final"
    tmp = stage_dir / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    vlmoe.save(model, tmp, processor=processor, state_dict=state)
    if stage.data.cluster is not None:  # MoCLE: new instructions need the centroids at inference
        shutil.copytree(Path(recipe.output_dir) / "clusters", tmp / "clusters")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    _write_json(stage_dir / STAGE_DONE, {"stage": stage.name, "seconds": seconds, "log_history": history})


def _checkpointing_field() -> str:
    """transformers renamed `gradient_checkpointing` to `activation_checkpointing` (5.2x); both work."""
    from transformers import TrainingArguments

    fields = TrainingArguments.__dataclass_fields__
    return "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"


def training_device(device: str | None) -> torch.device:
    """The device `--device` names, checked before any work (None: the GPU when there is one).

    HF Trainer places the model itself, one GPU per process (torchrun's LOCAL_RANK), so an index
    like cuda:1 could not be honoured and is refused rather than ignored.

    Example:
        >>> training_device("cpu")
        device(type='cpu')
    """
    resolved = resolve_device(device)
    if resolved.index is not None:
        raise ValueError(
            f"--device {device!r}: training runs one process per GPU and cannot pick one by index; "
            f"use CUDA_VISIBLE_DEVICES={resolved.index} with --device cuda"
        )
    return resolved


def training_arguments(recipe: Recipe, stage: StageConfig, stage_dir: Path, device: torch.device) -> Any:
    from transformers import TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-checkpoint "Writing model shards" bars

    use_cpu = device.type == "cpu"  # training_device: cpu or cuda, never silently another one
    optimizer = stage.optimizer
    checkpointing_field = _checkpointing_field()
    return TrainingArguments(
        output_dir=str(stage_dir / "checkpoints"),
        per_device_train_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.gradient_accumulation,
        learning_rate=stage.learning_rate.get("default", 1e-4),
        weight_decay=optimizer.weight_decay,
        adam_beta1=optimizer.betas[0],
        adam_beta2=optimizer.betas[1],
        optim="sgd" if optimizer.name == "sgd" else "adamw_torch",
        max_grad_norm=optimizer.max_grad_norm,
        lr_scheduler_type=stage.schedule.name,
        warmup_steps=stage.schedule.warmup_ratio,  # a float < 1 is a ratio of the total steps
        max_steps=stage.max_steps,
        num_train_epochs=stage.epochs,
        bf16=stage.precision == "bf16",
        fp16=stage.precision == "fp16",
        **{checkpointing_field: stage.gradient_checkpointing},
        logging_steps=stage.logging_steps,
        save_strategy="steps",
        save_steps=stage.save_steps,
        save_total_limit=None,  # MoETrainer removes old checkpoints only after a new one is complete
        report_to=stage.report_to,
        fsdp=stage.fsdp,
        deepspeed=stage.deepspeed,
        dataloader_num_workers=stage.dataloader_workers,
        remove_unused_columns=False,  # the collator's tags (cluster ids, domains) reach compute_loss
        seed=recipe.seed,
        data_seed=recipe.seed,
        use_cpu=use_cpu,
        disable_tqdm=True,
    )


def base_processor(recipe: Recipe) -> Any:
    """The base model's processor, from the local base.path only (never the Hub)."""
    if recipe.base.family is not None:
        return vlmoe.models.tiny(recipe.base.family, seed=recipe.base.seed)[1]
    from transformers import AutoProcessor

    check_base_path(recipe)
    try:
        return AutoProcessor.from_pretrained(recipe.base.path, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"{recipe_label(recipe)}: base.path {recipe.base.path!r} holds no usable processor ({reason}); "
            f"save the model's processor there (processor.save_pretrained) or edit base.path"
        ) from None


def base_model(recipe: Recipe) -> nn.Module:
    if recipe.base.family is not None:
        return vlmoe.models.tiny(recipe.base.family, seed=recipe.base.seed)[0]
    assert recipe.base.path is not None  # check_recipe: family or path
    return load_model_dir(recipe.base.path, "base.path")


def load_model_dir(path: str | Path, field: str) -> nn.Module:
    """A saved vlmoe model or a plain HF vision-language model from a local directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{field} {path}: no config.json there; give a local model directory")
    return load_local(path)


def start_model(recipe: Recipe, stage: StageConfig, earlier: list[StageResult]) -> nn.Module:
    """The base model, or the saved output of the previous / a named earlier stage."""
    if stage.start == "base" or (stage.start == "previous" and not earlier):
        return base_model(recipe)
    source = earlier[-1] if stage.start == "previous" else next(r for r in earlier if r.name == stage.start)
    return vlmoe.load(source.model_dir)


def apply_surgery(
    model: nn.Module, surgery: SurgeryConfig, recipe: Recipe, earlier: list[StageResult], stage: StageConfig
) -> None:
    if surgery.upcycle is not None:
        s = surgery.upcycle
        vlmoe.upcycle_ffn(
            model,
            num_experts=s.num_experts,
            top_k=s.top_k,
            layers=s.layers,
            load_balance_coef=s.load_balance_coef,
            z_loss_coef=s.z_loss_coef,
            capacity_factor=s.capacity_factor,
        )
    elif surgery.mole is not None:
        m = surgery.mole
        vlmoe.add_mole(
            model,
            num_experts=m.num_experts,
            rank=m.rank,
            alpha=m.alpha,
            top_k=m.top_k,
            layers=m.layers,
            load_balance_coef=m.load_balance_coef if m.num_experts else 0.0,
            dropout=m.dropout,
        )
    elif surgery.mocle is not None:
        c = surgery.mocle
        vlmoe.add_mole(
            model,
            num_experts=c.num_experts,
            rank=c.rank,
            alpha=c.alpha,
            top_k=1,
            router="cluster",
            num_clusters=c.num_clusters,
            universal=c.universal,
            temperature=c.temperature,
            layers=c.layers,
        )
    elif surgery.connector is not None:
        c = surgery.connector
        projectors = None
        if c.init == "aligned":
            projectors = [_projector_state(name, model, earlier) for name in c.projectors]
        vlmoe.install_moe_connector(
            model,
            init=c.init,
            num_experts=c.num_experts,
            top_k=c.top_k,
            projectors=projectors,
            load_balance_coef=c.load_balance_coef,
            z_loss_coef=c.z_loss_coef,
        )


def _projector_state(name: str, model: nn.Module, earlier: list[StageResult]) -> dict[str, torch.Tensor]:
    """The projector weights of `name`: "base" (the model itself), an earlier stage's output or a
    saved model directory."""
    projector_path = vlmoe.models.adapter_for(model).projector
    result = next((r for r in earlier if r.name == name), None)
    if result is not None:
        source = vlmoe.load(result.model_dir)
    elif name == "base":
        source = model
    else:  # check_recipe: a saved model directory
        source = load_model_dir(name, "connector.projectors entry")
    projector = source.get_submodule(projector_path)
    return {k: v.detach().clone() for k, v in projector.state_dict().items()}


def _check_run_directory(recipe: Recipe, out: Path, resume: bool) -> None:
    """A new run needs a directory without a started run; a resumed one the same recipe it was
    started with. A run that never got to a checkpoint or a finished stage (it failed at start-up)
    has nothing to keep: it is started again, with this recipe."""
    saved = out / "recipe.json"
    current = dataclasses.asdict(recipe)
    del current["source"]  # where it was read from, not what it is: recipe.json loads as a recipe
    if saved.is_file() and _run_started(out):
        if not resume:
            raise ValueError(
                f"{out} already holds a run; continue it with --resume, or choose another output dir"
            )
        previous, now = json.loads(saved.read_text()), json.loads(json.dumps(current, default=str))
        # What the weights depend on: the base model (its checkpoints would not load into another
        # one), the seed (data order, surgery inits) and the stages. Name, description and
        # output_dir (a moved run) may differ.
        previous, now = _without_free_keys(previous), _without_free_keys(now)
        changed = [key for key in RESUME_KEYS if previous.get(key) != now[key]]
        if changed:
            found = [d for key in changed for d in _differences(previous.get(key), now[key], key)]
            shown = "; ".join(found[:3]) + (f"; and {len(found) - 3} more" if len(found) > 3 else "")
            raise ValueError(
                f"{saved}: the run was started with different {' and '.join(changed)} ({shown}); resume "
                f"with the same recipe and --scale (or {saved} itself), or start a new output dir"
            )
        _write_json(saved, current)  # the logging and saving it now runs with
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_json(saved, current)


def _without_free_keys(recipe: dict[str, Any]) -> dict[str, Any]:
    stages = recipe.get("stages")
    if not isinstance(stages, list):
        return recipe
    kept = [
        {k: v for k, v in stage.items() if k not in RESUME_FREE_STAGE_KEYS}
        if isinstance(stage, dict)
        else stage
        for stage in stages
    ]
    return {**recipe, "stages": kept}


def _differences(before: Any, now: Any, path: str) -> list[str]:
    """Where two JSON values differ, as "path: before -> now"; list items with a name show it.

    >>> _differences({"a": [1, {"name": "s", "b": 2}]}, {"a": [1, {"name": "s", "b": 3}]}, "x")
    ['x.a[1] (s).b: 2 -> 3']
    """

    def shown(value: Any) -> str:
        if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            value = [v["name"] for v in value]  # stages or sources added or removed: their names
        text = json.dumps(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [f"{where}: {shown(b)} -> {shown(n)}" for where, b, n in json_differences(before, now, path)]


def _run_started(out: Path) -> bool:
    """A stage finished or a checkpoint (even a half-written one) exists: there is work to keep."""
    return any(out.glob(f"*/{STAGE_DONE}")) or any(out.glob("*/checkpoints/checkpoint-*"))


def _write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=2, default=str)
    write_atomically(path, lambda temp: temp.write_text(text))
