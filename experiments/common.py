"""Shared machinery of the reproductions: scales, the small VLM, shared chart data, the dense
pre-training, and recipes built as dicts and run by vlmoe's own `run_recipe`.

Every experiment starts from the same dense LLaVA-style model trained from scratch here (a CLIP
tower, an MLP projector, a Llama LM and a BPE tokenizer fitted to the chart texts), so the
arms differ only in what the experiment varies. Two scales: `smoke` (CPU, seconds, for CI) and
`gpu` (the real run on one H200). Smoke-scale numbers say only that the pipeline works.

    work/shared/charts/         synthetic charts (vlmoe.data), train and held-out splits
    work/shared/data/*.jsonl    one LLaVA file per split and task (absolute image paths)
    work/shared/base/           the random small VLM + its processor (vlmoe.save)
    work/shared/pretrain/       the dense pre-training run; .../pretrain/final is every arm's start
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vlmoe.data import ChartSetConfig, ConversationSample, generate_chart_set
from vlmoe.train.data import chart_samples
from vlmoe.train.recipe import ChartDataConfig, Recipe, check_recipe
from vlmoe.train.stages import StageResult, run_recipe
from vlmoe.train.validate import from_mapping

CHART_TASKS = ("chart_type", "chart_qa", "chart_to_table", "chart_to_json", "chart_to_code")


@dataclass(frozen=True)
class ModelSize:
    """The small LLaVA: CLIP vision tower, two-layer MLP projector, Llama LM."""

    image_size: int
    patch_size: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    lm_hidden: int
    lm_layers: int
    lm_heads: int
    lm_kv_heads: int
    lm_intermediate: int
    vocab_size: int


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
    max_length=96,
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
    500
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
    if done.is_file():
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


def build_small_vlm(size: ModelSize, corpus: list[str], seed: int = 0) -> tuple[Any, Any]:
    """A random LLaVA of `size` with a byte-level BPE tokenizer fitted to `corpus`.

    >>> model, processor = build_small_vlm(SMOKE.model, ["a bar chart", "| a | b |"])
    >>> model.config.image_seq_length, len(processor.tokenizer) <= SMOKE.model.vocab_size
    (16, True)
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.llava.processing_llava import LlavaProcessor

    from vlmoe.models.tiny import _LLAVA_TEMPLATE
    from vlmoe.models.tokenizer import tiny_tokenizer

    tokenizer = tiny_tokenizer(
        ["<unk>", "<s>", "</s>", "<pad>", "<image>"],
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=_LLAVA_TEMPLATE,
        vocab_size=size.vocab_size,
        corpus=["USER: ASSISTANT:", *corpus],
    )
    vision = CLIPVisionConfig(
        hidden_size=size.vision_hidden,
        intermediate_size=4 * size.vision_hidden,
        num_hidden_layers=size.vision_layers,
        num_attention_heads=size.vision_heads,
        image_size=size.image_size,
        patch_size=size.patch_size,
        projection_dim=size.vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.lm_hidden,
        intermediate_size=size.lm_intermediate,
        num_hidden_layers=size.lm_layers,
        num_attention_heads=size.lm_heads,
        num_key_value_heads=size.lm_kv_heads,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=3,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=(size.image_size // size.patch_size) ** 2,
        vision_feature_layer=-1,
    )
    config._attn_implementation = "sdpa"
    side = size.image_size
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=size.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=_LLAVA_TEMPLATE,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.float(), processor


def pretrain(work: str | Path, scale: str, budget: float = 1.0) -> dict[str, Any]:
    """Dense pre-training from scratch: every part trained on all chart tasks (idempotent)."""
    chosen = get_scale(scale, budget)
    out = shared_dir(work) / "pretrain"
    if (out / "pretrain" / "stage_done.json").is_file():
        return json.loads((out / "pretrain" / "stage_done.json").read_text())
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


# ---------------------------------------------------------------- command line


def shared_jobs(work: str, scale: str, budget: float, workers: int) -> list:
    """Preparation and dense pre-training: every experiment's jobs run after "pretrain"."""
    from experiments.jobs import Job

    kwargs = {"work": work, "scale": scale, "budget": budget}
    return [
        Job("prepare", f"{__name__}:prepare", {**kwargs, "workers": workers}),
        Job("pretrain", f"{__name__}:pretrain", kwargs, ("prepare",)),
    ]


def parser(description: str) -> argparse.ArgumentParser:
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parse.add_argument(
        "--work", default=None, help="models and data (default /tmp/vlmoe-experiments/<scale>)"
    )
    parse.add_argument("--results", default=None, help="results folder (default experiments/<name>/results)")
    parse.add_argument(
        "--parallel", type=int, default=None, help="arm processes at once (default: the scale's)"
    )
    parse.add_argument("--budget", type=float, default=1.0, help="multiplies every step count")
    parse.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="chart drawing processes")
    return parse


def limit_threads(scale: str) -> None:
    """One torch thread at smoke scale: models of a few thousand weights gain nothing from threads,
    and on a busy machine their contention made a smoke run ten times slower."""
    if scale == "smoke":
        torch.set_num_threads(1)


def main(
    name: str, jobs: Callable[[str, str, str, float], Sequence], argv: Sequence[str] | None = None
) -> None:
    """One experiment's command line: the shared jobs, its own jobs, in parallel processes or not."""
    from experiments.jobs import run_jobs

    args = parser(f"vlmoe experiment {name}").parse_args(argv)
    limit_threads(args.scale)
    work = args.work or f"/tmp/vlmoe-experiments/{args.scale}"
    results = args.results or str(Path(__file__).parent / name / "results")
    scale = get_scale(args.scale, args.budget)
    todo = [
        *shared_jobs(work, args.scale, args.budget, args.workers),
        *jobs(work, results, args.scale, args.budget),
    ]
    parallel = scale.parallel if args.parallel is None else args.parallel
    for old in ("runs", "routing"):  # a run's results are only its own
        shutil.rmtree(Path(results) / old, ignore_errors=True)
    seconds = run_jobs(todo, parallel, Path(work) / "logs")
    Path(results).mkdir(parents=True, exist_ok=True)
    (Path(results) / "job_seconds.json").write_text(json.dumps(seconds, indent=2))
