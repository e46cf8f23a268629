"""Command line: `vlmoe --help`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from vlmoe.data.cli import data_app

if TYPE_CHECKING:  # torch loads inside the commands, so `vlmoe --help` stays fast
    import torch

app = typer.Typer(
    name="vlmoe",
    help="Sparse Mixture-of-Experts vision-language models: build, train, evaluate, explain.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

app.add_typer(data_app, name="data")


@app.callback()
def main() -> None:
    """vlmoe: sparse MoE vision-language models."""


@app.command()
def demo(
    steps: int = typer.Option(600, help="Training steps of each model after the dense warm-up."),
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
    device: Annotated[str, typer.Option(help="Torch device; auto = cuda if available, else cpu.")] = "auto",
    dtype: Annotated[
        str, typer.Option(help="float32, bfloat16 or float16; auto = bfloat16 on GPU, float32 on CPU.")
    ] = "auto",
) -> None:
    """Answer a benchmark with a model; predictions are appended as they come, so a rerun resumes."""
    from rich.console import Console

    from vlmoe.eval.generate import GenerationSettings
    from vlmoe.eval.report import summary_table
    from vlmoe.eval.runner import EvalConfig, load_model_for_eval, run_eval
    from vlmoe.eval.tasks import read_task

    try:  # bad data, paths or settings end with one line naming the problem, not a traceback
        torch_device, torch_dtype = _device_and_dtype(device, dtype)
        config = EvalConfig(
            task=task,
            data=data,
            model_name=str(model.resolve()),
            model_dtype=str(torch_dtype).removeprefix("torch."),
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
        loaded_model, processor = load_model_for_eval(model, torch_device, torch_dtype)
        summary = run_eval(loaded_model, processor, config, samples=samples)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"vlmoe eval: {error}", err=True)
        raise typer.Exit(code=1) from None
    console = Console()
    console.print(summary_table(summary))
    console.print(f"predictions: {summary['predictions']}\nsummary: {config.out_dir / 'summary.json'}")


def _device_and_dtype(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype named by the --device / --dtype options."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    try:
        return torch.device(device), getattr(torch, dtype)
    except RuntimeError as error:  # torch's message for an unknown device string
        raise ValueError(f"--device {device!r}: {error}") from None


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
