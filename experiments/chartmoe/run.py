"""ChartMoE (Xu et al., ICLR 2025): does an MoE connector whose experts start from differently
aligned projectors beat co-upcycled and random experts, with the same data and steps?

From the shared dense model (experiments/common.py), per seed:
0. the "general" model: its projector re-initialised and trained alone (the LM frozen) on chart
   type and chart QA only. The shared pre-training saw every chart task, so its own projector
   is already aligned to tables, JSON and code and alignments from it have nothing left to add
   (the first GPU run: aligned and upcycled experts started at the same loss, 0.519). In the
   paper the general connector comes from a general MLLM that never saw these chart tasks;
   this stands in for it;
1. three alignment runs from the general model, each training only a copy of its projector on
   one task (chart-to-table, chart-to-JSON, chart-to-code);
2. four SFT arms from the general model on chart QA + table + JSON + code (MoE connector top-2
   of 4 + LLM LoRA): `aligned` (experts = general, table, JSON, code projectors; free routing),
   `aligned+balance` (the same with a balance loss 0.1 and z-loss 0.01), `upcycle` (4 copies of
   the general projector) and `random` (freshly initialised experts);
3. per arm: held-out loss before (right after the surgery) and after SFT, the training curve,
   chart QA relaxed accuracy, chart-to-table cell accuracy, and the connector's top-1 expert per
   patch split by region (text / mark / background, `regions.py`).

    python -m experiments.chartmoe.run --scale smoke            # CPU, seconds
    python -m experiments.chartmoe.run --scale gpu --parallel 8  # the real run
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from experiments import cli, common
from experiments.chartmoe.regions import REGIONS, patch_regions, region_expert_shares
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

NAME = "chartmoe"
SFT_TASKS = ("chart_qa", "chart_to_table", "chart_to_json", "chart_to_code")
GENERAL_TASKS = ("chart_type", "chart_qa")  # what the general connector is aligned on
ALIGN_TASKS = {"table": "chart_to_table", "json": "chart_to_json", "code": "chart_to_code"}
ARMS = ("aligned", "aligned+balance", "upcycle", "random")
EXPERT_NAMES = ["general", "table", "JSON", "code"]


@dataclass(frozen=True)
class Steps:
    general: int
    align: int
    sft: int
    lora_rank: int
    loss_samples: int  # held-out samples per SFT task for the loss
    patch_maps: int  # held-out charts whose per-patch routing is analysed


STEPS = {"smoke": Steps(2, 2, 3, 4, 2, 2), "gpu": Steps(250, 250, 600, 32, 48, 48)}


def align_dir(work: str | Path, task: str, seed: int) -> Path:
    return Path(work) / NAME / f"align-{task}-seed{seed}"


def general_model(work: str | Path, seed: int) -> Path:
    """The general model of `seed`: every alignment's and every arm's start."""
    return Path(work) / NAME / f"general-seed{seed}" / "general" / "final"


def general(work: str, scale: str, budget: float, seed: int) -> None:
    """The pre-trained model with a fresh projector trained (alone) on the general tasks."""
    import torch

    import vlmoe
    from vlmoe.moe.layers import reinitialize

    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    model = vlmoe.load(common.pretrained_model(work))
    torch.manual_seed(seed)
    reinitialize(model.model.multi_modal_projector)
    start = vlmoe.save(
        model, Path(work) / NAME / f"general-init-seed{seed}", common.pretrained_processor(work)
    )
    stage = common.stage(
        "general",
        chosen,
        sources=[common.source(work, "chart", task) for task in GENERAL_TASKS],
        trainable=["connector"],
        max_steps=common.steps(steps.general, budget),
        learning_rate={"default": 1.0e-3},
    )
    out = general_model(work, seed).parent.parent
    common.run(common.recipe("chartmoe_general", start, out, [stage], seed=seed))


def align(work: str, scale: str, budget: float, task: str, seed: int) -> None:
    """Train one copy of the general projector on one alignment task (connector only, the LM frozen)."""
    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    stage = common.stage(
        "align",
        chosen,
        sources=[common.source(work, "chart", ALIGN_TASKS[task])],
        trainable=["connector"],
        max_steps=common.steps(steps.align, budget),
        learning_rate={"default": 1.0e-3},
    )
    out = align_dir(work, task, seed)
    common.run(common.recipe(f"align_{task}", general_model(work, seed), out, [stage], seed=seed))


def sft_recipe(work: str, scale: str, budget: float, arm: str, seed: int) -> Any:
    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    init = "aligned" if arm.startswith("aligned") else arm
    connector: dict[str, Any] = {"init": init, "num_experts": 4, "top_k": 2}
    if init == "aligned":
        aligned = [str(align_dir(work, task, seed) / "align" / "final") for task in ALIGN_TASKS]
        connector["projectors"] = ["base", *aligned]
    if arm.endswith("+balance"):
        connector.update(load_balance_coef=0.1, z_loss_coef=0.01)
    rank = steps.lora_rank
    stage = common.stage(
        "sft",
        chosen,
        sources=[common.source(work, "chart", task) for task in SFT_TASKS],
        surgery=[{"connector": connector}, {"mole": {"num_experts": 0, "rank": rank, "alpha": 2 * rank}}],
        trainable=["connector", "router", "experts", "lora"],
        max_steps=common.steps(steps.sft, budget),
        learning_rate={"default": 1.0e-3, "router": 1.0e-3},
    )
    return common.recipe(
        f"chartmoe_{arm}", general_model(work, seed), arm_dir(work, arm, seed), [stage], seed
    )


def arm_dir(work: str | Path, arm: str, seed: int) -> Path:
    return Path(work) / NAME / f"{arm.replace('+', '_')}-seed{seed}"


def arm(work: str, results: str, scale: str, budget: float, arm: str, seed: int) -> None:
    """Train one arm, then measure it; writes `<results>/runs/<arm>-seed<k>.json`."""

    import vlmoe

    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    built = sft_recipe(work, scale, budget, arm, seed)
    device = common.device()
    processor = common.pretrained_processor(work)
    heldout = {task: read_split(common.data_file(work, "heldout", task)) for task in SFT_TASKS}
    loss_set = [s for task in SFT_TASKS for s in heldout[task][: steps.loss_samples]]
    dense = vlmoe.load(general_model(work, seed)).to(device)
    base_loss = heldout_loss(dense, processor, loss_set, chosen.max_length)
    start = common.initial_model(built).to(device)
    initial_loss = heldout_loss(start, processor, loss_set, chosen.max_length)
    del dense, start
    result, model, train_seconds = common.train_arm(built)
    record: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "base_loss": base_loss,  # the general model's: upcycling must start exactly there
        "initial_loss": initial_loss,
        "final_loss": heldout_loss(model, processor, loss_set, chosen.max_length),
        "train_seconds": round(train_seconds, 1),
        "curve": common.loss_curve(result.log_history),
        "parameters": vlmoe.models.parameter_report(model).total,
    }
    record.update(score_heldout(model, processor, heldout, chosen, ("chart_qa", "chart_to_table")))
    tables = heldout["chart_to_table"][: chosen.eval_samples]
    record.update(patch_routing(model, processor, tables[: steps.patch_maps], arm, seed, chosen, results))
    write_run(results, f"{arm.replace('+', '_')}-seed{seed}", record)


def patch_routing(
    model: Any, processor: Any, samples: list, arm: str, seed: int, chosen: common.Scale, results: str
) -> dict[str, Any]:
    """The connector's expert load and its top-1 expert per patch by region, teacher-forced on
    the samples; for the first seed also vlmoe's routing report (patch maps drawn over charts)."""
    from vlmoe.analysis import AnalysisSample, collect_routing, write_report

    routed = [
        AnalysisSample(
            s.id,
            (Path(s.images[0]),),
            (
                ("user", s.messages[0]["content"].replace("<image>", "").strip()),
                ("assistant", s.messages[1]["content"]),
            ),
            {"task": s.task},
        )
        for s in samples
    ]
    names = {"model.multi_modal_projector": EXPERT_NAMES} if arm.startswith("aligned") else {}
    stats = collect_routing(
        model,
        processor,
        routed,
        batch_size=16,
        max_patch_maps=len(routed),
        expert_names=names,
        progress=False,
    )
    connector = next(info for info in stats.layers if info.kind == "connector")
    maps = [
        (patch_regions(m.sample_id, chosen.model.image_size, m.grid), np.asarray(m.top1))
        for m in stats.patch_maps
    ]
    if seed == chosen.seeds[0]:
        stats.patch_maps = stats.patch_maps[:4]
        out = Path(results) / "routing" / arm.replace("+", "_")
        write_report(stats, out, title=f"ChartMoE {arm} (seed {seed}): routing on held-out charts")
    return {
        "region_shares": region_expert_shares(maps, connector.num_experts),
        "expert_load": stats.load_fractions()[0].round(4).tolist(),
    }


