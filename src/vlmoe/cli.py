"""Command line: `vlmoe --help`."""

from __future__ import annotations

import typer

from vlmoe.data.cli import data_app

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
    steps: int = typer.Option(300, help="Training steps."),
    seed: int = typer.Option(0, help="Random seed."),
    device: str = typer.Option("cpu", help="Torch device, e.g. cpu or cuda."),
) -> None:
    """Upcycle a dense FFN into a top-2-of-4 MoE and train it on a task the dense FFN cannot fit."""
    from vlmoe.demo import run_core_demo

    run_core_demo(steps=steps, seed=seed, device=device)


if __name__ == "__main__":
    app()
