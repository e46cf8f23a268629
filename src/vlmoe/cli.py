"""Command line: `vlmoe --help`."""

from __future__ import annotations

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
    steps: int = typer.Option(600, help="Training steps of each model after the dense warm-up."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("cpu", help="Torch device, e.g. cpu or cuda."),
) -> None:
    """Upcycle a dense FFN into a top-2-of-4 MoE and train it on a task the dense FFN cannot fit."""
    from vlmoe.demo import run_core_demo

    run_core_demo(steps=steps, seed=seed, device=device)


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
