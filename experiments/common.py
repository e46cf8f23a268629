"""Shared machinery of the reproductions: scales, the small VLM, shared chart data, the dense
pre-training, and recipes built as dicts and run by vlmoe's own `run_recipe`.

Every experiment starts from the same dense LLaVA-style model trained from scratch here (a CLIP
tower, an MLP projector, a Llama LM and a BPE tokenizer fitted to the chart texts), so the
arms differ only in what the experiment varies. Two scales: `smoke` (CPU, seconds, for CI) and
`gpu` (the real run on one H200). Smoke-scale numbers say only that the pipeline works.

    work/shared/data/charts-*/  synthetic charts (vlmoe.data); the last `held_out` are held out
    work/shared/data/*.jsonl    one LLaVA file per split and task (absolute image paths)
    work/shared/base/           the random small VLM + its processor (vlmoe.save)
    work/shared/pretrain/       the dense pre-training run; .../pretrain/final is every arm's start
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from experiments.small_vlm import ModelSize, build_small_vlm
from vlmoe.data import ChartSetConfig, ConversationSample, generate_chart_set
from vlmoe.train.data import chart_samples
from vlmoe.train.recipe import ChartDataConfig, Recipe, check_recipe
from vlmoe.train.stages import StageResult, run_recipe
from vlmoe.train.validate import from_mapping

CHART_TASKS = ("chart_type", "chart_qa", "chart_to_table", "chart_to_json", "chart_to_code")


@dataclass(frozen=True)
class Scale:
    """Sizes shared by every experiment at one scale; each experiment adds its own step counts."""

    name: str
    model: ModelSize
    charts: int  # charts generated; the last `held_out` are never trained on
    held_out: int
    questions_per_chart: int
    pretrain_steps: int
    pretrain_batch: int
    batch_size: int
    max_length: int
    precision: str
    logging_steps: int
    dataloader_workers: int
    eval_samples: int  # held-out charts scored per task
    table_tokens: int  # generation budget of a chart-to-table answer
    seeds: tuple[int, ...]
    parallel: int  # arm processes at once (1: in this process, one after another)


SMOKE = Scale(
    name="smoke",
    model=ModelSize(64, 16, 32, 1, 2, 32, 2, 4, 2, 64, 384),
    charts=16,
    held_out=4,
    questions_per_chart=1,
    pretrain_steps=2,
    pretrain_batch=4,
    batch_size=4,
    max_length=256,  # every smoke prompt and its reply start fit (the collator warns otherwise)
    precision="fp32",
    logging_steps=1,
    dataloader_workers=0,
    eval_samples=3,
    table_tokens=12,
    seeds=(0,),
    parallel=1,
)
# About 26M parameters (vision 3.2M, LM 22M, projector 0.4M); 64 image tokens per 128 px chart.
GPU = Scale(
    name="gpu",
    model=ModelSize(128, 16, 256, 4, 4, 512, 6, 8, 4, 1376, 2048),
    charts=6000,
    held_out=300,
    questions_per_chart=2,
    pretrain_steps=800,
    pretrain_batch=64,
    batch_size=32,
    max_length=320,
    precision="bf16",
    logging_steps=10,
    dataloader_workers=1,
    eval_samples=150,
    table_tokens=128,
    seeds=(0, 1),
    parallel=8,
)
SCALES = {"smoke": SMOKE, "gpu": GPU}


def get_scale(name: str, budget: float = 1.0) -> Scale:
    """The scale `name`; `budget` multiplies the pre-training steps (the experiments scale theirs).

    >>> get_scale("gpu", budget=0.5).pretrain_steps
    400
    """
    if name not in SCALES:
        raise ValueError(f"unknown scale {name!r}; choose one of {sorted(SCALES)}")
    scale = SCALES[name]
    return replace(scale, pretrain_steps=steps(scale.pretrain_steps, budget))


def steps(count: int, budget: float) -> int:
    """`count` optimiser steps scaled by the time `budget` (at least 1)."""
    return max(1, round(count * budget))


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------- shared data and base model


def shared_dir(work: str | Path) -> Path:
    return Path(work) / "shared"


def data_file(work: str | Path, split: str, task: str) -> Path:
    """The LLaVA file of one split ("train" / "heldout") and task, written by `prepare`."""
    return shared_dir(work) / "data" / f"{split}_{task}.jsonl"


def pretrained_model(work: str | Path) -> Path:
    return shared_dir(work) / "pretrain" / "pretrain" / "final"


def chart_config(scale: Scale) -> ChartDataConfig:
    return ChartDataConfig(
        n=scale.charts,
        seed=0,
        size_px=scale.model.image_size,
        questions_per_chart=scale.questions_per_chart,
        tasks=list(CHART_TASKS),
        held_out=scale.held_out,
    )


def prepare(work: str | Path, scale: str, workers: int = 1, budget: float = 1.0) -> dict[str, Any]:
    """Charts, per-task split files, the tokenizer and the random small VLM (idempotent)."""
    chosen = get_scale(scale, budget)
    shared = shared_dir(work)
    done = shared / "prepared.json"
    if done.is_file() and json.loads(done.read_text())["model"] == asdict(chosen.model):
        return json.loads(done.read_text())
    charts = chart_config(chosen)
    config = ChartSetConfig(
        n=charts.n, seed=charts.seed, size_px=charts.size_px, questions_per_chart=charts.questions_per_chart
    )
    # `chart_samples` generates into <shared>/data/charts-...; drawing them first here uses workers.
    from vlmoe.train.data import chart_directory

    generate_chart_set(chart_directory(charts, shared), config, workers=workers)
    counts = {}
    splits = {"train": chart_samples(charts, shared), "heldout": chart_samples(charts, shared, held_out=True)}
    for split, samples in splits.items():
        for task in CHART_TASKS:
            chosen_samples = [s for s in samples if s.task == task]
            write_llava(chosen_samples, data_file(work, split, task))
            counts[f"{split}_{task}"] = len(chosen_samples)
    # A few thousand texts fit a 2k-token BPE as well as all of them, in seconds instead of a minute.
    texts = [m["content"] for s in splits["train"] for m in s.messages]
    corpus = texts[:: max(1, len(texts) // 4000)]
    model, processor = build_small_vlm(chosen.model, corpus, seed=0)
    import vlmoe

    vlmoe.save(model, shared / "base", processor=processor)
    report = vlmoe.models.parameter_report(model)
    info = {"scale": scale, "samples": counts, "parameters": asdict(report), "model": asdict(chosen.model)}
    done.write_text(json.dumps(info, indent=2))
    return info


def write_llava(samples: list[ConversationSample], path: Path) -> None:
    """Samples as LLaVA JSON lines with absolute image paths and their task/domain tags."""
    path.parent.mkdir(parents=True, exist_ok=True)
    roles = {"user": "human", "assistant": "gpt"}
    with path.open("w") as file:
        for s in samples:
            turns = [{"from": roles[m["role"]], "value": m["content"]} for m in s.messages]
            line = {"id": s.id, "image": str(Path(s.images[0]).resolve()), "conversations": turns}
            line.update(task=s.task, domain=s.domain)
            if s.cluster_id is not None and s.cluster_id >= 0:
                line["cluster_id"] = s.cluster_id
            file.write(json.dumps(line) + "\n")


def pretrain(work: str | Path, scale: str, budget: float = 1.0) -> dict[str, Any]:
    """Dense pre-training from scratch: every part trained on all chart tasks (idempotent)."""
    chosen = get_scale(scale, budget)
    out = shared_dir(work) / "pretrain"
    settings = {"scale": scale, "steps": chosen.pretrain_steps, "batch": chosen.pretrain_batch}
    done = out / "pretrain" / "stage_done.json"
    # Reused only when made with the same settings (a rerun with another --budget trains anew).
    made = out / "settings.json"
    if done.is_file() and made.is_file() and json.loads(made.read_text()) == settings:
        return json.loads(done.read_text())
    shutil.rmtree(out, ignore_errors=True)
    sources = [source(work, "chart", task) for task in CHART_TASKS]
    stage_dict = stage(
        "pretrain",
        chosen,
        sources=sources,
        trainable=["vision_tower", "connector", "lm"],
        max_steps=chosen.pretrain_steps,
        learning_rate={"default": 1.0e-3},
        batch_size=chosen.pretrain_batch,
        dataloader_workers=4 * chosen.dataloader_workers,
    )
    results = run(recipe("pretrain", shared_dir(work) / "base", out, [stage_dict]))
    (out / "settings.json").write_text(json.dumps(settings))
    return {"log_history": results[-1].log_history}


# ---------------------------------------------------------------- recipes as dicts


def source(work: str | Path, name: str, task: str, split: str = "train", weight: float = 1.0) -> dict:
    """A recipe data source reading one of `prepare`'s task files, tagged with domain `name`."""
    return {"name": name, "path": str(data_file(work, split, task)), "weight": weight}


