"""LLaVA-MoLE (Chen et al. 2024): does mixing domains with clashing answer styles hurt a dense
LoRA, and does a mixture of LoRA experts (top-1 per token) on the mix recover it?

From the shared dense model (experiments/common.py), with the three domains of `domains.py`:
- `alone-<domain>`: dense LoRA on one domain only (`steps.alone` steps), scored on that domain;
- `dense-mix`: dense LoRA on the three domains mixed (3 x the steps, so each domain gets as many
  samples as alone), scored on all three;
- `dense-mix-r<E*rank>`: the same at E times the rank: its FFN LoRAs hold as many weights as the
  main MoLE's E experts (its attention LoRAs E times more), so it tells capacity from routing;
- `mole-r<rank>-e<experts>`: MoLE on the mix (LoRA experts on the FFN linears, top-1, balance
  loss 0.01; plain LoRA on attention), the same steps; a small rank x experts grid around the
  main setting.
Per domain: held-out loss and its score (terse: relaxed accuracy; verbose: value accuracy and
the share of replies in sentence form; table: cell accuracy).

    python -m experiments.mole.run --scale smoke
    python -m experiments.mole.run --scale gpu --parallel 8
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from experiments import cli, common
from experiments.evaluation import answer, heldout_loss, read_split, score
from experiments.jobs import Job
from experiments.mole.domains import DOMAINS, build_domains, domain_file, verbose_scores
from experiments.report import aggregate, markdown_table, plot_curves, read_runs, write_run, write_summary

NAME = "mole"


@dataclass(frozen=True)
class Steps:
    alone: int  # per single-domain arm; the mixed arms train 3x as long
    rank: int  # the dense LoRA's rank and the main MoLE's
    experts: int  # the main MoLE's
    grid: tuple[tuple[int, int], ...]  # further (rank, experts) MoLE points
    loss_samples: int


STEPS = {
    "smoke": Steps(2, 4, 2, ((4, 4),), 2),
    "gpu": Steps(150, 16, 4, ((4, 4), (64, 4), (16, 2), (16, 8)), 48),
}


def arms(scale: str) -> list[str]:
    """The main arms (every seed) first, then the grid (first seed). `dense-mix-r<E*r>` is a dense
    LoRA with as many weights as the main MoLE's E experts of rank r: it tells extra capacity
    from routing."""
    steps = STEPS[scale]
    points = [(steps.rank, steps.experts), *steps.grid]
    control = f"dense-mix-r{steps.rank * steps.experts}"
    return [*(f"alone-{d}" for d in DOMAINS), "dense-mix", control, *(f"mole-r{r}-e{e}" for r, e in points)]


def main_arms(scale: str) -> list[str]:
    """The arms run with every seed: alone per domain, dense-mix, its capacity control, the main MoLE."""
    return arms(scale)[: len(DOMAINS) + 3]


def arm_recipe(work: str, scale: str, budget: float, arm: str, seed: int) -> Any:
    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    domains = [arm.split("-", 1)[1]] if arm.startswith("alone-") else list(DOMAINS)
    sources = [{"name": d, "path": str(domain_file(work, "train", d))} for d in domains]
    if arm.startswith("mole-"):
        rank, experts = (int(part[1:]) for part in arm.split("-")[1:])
        mole = {
            "num_experts": experts,
            "rank": rank,
            "alpha": 2 * rank,
            "top_k": 1,
            "load_balance_coef": 0.01,
        }
        trainable = ["lora", "router"]
    else:
        rank = int(arm.rsplit("-r", 1)[1]) if arm.startswith("dense-mix-r") else steps.rank
        mole = {"num_experts": 0, "rank": rank, "alpha": 2 * rank}
        trainable = ["lora"]
    stage = common.stage(
        "lora",
        chosen,
        sources=sources,
        surgery=[{"mole": mole}],
        trainable=trainable,
        max_steps=common.steps(steps.alone * len(domains), budget),
        learning_rate={"default": 1.0e-3},
    )
    out = Path(work) / NAME / f"{arm}-seed{seed}"
    return common.recipe(f"mole_{arm}", common.pretrained_model(work), out, [stage], seed)


def arm(work: str, results: str, scale: str, budget: float, arm: str, seed: int) -> None:
    """Train one arm; score it on its domain(s); writes `<results>/runs/<arm>-seed<k>.json`."""

    chosen, steps = common.get_scale(scale, budget), STEPS[scale]
    built = arm_recipe(work, scale, budget, arm, seed)
    processor = common.pretrained_processor(work)
    result, model, train_seconds = common.train_arm(built)
    record: dict[str, Any] = {
        "arm": arm,
        "seed": seed,
        "train_seconds": round(train_seconds, 1),
        "curve": common.loss_curve(result.log_history),
    }
    domains = [arm.split("-", 1)[1]] if arm.startswith("alone-") else DOMAINS
    for domain in domains:
        heldout = read_split(domain_file(work, "heldout", domain))
        loss_set = heldout[: steps.loss_samples]
        record[f"{domain}_loss"] = heldout_loss(model, processor, loss_set, chosen.max_length)
        samples = heldout[: chosen.eval_samples]
        tokens = {"terse": 12, "verbose": 64, "table": chosen.table_tokens}[domain]
        predictions = answer(model, processor, samples, tokens)
        if domain == "verbose":
            record.update(verbose_scores(predictions, samples))
        elif domain == "terse":
            record["terse_accuracy"] = score("chart_qa", predictions, samples)["relaxed_accuracy"]
        else:
            record["table_cell_accuracy"] = score("chart_to_table", predictions, samples)[
                "table_cell_accuracy"
            ]
    if len(domains) == len(DOMAINS):
        record["mean_loss"] = sum(record[f"{d}_loss"] for d in DOMAINS) / len(DOMAINS)
    write_run(results, f"{arm}-seed{seed}", record)


def domains_job(work: str) -> None:
    build_domains(work)


def jobs(work: str, results: str, scale: str, budget: float) -> list[Job]:
    chosen = common.get_scale(scale, budget)
    found = [Job(f"{NAME}-domains", f"{__name__}:domains_job", {"work": work}, ("prepare",))]
    every_seed = main_arms(scale)
    for seed in chosen.seeds:
        for name in arms(scale):
            if name not in every_seed and seed != chosen.seeds[0]:
                continue  # the grid runs with the first seed only
            kwargs = {
                "work": work,
                "results": results,
                "scale": scale,
                "budget": budget,
                "arm": name,
                "seed": seed,
            }
            found.append(
                Job(f"{NAME}-{name}-seed{seed}", f"{__name__}:arm", kwargs, ("pretrain", f"{NAME}-domains"))
            )
    names = tuple(job.name for job in found[1:])
    found.append(
        Job(f"{NAME}-report", f"{__name__}:report", {"results": results, "scale": scale}, names, always=True)
    )
    return found


METRICS = [
    ("terse_loss", "terse loss"),
    ("terse_accuracy", "terse acc."),
    ("verbose_loss", "verbose loss"),
    ("verbose_value_accuracy", "verbose value acc."),
    ("verbose_format", "verbose format"),
    ("table_loss", "table loss"),
    ("table_cell_accuracy", "table cell acc."),
    ("mean_loss", "mean loss (3 domains)"),
    ("train_seconds", "train s"),
]


def report(results: str, scale: str) -> None:
    order = arms(scale)
    runs = sorted(read_runs(results), key=lambda r: (order.index(r["arm"]), r["seed"]))
    table = aggregate(runs, [metric for metric, _ in METRICS])
    # One row for "each domain alone": every alone arm contributes its own domain's columns.
    alone = {k: v for a in DOMAINS for k, v in table.pop(f"alone-{a}", {}).items() if k != "train_seconds"}
    table = {"dense LoRA, each domain alone": alone, **table}
    curves = {a: [r["curve"] for r in runs if r["arm"] == a] for a in order}
    plot_curves(
        curves, Path(results) / "train_loss.png", "LLaVA-MoLE: training loss per arm (one line per seed)"
    )
    steps = STEPS[scale]
    grid = [(steps.rank, steps.experts), *steps.grid]
    ranks, experts = sorted({r for r, _ in grid}), sorted({e for _, e in grid})
    cells = [
        "| rank \\ experts | " + " | ".join(str(e) for e in experts) + " |",
        "| --- |" + " --- |" * len(experts),
    ]
    for r in ranks:
        row = [table.get(f"mole-r{r}-e{e}", {}).get("mean_loss") for e in experts]
        cells.append(f"| {r} | " + " | ".join("–" if v is None else f"{v[0]:.3f}" for v in row) + " |")
    sections = [
        ("Per-domain scores (mean ± std over seeds)", markdown_table(table, METRICS)),
        ("MoLE grid: mean held-out loss over the three domains (first seed)", "\n".join(cells)),
        ("Pictures", "![loss](train_loss.png)"),
    ]
    write_summary(
        results,
        "LLaVA-MoLE: dense LoRA vs MoLE under a data conflict",
        scale,
        sections,
        {"arms": table, "runs": runs},
    )


def main(argv: list[str] | None = None) -> None:
    cli.main(NAME, jobs, argv)


if __name__ == "__main__":
    main()
