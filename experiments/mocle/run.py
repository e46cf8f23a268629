"""MoCLE (Gou et al. 2023): LoRA experts routed by the instruction's cluster, with and without
the always-on universal expert, vs one plain LoRA: which generalises to instruction styles never
seen in training?

From the shared dense model (experiments/common.py), on all five chart tasks phrased in the
training styles of `styles.py` (each sample tagged with its style's MiniLM cluster):
- `lora`: one plain LoRA;
- `mocle`: 4 LoRA experts, top-1, gated by a learned embedding of the cluster (8 clusters,
  temperature 0.1), no universal expert;
- `mocle+universal`: the same plus the universal LoRA expert.
Scored on held-out charts asked in seen and in held-out (unseen) phrasings: chart type exact
match, chart QA relaxed accuracy, chart-to-table cell accuracy, held-out loss; for the first seed,
vlmoe's routing report by task and by cluster.

    python -m experiments.mocle.run --scale smoke
    python -m experiments.mocle.run --scale gpu --parallel 8
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from experiments import cli, common
from experiments.evaluation import heldout_loss, read_split, score_heldout
from experiments.jobs import Job
from experiments.mocle.styles import HELD_OUT, NUM_CLUSTERS, TRAIN, style_clusters
from experiments.report import (
    aggregate,
    markdown_table,
    plot_bars,
    plot_curves,
    read_runs,
    write_run,
    write_summary,
)
from vlmoe.data import ConversationSample

NAME = "mocle"
ARMS = ("lora", "mocle", "mocle+universal")
SCORED = tuple(HELD_OUT)


@dataclass(frozen=True)
class Steps:
    train: int
    rank: int
    experts: int
    loss_samples: int
    routed_samples: int


STEPS = {"smoke": Steps(3, 4, 4, 2, 2), "gpu": Steps(400, 16, 4, 48, 24)}


def data_file(work: str | Path, name: str) -> Path:
    return Path(work) / NAME / "data" / f"{name}.jsonl"


def restyle(sample: ConversationSample, style: str, cluster: int) -> ConversationSample:
    """The sample's first instruction in `style` (for QA: the line after the question), first turn only."""
    text = sample.messages[0]["content"].replace("<image>", "").strip()
    instruction = f"{text.split(chr(10))[0]}\n{style}" if sample.task == "chart_qa" else style
    messages = [{"role": "user", "content": f"<image>\n{instruction}"}, sample.messages[1]]
    return replace(sample, messages=messages, cluster_id=cluster)


def build_data(work: str) -> None:
    """Training file (seen styles, drawn per sample) and held-out files per task, seen and unseen."""
    clusters = style_clusters(work)
    rng = np.random.default_rng(0)
    train = []
    for task, styles in TRAIN.items():
        for sample in read_split(common.data_file(work, "train", task)):
            style = styles[int(rng.integers(len(styles)))]
            train.append(restyle(sample, style, clusters[style]))
    common.write_llava(train, data_file(work, "train"))
    for task in SCORED:
        samples = read_split(common.data_file(work, "heldout", task))
        for kind, pool in (("seen", TRAIN[task]), ("unseen", HELD_OUT[task])):
            styled = [
                restyle(s, pool[i % len(pool)], clusters[pool[i % len(pool)]]) for i, s in enumerate(samples)
            ]
            common.write_llava(styled, data_file(work, f"heldout_{kind}_{task}"))


def arm_recipe(work: str, scale: str, budget: float, arm: str, seed: int) -> Any:
    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    rank = steps.rank
    if arm == "lora":
        surgery = {"mole": {"num_experts": 0, "rank": rank, "alpha": 2 * rank}}
    else:
        surgery = {
            "mocle": {
                "num_experts": steps.experts,
                "rank": rank,
                "alpha": 2 * rank,
                "num_clusters": NUM_CLUSTERS,
                "universal": arm == "mocle+universal",
                "temperature": 0.1,
            }
        }
    stage = common.stage(
        "lora",
        chosen,
        sources=[{"name": "chart", "path": str(data_file(work, "train"))}],
        surgery=[surgery],
        trainable=["lora", "router"],
        max_steps=common.steps(steps.train, budget),
        learning_rate={"default": 1.0e-3},
    )
    out = Path(work) / NAME / f"{arm.replace('+', '_')}-seed{seed}"
    return common.recipe(f"mocle_{arm}", common.pretrained_model(work), out, [stage], seed)