def stage(
    name: str,
    scale: Scale,
    *,
    sources: list[dict],
    trainable: list[str],
    max_steps: int,
    learning_rate: dict[str, float],
    surgery: list[dict] | None = None,
    start: str = "base",
    batch_size: int | None = None,
    dataloader_workers: int | None = None,
    aux_loss_scale: float = 1.0,
) -> dict[str, Any]:
    """One recipe stage (the YAML mapping, as a dict) at `scale`'s batch, length and precision."""
    return {
        "name": name,
        "start": start,
        "surgery": surgery or [],
        "data": {"sources": sources, "max_length": scale.max_length},
        "trainable": trainable,
        "learning_rate": learning_rate,
        "batch_size": batch_size or scale.batch_size,
        "max_steps": max_steps,
        "precision": scale.precision,
        "logging_steps": min(scale.logging_steps, max_steps),
        "save_steps": max_steps,  # one checkpoint, at the end (removed by `run`)
        "save_total_limit": 1,
        "report_to": [],
        "aux_loss_scale": aux_loss_scale,
        "schedule": {"name": "cosine", "warmup_ratio": 0.03},
        "dataloader_workers": scale.dataloader_workers if dataloader_workers is None else dataloader_workers,
    }


def recipe(name: str, base: str | Path, output_dir: str | Path, stages: list[dict], seed: int = 0) -> Recipe:
    """A validated vlmoe `Recipe` from dicts, exactly as a YAML file of the same content."""
    raw = {"name": name, "base": {"path": str(base)}, "output_dir": str(output_dir), "stages": stages}
    built = from_mapping(Recipe, {**raw, "seed": seed}, "", f"experiment recipe {name}")
    check_recipe(built, f"experiment recipe {name}")
    return built


