"""MoE-Tuning (MoE-LLaVA, Lin et al. 2024): an LM upcycled to top-2-of-4 MoE FFNs vs the dense
model, trained for the same steps on the same data: quality per active parameter, wall time, and
the expert-load / modality pictures.

From the shared dense model (experiments/common.py), per seed, on all five chart tasks:
- `dense`: the dense model trained on (LM + connector);
- `moe`: MoE FFNs in every other LM layer (4 experts, top-2, balance loss 0.01, each expert a copy
  of the dense FFN), trained on the same parts plus experts and routers;
- `moe-stage3`: the same MoE, training only experts and routers (MoE-LLaVA's stage 3).
Measured: held-out loss at step 0 and after training, chart QA relaxed accuracy, chart type exact
match, chart-to-table cell accuracy, total / active parameters, training seconds; for the first
seed, vlmoe's routing report (expert load overall and by task, modality split, pathways).

    python -m experiments.moe_tuning.run --scale smoke
    python -m experiments.moe_tuning.run --scale gpu --parallel 8
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import cli, common
from experiments.evaluation import heldout_loss, read_split, score_heldout
from experiments.jobs import Job
from experiments.report import (
    aggregate,
    markdown_table,
    plot_bars,
    plot_curves,
    read_runs,
    write_run,
    write_summary,
)

NAME = "moe_tuning"
ARMS = ("dense", "moe", "moe-stage3")
SCORED = ("chart_qa", "chart_type", "chart_to_table")
UPCYCLE = {"num_experts": 4, "top_k": 2, "layers": "every_other", "load_balance_coef": 0.01}


@dataclass(frozen=True)
class Steps:
    train: int
    loss_samples: int  # held-out samples per task for the loss
    routed_samples: int  # held-out samples per task routed for the pictures


STEPS = {"smoke": Steps(3, 2, 2), "gpu": Steps(600, 40, 24)}


def arm_recipe(work: str, scale: str, budget: float, arm: str, seed: int) -> Any:
    chosen = common.get_scale(scale, budget)
    surgery = [] if arm == "dense" else [{"upcycle": dict(UPCYCLE)}]
    trainable = {"dense": ["lm", "connector"], "moe": ["lm", "connector", "experts", "router"]}
    stage = common.stage(
        "train",
        chosen,
        sources=[common.source(work, "chart", task) for task in common.CHART_TASKS],
        surgery=surgery,
        trainable=trainable.get(arm, ["experts", "router"]),
        max_steps=common.steps(STEPS[scale].train, budget),
        learning_rate={"default": 5.0e-4},
    )
    out = Path(work) / NAME / f"{arm}-seed{seed}"
    return common.recipe(f"moe_tuning_{arm}", common.pretrained_model(work), out, [stage], seed)


def arm(work: str, results: str, scale: str, budget: float, arm: str, seed: int) -> None:
    """Train one arm and measure it; writes `<results>/runs/<arm>-seed<k>.json`."""

    import vlmoe

    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    built = arm_recipe(work, scale, budget, arm, seed)
    device = common.device()
    processor = common.pretrained_processor(work)
    heldout = {task: read_split(common.data_file(work, "heldout", task)) for task in common.CHART_TASKS}
    loss_set = [s for task in common.CHART_TASKS for s in heldout[task][: steps.loss_samples]]
    start = common.initial_model(built).to(device)
    initial_loss = heldout_loss(start, processor, loss_set, chosen.max_length)
    del start
    result, model, train_seconds = common.train_arm(built)
    parameters = vlmoe.models.parameter_report(model)
    record: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "initial_loss": initial_loss,
        "final_loss": heldout_loss(model, processor, loss_set, chosen.max_length),
        "train_seconds": round(train_seconds, 1),
        "seconds_per_step": train_seconds / built.stages[0].max_steps,
        "total_parameters_m": parameters.total / 1e6,
        "active_parameters_m": parameters.active_per_token / 1e6,
        "curve": common.loss_curve(result.log_history),
    }
    record.update(score_heldout(model, processor, heldout, chosen, SCORED))
    # Quality per active parameter: accuracy points per million active parameters.
    record["qa_per_active_m"] = record["relaxed_accuracy"] / record["active_parameters_m"]
    if arm != "dense" and seed == chosen.seeds[0]:
        routing_report(model, processor, heldout, steps.routed_samples, Path(results) / "routing" / arm, arm)
    write_run(results, f"{arm}-seed{seed}", record)


def routing_report(model: Any, processor: Any, heldout: dict, per_task: int, out: Path, arm: str) -> None:
    """vlmoe's routing report over held-out samples of every task, tagged by task."""
    from vlmoe.analysis import AnalysisSample, collect_routing, write_report

    samples = [
        AnalysisSample(
            s.id,
            (Path(s.images[0]),),
            (
                ("user", s.messages[0]["content"].replace("<image>", "").strip()),
                ("assistant", s.messages[1]["content"]),
            ),
            {"task": s.task},
        )
        for task in common.CHART_TASKS
        for s in heldout[task][:per_task]
    ]
    stats = collect_routing(model, processor, samples, batch_size=16, progress=False)
    write_report(stats, out, title=f"MoE-Tuning {arm}: routing on held-out charts, by task")


def jobs(work: str, results: str, scale: str, budget: float) -> list[Job]:
    chosen = common.get_scale(scale, budget)
    found = []
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
            found.append(Job(f"{NAME}-{name}-seed{seed}", f"{__name__}:arm", kwargs, ("pretrain",)))
    names = tuple(job.name for job in found)
    found.append(
        Job(f"{NAME}-report", f"{__name__}:report", {"results": results, "scale": scale}, names, always=True)
    )
    return found


METRICS = [
    ("total_parameters_m", "total params (M)"),
    ("active_parameters_m", "active params (M)"),
    ("initial_loss", "held-out loss at step 0"),
    ("final_loss", "held-out loss after"),
    ("relaxed_accuracy", "chart QA relaxed acc."),
    ("chart_type_exact_match", "chart type acc."),
    ("table_cell_accuracy", "table cell acc."),
    ("qa_per_active_m", "QA acc. per active M"),
    ("train_seconds", "train s"),
    ("seconds_per_step", "s / step"),
]


def report(results: str, scale: str) -> None:
    runs = sorted(read_runs(results), key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
    table = aggregate(runs, [metric for metric, _ in METRICS])
    curves = {a: [r["curve"] for r in runs if r["arm"] == a] for a in table}
    plot_curves(curves, Path(results) / "train_loss.png", "MoE-Tuning: training loss (one line per seed)")
    plot_bars(table, METRICS[4:7], Path(results) / "scores.png", "MoE-Tuning: held-out scores (mean ± std)")
    pictures = "![loss](train_loss.png)\n\n![scores](scores.png)\n\n" + "\n\n".join(
        f"{arm}: ![load](routing/{arm}/expert_load.png) ![by task](routing/{arm}/expert_load_by_task.png) "
        f"![modality](routing/{arm}/modality_split.png)"
        for arm in ARMS[1:]
    )
    sections = [("Scores (mean ± std over seeds)", markdown_table(table, METRICS)), ("Pictures", pictures)]
    write_summary(
        results,
        "MoE-Tuning: dense vs upcycled top-2-of-4 MoE",
        scale,
        sections,
        {"arms": table, "runs": runs},
    )


def main(argv: list[str] | None = None) -> None:
    cli.main(NAME, jobs, argv)


if __name__ == "__main__":
    main()
