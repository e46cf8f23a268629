"""A stage's training samples: synthetic charts and LLaVA files, mixed by weight, MoCLE clusters.

Synthetic charts are generated once under `<output_dir>/data/charts-<seed>-<size>-<q>/`
(`generate_chart_set` resumes a partial directory and checks that its settings match), so
every stage and every resumed run reads the same files.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from vlmoe.data import (
    BadSampleError,
    ChartSetConfig,
    ConversationSample,
    MixtureSource,
    generate_chart_set,
    mix_sources,
    read_conversations,
)
from vlmoe.train.distributed import is_main_process
from vlmoe.train.recipe import ChartDataConfig, ClusterConfig, DataConfig, SourceConfig

CHART_TYPE_QUESTION = "What type of chart is this?\nAnswer with the chart type."


def chart_directory(charts: ChartDataConfig, output_dir: str | Path) -> Path:
    return Path(output_dir) / "data" / f"charts-{charts.seed}-{charts.size_px}-{charts.questions_per_chart}"


def make_charts(charts: ChartDataConfig, output_dir: str | Path) -> list[Path]:
    """Generate (or reuse) the chart set and return its shard directories."""
    config = ChartSetConfig(
        n=charts.n, seed=charts.seed, size_px=charts.size_px, questions_per_chart=charts.questions_per_chart
    )
    return generate_chart_set(chart_directory(charts, output_dir), config)


def chart_samples(
    charts: ChartDataConfig, output_dir: str | Path, held_out: bool = False
) -> list[ConversationSample]:
    """The training samples (or, with `held_out`, the evaluation samples) of a chart source.

    Charts 0..n-held_out-1 train; the last `held_out` charts are only ever evaluated on.
    """
    shards = make_charts(charts, output_dir)
    first_held_out = charts.n - charts.held_out
    samples: list[ConversationSample] = []
    for shard in shards:
        records = [json.loads(line) for line in (shard / "records.jsonl").read_text().splitlines()]
        if charts.chart_types is not None:
            records = [r for r in records if r["chart_type"] in charts.chart_types]
        index_of = {record["id"]: int(Path(record["image"]).stem) for record in records}
        conversations, _ = read_conversations(shard / "conversations.jsonl", domain="chart")
        if "chart_type" in charts.tasks:
            conversations += [_chart_type_sample(shard, record) for record in records]
        for sample in conversations:
            index = index_of.get(sample.id.rsplit("-", 1)[0])  # ids are "<chart id>-<task>"
            if index is None:  # a chart type left out
                continue
            if sample.task in charts.tasks and (index >= first_held_out) == held_out:
                samples.append(sample)
    return samples


def _chart_type_sample(shard: Path, record: dict) -> ConversationSample:
    """A short-answer question the tiny demo model can learn: the chart type, as words."""
    return ConversationSample(
        id=f"{record['id']}-chart_type",
        images=[str(shard / record["image"])],
        messages=[
            {"role": "user", "content": f"<image>\n{CHART_TYPE_QUESTION}"},
            {"role": "assistant", "content": record["chart_type"].replace("_", " ")},
        ],
        domain="chart",
        task="chart_type",
    )


def stage_samples(data: DataConfig, output_dir: str | Path) -> list[ConversationSample]:
    """Every source read, filtered by task, mixed by weight; with `cluster`, tagged by cluster."""
    sources = []
    for source in data.sources:
        if source.charts is not None:
            samples = chart_samples(source.charts, output_dir)
        else:
            samples = _read_source(source)
        found = sorted({s.task for s in samples if s.task is not None})
        if source.tasks is not None:
            samples = [s for s in samples if s.task in source.tasks]
        if not samples:
            raise ValueError(_no_samples_message(source, found))
        # No weights given: each source's share is its size, so every sample is drawn once.
        weight = len(samples) if source.weight is None else source.weight
        sources.append(MixtureSource(source.name, samples, weight))
    total = data.num_samples or sum(len(s.samples) for s in sources)
    mixed = mix_sources(sources, total, seed=data.seed)
    if data.cluster is not None:
        mixed = with_clusters(mixed, data.cluster, Path(output_dir) / "clusters")
    return mixed


def _read_source(source: SourceConfig) -> list[ConversationSample]:
    """A path source's samples; a bad one stops the run with the recipe's fix, not the library's."""
    assert source.path is not None  # check_recipe: exactly one of path or charts
    try:
        samples, _ = read_conversations(
            source.path, image_root=source.image_root, on_error=source.on_error, domain=source.name
        )
    except BadSampleError as error:
        raise ValueError(
            f"{error.bad}\n  fix the sample, or set on_error: skip on data source {source.name!r} to leave "
            f"bad samples out (they are reported)"
        ) from None
    return samples


def _no_samples_message(source: SourceConfig, found: list[str]) -> str:
    """Why a source gave no training samples, naming the fields that decide it."""
    where = f"data source {source.name!r}"
    charts = source.charts
    if charts is not None:
        types = f" of chart types {charts.chart_types}" if charts.chart_types is not None else ""
        only = f" and source tasks {source.tasks}" if source.tasks is not None else ""
        return (
            f"{where}: no training samples: charts 0..{charts.n - charts.held_out - 1} of its n={charts.n} "
            f"train (held_out={charts.held_out}), and none of them{types} has a sample of tasks "
            f"{charts.tasks}{only}; raise n, lower held_out or widen chart_types"
        )
    if not found and source.tasks is None:
        return f"{where}: {source.path} holds no samples; give a file with LLaVA-format conversations"
    return (
        f"{where}: no sample of {source.path} has a task in tasks {source.tasks}; its samples' tasks "
        f"are {found or 'none (no task tags)'}: fix tasks, or leave it out to keep every sample"
    )


def with_clusters(
    samples: list[ConversationSample], cluster: ClusterConfig, out: Path
) -> list[ConversationSample]:
    """MoCLE: k-means of the instruction embeddings; centroids saved under `out` for inference."""
    import numpy as np

    from vlmoe.data import fit_instruction_clusters, save_clusters
    from vlmoe.data.clustering import DEFAULT_EMBEDDING_NAME, embed_instructions, load_sentence_encoder

    instructions = [s.instruction for s in samples]
    unique = sorted(set(instructions))
    embeddings = embed_instructions(unique, load_sentence_encoder(cluster.model))
    # One cluster per distinct embedding at most: texts differing only in case embed alike (uncased MiniLM).
    distinct = len(np.unique(embeddings, axis=0))
    clusters = fit_instruction_clusters(embeddings, min(cluster.num_clusters, distinct), cluster.seed)
    clusters.embedding_model = cluster.model or DEFAULT_EMBEDDING_NAME  # what inference must embed with
    if is_main_process():  # every rank computes the same clusters; one writes them
        save_clusters(out, clusters)
    label_of = dict(zip(unique, clusters.labels.tolist(), strict=True))
    return [replace(s, cluster_id=int(label_of[text])) for s, text in zip(samples, instructions, strict=True)]