def run(built: Recipe) -> list[StageResult]:
    """`run_recipe` on this machine's device; the end-of-stage checkpoints (optimiser state,
    only needed to resume) are removed afterwards to keep the disk small. The output directory is
    emptied first: an experiment run never resumes an earlier one."""
    quiet = Console(quiet=os.environ.get("VLMOE_EXPERIMENTS_QUIET") == "1")
    shutil.rmtree(built.output_dir, ignore_errors=True)  # an arm always starts afresh
    results = run_recipe(built, device=device(), console=quiet)
    for result in results:
        shutil.rmtree(result.model_dir.parent / "checkpoints", ignore_errors=True)
    return results


def train_arm(built: Recipe) -> tuple[StageResult, Any, float]:
    """(last stage's result, its final model on the device, training seconds) of one arm."""
    import vlmoe

    began = time.perf_counter()
    result = run(built)[-1]
    seconds = time.perf_counter() - began
    return result, vlmoe.load(result.model_dir).to(device()), seconds


def pretrained_processor(work: str | Path) -> Any:
    """The processor every arm shares (saved with the pre-trained model)."""
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(pretrained_model(work))


def initial_model(built: Recipe) -> Any:
    """A one-stage recipe's model right after its surgery, exactly as `run_stage` builds it (the
    same seed, the same calls in the same order), for the loss at step 0."""
    from transformers import set_seed

    from vlmoe.train.stages import apply_surgery, start_model

    stage = built.stages[0]
    set_seed(built.seed)
    model = start_model(built, stage, [])
    for surgery in stage.surgery:
        apply_surgery(model, surgery, built, [], stage)
    return model


def loss_curve(log_history: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(step, training loss) pairs of a stage's log."""
    return [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e]
