"""`vlmoe demo`: the ChartMoE recipe end to end, small enough for a CPU in a few minutes.

Synthetic charts → a tiny LLaVA → three alignment runs (chart-to-table/-JSON/-code, each
training only a projector) → an MoE connector from the aligned projectors + LoRA SFT → evaluation
on held-out charts against the majority-answer baseline → a report folder:

    <out>/metrics.json          accuracy of the trained model and of the baseline, per task
    <out>/predictions.jsonl     every held-out question, the answer given and the reference
    <out>/training_curve.png    loss per step of every stage
    <out>/heldout.jsonl         the held-out samples (LLaVA format), for `vlmoe analyze`
    <out>/routing/              routing pictures (`vlmoe analyze` of heldout.jsonl)
    <out>/run/                  the recipe's run directory (stages, checkpoints, models)
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from vlmoe.atomic import first_names
from vlmoe.data import ConversationSample
from vlmoe.data.folders import output_folder
from vlmoe.device import resolve_device
from vlmoe.train.data import chart_samples
from vlmoe.train.recipe import ChartDataConfig, Recipe, load_recipe
from vlmoe.train.stages import StageResult, base_processor, run_recipe

if TYPE_CHECKING:
    import torch


def run_demo(
    out: str | Path = "demo-report",
    recipe: str = "demo",
    scale: str | None = "tiny",
    device: str | None = "cpu",
    resume: bool = False,
) -> dict[str, Any]:
    """Train `recipe` at `scale`, evaluate the last stage on held-out charts, write the report."""
    console = Console()
    out = Path(out)
    torch_device = resolve_device(device)  # before any work: a device the machine lacks is refused now
    output_folder(out)
    start = time.perf_counter()
    loaded = load_recipe(recipe, scale=scale, output_dir=out / "run")
    charts = _held_out_charts(loaded)  # before any work: the demo is scored on held-out charts
    if not resume:
        _check_demo_run(out / "run")
        shutil.rmtree(out / "run", ignore_errors=True)
    results = run_recipe(loaded, resume=resume, device=device, console=console)
    train_seconds = time.perf_counter() - start

    heldout = chart_samples(charts, loaded.output_dir, held_out=True)
    training = chart_samples(charts, loaded.output_dir)
    model_dir = results[-1].model_dir
    model = _load(model_dir, torch_device)
    heldout = _with_clusters(model, model_dir, heldout)
    predictions = _answer(model, base_processor(loaded), heldout)
    metrics = _score(heldout, training, predictions)
    metrics.update(
        recipe=recipe,
        scale=scale,
        device=device,
        train_seconds=round(train_seconds, 1),
        total_seconds=round(time.perf_counter() - start, 1),
        model=str(model_dir),
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    with (out / "predictions.jsonl").open("w") as file:
        for sample, answer in zip(heldout, predictions, strict=True):
            reference = sample.messages[1]["content"]
            file.write(json.dumps({"id": sample.id, "answer": answer, "reference": reference}) + "\n")
    plot_training_curves(results, out / "training_curve.png")
    _write_llava(heldout, out / "heldout.jsonl")
    routing_report(
        model_dir,
        out / "heldout.jsonl",
        out / "routing",
        results[-1].log_history,
        console,
        expert_names=_connector_expert_names(loaded),
    )
    console.print(_table(metrics))
    console.print(f"report: {out.resolve()}")
    console.print(
        "the methods' claims tested at GPU scale (tables, pictures, readings): "
        "experiments/README.md in the vlmoe repository"
    )
    return metrics


def _check_demo_run(run: Path) -> None:
    """`run` may be deleted for a fresh start: absent, empty, or a run directory (recipe.json) a
    demo wrote; a folder of other files in --out is the user's, not the demo's."""
    if not run.is_dir():
        return
    entries = sorted(entry.name for entry in run.iterdir())
    if entries and "recipe.json" not in entries:
        raise ValueError(
            f"--out {run.parent}: {run} holds other files ({first_names(entries)}) and no recipe.json, so it "
            "is not a demo run; the demo starts over by deleting it: pass a new or empty --out"
        )


def _held_out_charts(recipe: Recipe) -> ChartDataConfig:
    """The chart source of the last stage that keeps charts out of training."""
    for source in recipe.stages[-1].data.sources:
        if source.charts is not None and source.charts.held_out > 0:
            return source.charts
    raise ValueError(
        f"recipe {recipe.name!r}: the demo evaluates on held-out charts; give the last stage a chart "
        f"source with held_out > 0"
    )


def _load(model_dir: Path, device: torch.device) -> Any:
    import vlmoe

    return vlmoe.load(model_dir).to(device)


def _with_clusters(
    model: Any, model_dir: Path, samples: list[ConversationSample]
) -> list[ConversationSample]:
    """MoCLE: each held-out sample gets the cluster of its nearest training centroid."""
    from vlmoe.eval.clusters import cluster_assigner, default_clusters_dir

    assigner = cluster_assigner(model, default_clusters_dir(model_dir))
    if assigner is None:
        return samples
    ids = assigner.assign([sample.instruction for sample in samples])
    return [replace(sample, cluster_id=cluster) for sample, cluster in zip(samples, ids, strict=True)]


def _answer(model: Any, processor: Any, samples: list[ConversationSample]) -> list[str]:
    from PIL import Image

    from vlmoe.eval.generate import GenerationSettings, chat_prompt, generate

    prompts, images = [], []
    for sample in samples:
        prompts.append(chat_prompt(processor, sample.instruction, len(sample.images)))
        images.append([Image.open(path).convert("RGB") for path in sample.images])
    clustered = all(sample.cluster_id is not None for sample in samples)
    cluster_ids = [sample.cluster_id for sample in samples] if clustered else None
    settings = GenerationSettings(max_new_tokens=12, batch_size=32)
    answers = generate(model, processor, prompts, images, settings, progress=False, cluster_ids=cluster_ids)
    return [answer.strip() for answer in answers]


def _score(
    heldout: list[ConversationSample], training: list[ConversationSample], predictions: list[str]
) -> dict[str, Any]:
    """Per task: the model's accuracy and the majority-answer baseline's (answers of training).

    Only each sample's first question is asked. Program-of-Thought answers and references are
    programs: both run in the sandbox and their printed results are compared.
    """
    from vlmoe.eval.metrics import exact_match, relaxed_accuracy
    from vlmoe.eval.pot import pot_answer

    metrics: dict[str, Any] = {"tasks": {}}
    for task in sorted({s.task for s in heldout}):
        rows = [(s, p) for s, p in zip(heldout, predictions, strict=True) if s.task == task]
        train_answers = Counter(s.messages[1]["content"] for s in training if s.task == task)
        majority = train_answers.most_common(1)[0][0] if train_answers else ""
        score = exact_match if task == "chart_type" else relaxed_accuracy
        references = [s.messages[1]["content"] for s, _ in rows]
        answers = [p for _, p in rows]
        if task == "chart_qa_pot":
            answers, references = ([pot_answer(t).answer for t in texts] for texts in (answers, references))
            majority = pot_answer(majority).answer
        model_score = sum(score(p, ref) for p, ref in zip(answers, references, strict=True)) / len(rows)
        baseline = sum(score(majority, ref) for ref in references) / len(rows)
        metrics["tasks"][task] = {
            "samples": len(rows),
            "metric": score.__name__ + (" of the printed result" if task == "chart_qa_pot" else ""),
            "model": round(model_score, 4),
            "majority_baseline": round(baseline, 4),
            "majority_answer": majority,
            "distinct_answers": len(set(references)),
        }
    return metrics


def plot_training_curves(results: list[StageResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for result in results:
        points = [(entry["step"], entry["loss"]) for entry in result.log_history if "loss" in entry]
        if points:
            steps, losses = zip(*points, strict=True)
            axes.plot(steps, losses, label=result.name, marker=".")
    axes.set_xlabel("step")
    axes.set_ylabel("training loss (LM + aux)")
    axes.set_title("vlmoe demo: loss per stage")
    if axes.lines:
        axes.legend()
    else:  # every stage shorter than its logging interval: say so rather than draw empty axes
        axes.text(0.5, 0.5, "no training loss logged", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _write_llava(samples: list[ConversationSample], path: Path) -> None:
    roles = {"user": "human", "assistant": "gpt"}
    with path.open("w") as file:
        for s in samples:
            turns = [{"from": roles[m["role"]], "value": m["content"]} for m in s.messages]
            # Absolute: readers resolve a relative image path against the JSONL's own folder.
            image = str(Path(s.images[0]).resolve())
            line = {"id": s.id, "image": image, "conversations": turns, "task": s.task, "domain": s.domain}
            if s.cluster_id is not None:  # a MoCLE model's analysis routes by it
                line["cluster_id"] = s.cluster_id
            file.write(json.dumps(line) + "\n")


def _connector_expert_names(recipe: Recipe) -> str | None:
    """ "general,table,json,code" for ChartMoE's aligned connector (from its projector stages)."""
    for surgery in recipe.stages[-1].surgery:
        connector = surgery.connector
        if connector is not None and connector.init == "aligned":
            names = ["general" if p == "base" else p.removeprefix("align_") for p in connector.projectors]
            return ",".join(names)
    return None