def arm(work: str, results: str, scale: str, budget: float, arm: str, seed: int) -> None:
    """Train one arm; score seen and unseen phrasings; writes `<results>/runs/<arm>-seed<k>.json`."""

    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    built = arm_recipe(work, scale, budget, arm, seed)
    processor = common.pretrained_processor(work)
    result, model, train_seconds = common.train_arm(built)
    record: dict[str, Any] = {"arm": arm, "seed": seed, "train_seconds": round(train_seconds, 1)}
    record["curve"] = common.loss_curve(result.log_history)
    for kind in ("seen", "unseen"):
        heldout = {task: read_split(data_file(work, f"heldout_{kind}_{task}")) for task in SCORED}
        loss_set = [s for task in SCORED for s in heldout[task][: steps.loss_samples]]
        record[f"{kind}_loss"] = heldout_loss(model, processor, loss_set, chosen.max_length)
        for metric, value in score_heldout(model, processor, heldout, chosen, SCORED).items():
            record[f"{kind}_{metric}"] = value
        if kind == "unseen" and arm != "lora" and seed == chosen.seeds[0]:
            routing_report(
                model,
                processor,
                work,
                steps.routed_samples,
                Path(results) / "routing" / arm.replace("+", "_"),
            )
    write_run(results, f"{arm.replace('+', '_')}-seed{seed}", record)


def routing_report(model: Any, processor: Any, work: str, per_file: int, out: Path) -> None:
    """vlmoe's routing report over seen and unseen phrasings of each task, tagged by task and cluster."""
    from vlmoe.analysis import AnalysisSample, collect_routing, write_report

    samples = []
    for kind in ("seen", "unseen"):
        for task in SCORED:
            for s in read_split(data_file(work, f"heldout_{kind}_{task}"))[:per_file]:
                question = s.messages[0]["content"].replace("<image>", "").strip()
                turns = (("user", question), ("assistant", s.messages[1]["content"]))
                tags = {"task": f"{task} ({kind})", "cluster_id": str(s.cluster_id)}
                samples.append(AnalysisSample(s.id, (Path(s.images[0]),), turns, tags))
    stats = collect_routing(model, processor, samples, batch_size=16, progress=False)
    write_report(stats, out, title="MoCLE: LoRA expert load by task (seen / unseen phrasing) and by cluster")


def data_job(work: str) -> None:
    build_data(work)


def jobs(work: str, results: str, scale: str, budget: float) -> list[Job]:
    chosen = common.get_scale(scale, budget)
    found = [Job(f"{NAME}-data", f"{__name__}:data_job", {"work": work}, ("prepare",))]
    for seed in chosen.seeds:
        for name in ARMS:
            kwargs = {
                "work": work,
                "results": results,
                "scale": scale,
                "budget": budget,
                "arm": name,
                "seed": seed,
            }
            after = ("pretrain", f"{NAME}-data")
            found.append(Job(f"{NAME}-{name.replace('+', '_')}-seed{seed}", f"{__name__}:arm", kwargs, after))
    names = tuple(job.name for job in found[1:])
    found.append(
        Job(f"{NAME}-report", f"{__name__}:report", {"results": results, "scale": scale}, names, always=True)
    )
    return found


METRICS = [
    (f"{kind}_{metric}", f"{label} ({kind})")
    for metric, label in (
        ("loss", "held-out loss"),
        ("chart_type_exact_match", "chart type acc."),
        ("relaxed_accuracy", "chart QA relaxed acc."),
        ("table_cell_accuracy", "table cell acc."),
    )
    for kind in ("seen", "unseen")
]


def report(results: str, scale: str) -> None:
    runs = sorted(read_runs(results), key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
    table = aggregate(runs, [metric for metric, _ in METRICS] + ["train_seconds"])
    curves = {a: [r["curve"] for r in runs if r["arm"] == a] for a in table}
    plot_curves(curves, Path(results) / "train_loss.png", "MoCLE: training loss per arm (one line per seed)")
    unseen = [m for m in METRICS if m[0].startswith("unseen") and "loss" not in m[0]]
    plot_bars(table, unseen, Path(results) / "unseen_scores.png", "MoCLE: held-out phrasings (mean ± std)")
    pictures = "![loss](train_loss.png)\n\n![unseen](unseen_scores.png)\n\n" + "\n\n".join(
        f"{arm}: ![by task](routing/{arm}/expert_load_by_task.png) "
        f"![by cluster](routing/{arm}/expert_load_by_cluster_id.png)"
        for arm in ("mocle", "mocle_universal")
    )
    sections = [
        (
            "Scores on held-out charts, seen vs unseen phrasing (mean ± std over seeds)",
            markdown_table(table, METRICS),
        ),
        ("Pictures", pictures),
    ]
    write_summary(
        results,
        "MoCLE: cluster-routed LoRA experts and the universal expert",
        scale,
        sections,
        {"arms": table, "runs": runs},
    )


def main(argv: list[str] | None = None) -> None:
    cli.main(NAME, jobs, argv)


if __name__ == "__main__":
    main()