def jobs(work: str, results: str, scale: str, budget: float) -> list[Job]:
    """The general models, the alignment runs, the arms (after their seed's alignments) and the report."""
    chosen = common.get_scale(scale, budget)
    found: list[Job] = []
    for seed in chosen.seeds:
        kwargs = {"work": work, "scale": scale, "budget": budget, "seed": seed}
        found.append(Job(f"{NAME}-general-seed{seed}", f"{__name__}:general", kwargs, ("pretrain",)))
    for seed in chosen.seeds:
        for task in ALIGN_TASKS:
            kwargs = {"work": work, "scale": scale, "budget": budget, "task": task, "seed": seed}
            after = (f"{NAME}-general-seed{seed}",)
            found.append(Job(f"{NAME}-align-{task}-seed{seed}", f"{__name__}:align", kwargs, after))
    for seed in chosen.seeds:
        for name in ARMS:
            after = (f"{NAME}-general-seed{seed}",)
            if name.startswith("aligned"):
                after = tuple(f"{NAME}-align-{task}-seed{seed}" for task in ALIGN_TASKS)
            kwargs = {
                "work": work,
                "results": results,
                "scale": scale,
                "budget": budget,
                "arm": name,
                "seed": seed,
            }
            found.append(Job(f"{NAME}-{name.replace('+', '_')}-seed{seed}", f"{__name__}:arm", kwargs, after))
    arm_jobs = tuple(job.name for job in found if ":arm" in job.target)
    found.append(
        Job(
            f"{NAME}-report",
            f"{__name__}:report",
            {"results": results, "scale": scale},
            arm_jobs,
            always=True,
        )
    )
    return found


