"""Run a sparse vision-language model over samples and collect its routing (`collect_routing`).

Each batch is one plain forward pass (teacher-forced: the user turn with its images and the
reference answer), recorded with `vlmoe.moe.record_routing`; padding is masked.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from vlmoe.analysis.collect import BatchImages, RoutingCollector
from vlmoe.analysis.stats import LayerInfo, RoutingStats
from vlmoe.data.chart_dataset import chart_set_shards
from vlmoe.eval.generate import progress_bar
from vlmoe.eval.samples import (
    EvalSample,
    existing_image,
    image_names_of,
    load_records,
    require,
)
from vlmoe.moe import (
    MoEConnector,
    record_routing,
    routes_by_cluster,
    routing_inputs,
    routing_records,
    sparse_layers,
)

SAMPLE_FORMAT = (
    '[{"id", "image" (optional), "conversations": [{"from": "human"|"gpt", "value"}], '
    '"domain", "task", "cluster_id" (optional tags)}] as JSON or JSON lines'
)
TAG_FIELDS = ("domain", "task", "cluster_id")
# ChartMoE's aligned connector experts, in its order.
CHARTMOE_EXPERTS = ["general", "table", "JSON", "code"]


@dataclass(frozen=True)
class AnalysisSample:
    """One conversation to route: `turns` are (role, text) with role "user" or "assistant"."""

    id: str
    images: tuple[Path, ...]
    turns: tuple[tuple[str, str], ...]
    tags: Mapping[str, str] = field(default_factory=dict)  # e.g. {"domain": "chart", "cluster_id": "3"}

    @property
    def cluster_id(self) -> int | None:
        value = self.tags.get("cluster_id")
        return None if value in (None, "") else int(value)


def read_samples(path: Path, image_dir: Path | None = None) -> list[AnalysisSample]:
    """LLaVA-format JSON/JSONL conversations with optional `domain`, `task`, `cluster_id` tags,
    or every conversation of a chart set (the folder `vlmoe data charts --out` wrote).

    Example:
        >>> samples = read_samples(Path("data/charts"))  # doctest: +SKIP
        >>> samples[0].tags  # doctest: +SKIP
        {'domain': 'chart', 'task': 'chart_to_table'}
    """
    path = Path(path)
    if path.is_dir():
        shards = chart_set_shards(path)
        if not shards:
            raise ValueError(
                f"--data {path} is a folder but not a chart set (no manifest.json); pass a LLaVA-format "
                ".json or .jsonl file, a `vlmoe data charts` folder, or --task <benchmark> to read a "
                "benchmark's folder"
            )
        if image_dir is not None:
            raise ValueError(
                f"--image-dir does not apply to the chart set {path}: its images are in its shards; "
                "leave --image-dir out"
            )
        # Image paths in a shard's conversations are relative to that shard.
        return [sample for shard in shards for sample in read_samples(shard / "conversations.jsonl", shard)]
    expected = f"must hold a list of samples; expected format: {SAMPLE_FORMAT}"
    places = load_records(path, "analysis data", expected)
    root = image_dir or path.parent
    samples = []
    for index, (place, record) in enumerate(places):
        where = f"analysis data {path} {place}"
        conversations = require(record, "conversations", where, SAMPLE_FORMAT)
        if not isinstance(conversations, list) or not conversations:  # nothing to route, or a string
            raise ValueError(
                f"{where}: 'conversations' is {json.dumps(conversations)[:80]}; it must be a non-empty "
                f"list of turns, expected format: {SAMPLE_FORMAT}"
            )
        turns = []
        for turn in conversations:
            speaker = str(require(turn, "from", where, SAMPLE_FORMAT))
            if speaker not in ("human", "gpt"):
                raise ValueError(f"{where}: 'from' must be 'human' or 'gpt', got {speaker!r}")
            text = str(require(turn, "value", where, SAMPLE_FORMAT)).replace("<image>", "").strip()
            turns.append(("user" if speaker == "human" else "assistant", text))
        names = image_names_of(record, "image", "images", where=where, expected_format=SAMPLE_FORMAT)
        tags = {tag: str(record[tag]) for tag in TAG_FIELDS if record.get(tag) not in (None, "")}
        if "cluster_id" in tags:  # read as training reads it (3, "3" and 3.0 alike), checked now
            tags["cluster_id"] = str(_cluster_number(record["cluster_id"], where))
        samples.append(
            AnalysisSample(
                id=str(record.get("id", index)),
                images=tuple(existing_image(root, name, where) for name in names),
                turns=tuple(turns),
                tags=tags,
            )
        )
    return samples


def _cluster_number(value: Any, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{where}: 'cluster_id' must be an integer cluster number (as vlmoe data cluster writes), "
            f"got {value!r}; fix it or leave the field out"
        ) from None


def from_eval_samples(samples: Sequence[EvalSample]) -> list[AnalysisSample]:
    """Benchmark samples (`vlmoe.eval.read_task`) as analysis samples tagged by task and subset."""
    return [
        AnalysisSample(
            id=sample.id,
            images=sample.images,
            turns=(("user", sample.question), ("assistant", sample.answers[0] if sample.answers else "")),
            tags={"task": sample.task, **({"subset": sample.subset} if sample.subset else {})},
        )
        for sample in samples
    ]


def routed_layers(model: nn.Module) -> list[LayerInfo]:
    """Every routed sparse layer of `model`, in module order, as `LayerInfo`."""
    return [
        LayerInfo(
            name=name,
            kind="connector" if isinstance(layer, MoEConnector) else "lm",
            num_experts=layer.num_experts,
            top_k=layer.top_k,
        )
        for name, layer in sparse_layers(model)
    ]


def collect_routing(
    model: nn.Module,
    processor: Any,
    samples: Sequence[AnalysisSample],
    *,
    batch_size: int = 4,
    max_path_tokens: int = 20_000,
    max_patch_maps: int = 4,
    expert_names: Mapping[str, list[str]] | None = None,
    meta: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> RoutingStats:
    """Forward every sample through `model` with routing recorded; returns the collected statistics.

    `expert_names` maps a layer name to names of its experts; by default a connector installed
    with `init="aligned"` and 4 experts is named general/table/JSON/code (ChartMoE's order).

    Example:
        >>> import vlmoe
        >>> from vlmoe.models import tiny
        >>> model, processor = tiny("llava")
        >>> model = vlmoe.upcycle_ffn(model, num_experts=4, top_k=2)
        >>> sample = AnalysisSample("s0", (), (("user", "Hi"), ("assistant", "Hello")), {"domain": "chat"})
        >>> stats = collect_routing(model, processor, [sample], progress=False)
        >>> [info.label for info in stats.layers], stats.meta["num_samples"]
        (['layer 0', 'layer 1'], 1)
    """
    from vlmoe.models.families import adapter_for

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    layers = routed_layers(model)
    if not layers:
        raise ValueError(
            "the model has no routed sparse layer (MoE FFN, MoLE or MoE connector): apply "
            "vlmoe.upcycle_ffn / add_mole / install_moe_connector first, or load a vlmoe.save directory"
        )
    unclustered = [sample.id for sample in samples if sample.cluster_id is None]
    if routes_by_cluster(model) and unclustered:
        raise ValueError(
            f"the model routes by instruction cluster (MoCLE) but samples {unclustered[:5]} have no "
            "cluster_id; give every sample its cluster (vlmoe data cluster, or a cluster_id field)"
        )
    adapter = adapter_for(model)
    image_token_id = adapter.image_token_id(model)
    experts = {info.name: info.num_experts for info in layers}
    for name, given in (expert_names or {}).items():
        if name not in experts:
            raise ValueError(f"expert_names: {name!r} is not a routed layer; layers: {', '.join(experts)}")
        if len(given) != experts[name]:
            raise ValueError(
                f"expert_names[{name!r}]: {len(given)} names ({', '.join(given)}) for {experts[name]} "
                "experts; give one name per expert"
            )
    names = {**_default_expert_names(model, layers), **dict(expert_names or {})}
    collector = RoutingCollector(layers, max_path_tokens, max_patch_maps, names)
    batches = [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]
    reference = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        for batch in progress_bar(batches, f"routing {len(samples)} samples", progress):
            inputs = _batch_inputs(processor, batch).to(device=reference.device, dtype=reference.dtype)
            cluster_ids = _cluster_ids(batch, reference.device)
            for _, layer in sparse_layers(model):
                layer.last_routing = None  # a layer this batch does not reach must not report an old one
            with (
                torch.inference_mode(),
                record_routing(model),
                routing_inputs(model, attention_mask=inputs["attention_mask"], cluster_ids=cluster_ids),
            ):
                model(**inputs, use_cache=False)
            collector.add(
                routing_records(model),
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                image_token_id=image_token_id,
                tags=[sample.tags for sample in batch],
                images=_batch_images(model, adapter.name, inputs, batch),
                sample_ids=[sample.id for sample in batch],
            )
    finally:
        model.train(was_training)
    settings = {"batch_size": batch_size, "max_path_tokens": max_path_tokens, "family": adapter.name}
    return collector.stats({**settings, **dict(meta or {})})


def _batch_inputs(processor: Any, batch: Sequence[AnalysisSample]) -> Any:
    texts = []
    for sample in batch:
        messages = []
        for index, (role, text) in enumerate(sample.turns):
            images = [{"type": "image"}] * len(sample.images) if index == 0 else []
            messages.append({"role": role, "content": [*images, {"type": "text", "text": text}]})
        texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
    images = [[_open_image(path, sample.id) for path in sample.images] for sample in batch]
    return processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True)


def _cluster_ids(batch: Sequence[AnalysisSample], device: torch.device) -> torch.Tensor | None:
    ids = [sample.cluster_id for sample in batch]
    if any(cluster is None for cluster in ids):
        return None  # a cluster-routed model then says which field is missing
    return torch.tensor(ids, device=device)


def _batch_images(model: nn.Module, family: str, inputs: Any, batch: Sequence[AnalysisSample]) -> BatchImages:
    """Which sample each connector image belongs to, and its patch grid where the family tells it."""
    owners = [b for b, sample in enumerate(batch) for _ in sample.images]
    paths = [str(path) for sample in batch for path in sample.images]
    grids: list[tuple[int, int] | None] = [None] * len(owners)
    if family in ("qwen2_vl", "qwen2_5_vl") and "image_grid_thw" in inputs:
        merge = model.config.vision_config.spatial_merge_size
        grids = [(int(h) // merge, int(w) // merge) for _, h, w in inputs["image_grid_thw"].tolist()]
    elif family == "llava":
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        grids = [(side, side)] * len(owners)
    # LLaVA-NeXT and Idefics3 tile images; their per-tile layout is not drawn (counts still are).
    return BatchImages(sample_index=owners, grids=grids, paths=paths)


def _default_expert_names(model: nn.Module, layers: Sequence[LayerInfo]) -> dict[str, list[str]]:
    from vlmoe.models.record import read_record

    record = read_record(model)
    aligned = record is not None and any(
        step.kind == "install_moe_connector" and step.init == "aligned" for step in record.steps
    )
    return {
        info.name: list(CHARTMOE_EXPERTS)
        for info in layers
        if aligned and info.kind == "connector" and info.num_experts == len(CHARTMOE_EXPERTS)
    }


def _open_image(path: Path, sample_id: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"sample {sample_id!r}: image {path} cannot be read ({error})") from None
