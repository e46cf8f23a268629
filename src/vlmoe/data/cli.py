"""`vlmoe data ...`: make synthetic chart data and cluster instructions."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from vlmoe.cli_errors import reported

data_app = typer.Typer(help="Data: synthetic charts, instruction clustering.", no_args_is_help=True)


@data_app.command()
def charts(
    n: Annotated[int, typer.Option("--n", help="Number of charts.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory (re-running resumes it).")],
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same data set (byte-identical JSON).")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Rendering processes.")] = 1,
    size: Annotated[int, typer.Option("--size", help="Image side in pixels.")] = 336,
    shard_size: Annotated[int, typer.Option("--shard-size", help="Charts per shard directory.")] = 1000,
) -> None:
    """Synthetic charts (PNG + table + JSON + plotting code + QA with PoT) and LLaVA conversations."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from vlmoe.data.chart_dataset import ChartSetConfig, check_chart_set, generate_chart_set

    config = ChartSetConfig(n=n, seed=seed, size_px=size, shard_size=shard_size)
    start = time.perf_counter()
    columns = (TextColumn("charts"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    # A bad option is typer's exit 2 with the option named; an OSError (a name too long, no space
    # left, no permission) is one line and exit 1 through `reported`, not a traceback.
    with reported("data charts"):
        try:
            check_chart_set(out, config, workers)  # before the bar starts, so a bad option shows no "0/-5"
            with Progress(*columns) as progress:
                task = progress.add_task("charts", total=n)
                shards = generate_chart_set(
                    out, config, workers=workers, on_progress=lambda k: progress.advance(task, k)
                )
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    seconds = time.perf_counter() - start
    typer.echo(
        f"{n} charts in {len(shards)} shard(s) under {out} in {seconds:.1f}s ({n / seconds:.1f} charts/s)"
    )


@data_app.command()
def cluster(
    data: Annotated[Path, typer.Option("--data", help="LLaVA conversations, .json or .jsonl.")],
    out: Annotated[Path, typer.Option("--out", help="Directory for centroids, clusters.json and the data.")],
    k: Annotated[int, typer.Option("--k", help="Number of clusters (MoCLE: 64).")] = 64,
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Local sentence-transformers model; default all-MiniLM-L6-v2."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="k-means seed.")] = 0,
) -> None:
    """MoCLE: embed each sample's instruction, k-means into K clusters, write cluster_id per sample."""
    import numpy as np

    from vlmoe.data.clustering import CENTROIDS_FILE, CLUSTERS_CONFIG_FILE, cluster_conversation_file
    from vlmoe.data.conversations import BadSampleError

    # vlmoe's own errors about the options (a missing --data, a bad sample) are typer's exit 2; any
    # other OSError (a --model folder that cannot be read, no space left) is one line and exit 1.
    with reported("data cluster"):
        try:
            data_out, clusters = cluster_conversation_file(data, out, num_clusters=k, model=model, seed=seed)
        except BadSampleError as error:  # its own hint is the Python option on_error="skip", not ours
            raise typer.BadParameter(
                f"{error.bad}\n  fix or remove the sample: every sample of --data is written back with its "
                f"cluster_id, so none can be skipped",
                param_hint="--data",
            ) from None
        except (ValueError, FileNotFoundError) as error:
            raise typer.BadParameter(str(error)) from None
    sizes = np.bincount(clusters.labels, minlength=clusters.num_clusters)
    typer.echo(
        f"{len(clusters.labels)} samples in {clusters.num_clusters} clusters "
        f"(sizes {sizes.min()}..{sizes.max()}); wrote {data_out}, {out / CENTROIDS_FILE} "
        f"and {out / CLUSTERS_CONFIG_FILE}"
    )