def routing_report(
    model_dir: Path,
    heldout: Path,
    out: Path,
    log_history: list[dict[str, Any]],
    console: Console,
    expert_names: str | None = None,
) -> Path:
    """Expert load, modality split, pathways, per-patch expert maps and router statistics over
    training (from the last stage's log) for the held-out charts, as one HTML report."""
    from vlmoe.analysis import run_analyze

    out.mkdir(parents=True, exist_ok=True)
    log = out / "training_log.jsonl"
    log.write_text("".join(json.dumps(entry) + "\n" for entry in log_history))
    html = run_analyze(
        str(model_dir),
        data=heldout,
        out=out,
        logs=log,
        expert_names=expert_names,
        progress=False,
    )
    console.print(f"routing report: {html}")
    return html


def _table(metrics: dict[str, Any]) -> Table:
    table = Table(title=f"vlmoe demo: {metrics['recipe']} ({metrics['scale']}) on held-out charts")
    for column in ("task", "samples", "metric", "model", "majority baseline (answer)"):
        table.add_column(column)
    for task, row in metrics["tasks"].items():
        table.add_row(
            task,
            str(row["samples"]),
            row["metric"],
            f"{row['model']:.3f}",
            f"{row['majority_baseline']:.3f} ({row['majority_answer']})",
        )
    table.caption = f"training {metrics['train_seconds']:.0f}s, total {metrics['total_seconds']:.0f}s"
    return table