METRICS = [
    ("initial_loss", "held-out loss at step 0"),
    ("final_loss", "held-out loss after SFT"),
    ("relaxed_accuracy", "chart QA relaxed acc."),
    ("table_cell_accuracy", "table cell acc."),
    ("table_exact_match", "table exact match"),
    ("train_seconds", "train s"),
]


def report(results: str, scale: str) -> None:
    """Aggregate the runs over seeds: the table, the curves, bars and the region x expert table."""
    runs = sorted(read_runs(results), key=lambda r: (ARMS.index(r["arm"]), r["seed"]))
    table = aggregate(runs, [metric for metric, _ in METRICS])
    curves = {a: [r["curve"] for r in runs if r["arm"] == a] for a in table}
    plot_curves(
        curves, Path(results) / "sft_loss.png", "ChartMoE SFT: training loss per arm (one line per seed)"
    )
    plot_bars(
        table, METRICS[2:5], Path(results) / "scores.png", "ChartMoE: held-out scores (mean ± std over seeds)"
    )
    regions = []
    for a in table:
        rows = [r["region_shares"] for r in runs if r["arm"] == a]
        names = EXPERT_NAMES if a.startswith("aligned") else [f"expert {i}" for i in range(4)]
        for region in REGIONS:
            shares = np.mean([row[region] for row in rows], axis=0)
            cells = ", ".join(f"{n} {v:.2f}" for n, v in zip(names, shares, strict=True))
            regions.append(f"| {a} | {region} | {cells} |")
    region_table = (
        "| arm | patch region | share of patches by top-1 expert (mean over seeds) |\n| --- | --- | --- |\n"
    )
    sections = [
        ("Scores (mean ± std over seeds)", markdown_table(table, METRICS)),
        ("Top-1 connector expert by patch region", region_table + "\n".join(regions)),
        (
            "Pictures",
            "![loss](sft_loss.png)\n\n![scores](scores.png)\n\nRouting reports: `routing/<arm>/report.html`.",
        ),
    ]
    write_summary(
        results,
        "ChartMoE: aligned vs upcycled vs random connector experts",
        scale,
        sections,
        {"arms": table, "runs": runs},
    )


def main(argv: list[str] | None = None) -> None:
    cli.main(NAME, jobs, argv)


if __name__ == "__main__":
    main()
