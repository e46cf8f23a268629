"""Command line: `vlmoe --help`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="vlmoe",
    help="Sparse Mixture-of-Experts vision-language models: build, train, evaluate, explain.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def main() -> None:
    """vlmoe: sparse MoE vision-language models."""


@app.command()
def demo(
    steps: int = typer.Option(300, help="Training steps."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("cpu", help="Torch device, e.g. cpu or cuda."),
) -> None:
    """Upcycle a dense FFN into a top-2-of-4 MoE and train it on a task the dense FFN cannot fit."""
    from vlmoe.demo import run_core_demo

    run_core_demo(steps=steps, seed=seed, device=device)


@app.command(name="eval")
def evaluate(
    model: Annotated[
        Path, typer.Argument(help="Local model directory (vlmoe.save or save_pretrained + processor).")
    ],
    task: Annotated[str, typer.Option(help="Benchmark: chartqa, pope, scienceqa, textvqa, vqav2 or llava.")],
    data: Annotated[
        Path, typer.Option(help="Local copy of the benchmark in its published layout, or a LLaVA JSON.")
    ],
    out: Annotated[Path | None, typer.Option(help="Results folder; default eval/<model>/<task>.")] = None,
    batch_size: Annotated[int, typer.Option(help="Samples per generation batch.")] = 8,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 64,
    pot: Annotated[
        bool, typer.Option(help="Run Python answers in the sandbox and score what they print.")
    ] = False,
    force_expert: Annotated[
        int | None, typer.Option(help="Send every token to this expert (ablation).")
    ] = None,
    force_where: Annotated[
        str, typer.Option(help="Where --force-expert applies: connector or all.")
    ] = "connector",
    image_dir: Annotated[
        Path | None, typer.Option(help="Folder holding the images, if not the layout's.")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Split to read (default test; val2014 for VQAv2).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N samples (a smoke run).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (sampling, if any).")] = 0,
) -> None:
    """Answer a benchmark with a model; predictions are appended as they come, so a rerun resumes."""
    from rich.console import Console

    from vlmoe.eval.generate import GenerationSettings
    from vlmoe.eval.report import summary_table
    from vlmoe.eval.runner import EvalConfig, load_model_for_eval, run_eval
    from vlmoe.eval.tasks import read_task

    try:  # bad data, paths or settings end with one line naming the problem, not a traceback
        config = EvalConfig(
            task=task,
            data=data,
            model_name=str(model.resolve()),
            out_dir=out if out is not None else Path("eval") / model.name / task,
            image_dir=image_dir,
            split=split,
            limit=limit,
            pot=pot,
            force_expert=force_expert,
            force_where=force_where,
            generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed),
        )
        samples = read_task(task, data, image_dir, split)  # before the (slow) model load
        loaded_model, processor = load_model_for_eval(model)
        summary = run_eval(loaded_model, processor, config, samples=samples)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"vlmoe eval: {error}", err=True)
        raise typer.Exit(code=1) from None
    console = Console()
    console.print(summary_table(summary))
    console.print(f"predictions: {summary['predictions']}\nsummary: {config.out_dir / 'summary.json'}")


@app.command()
def export(
    src: str = typer.Argument(..., help="A model directory written by vlmoe.save."),
    dst: str = typer.Argument(..., help="Where to write the standard HF checkpoint."),
) -> None:
    """Export an upcycled model (vlmoe.save) to a standard HF MoE checkpoint: Mixtral or Qwen2-MoE."""
    from vlmoe.models import export_hf, load

    try:
        path = export_hf(load(src), dst)
    except (ValueError, FileNotFoundError) as error:
        typer.echo(f"vlmoe export: {error}", err=True)
        raise typer.Exit(code=1) from error
    typer.echo(f"exported {src} -> {path}")


if __name__ == "__main__":
    app()
