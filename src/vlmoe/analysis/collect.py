"""Accumulate routing records into `RoutingStats`, batch by batch.

`RoutingCollector.add` takes the routing records of one forward pass (`vlmoe.moe.routing_records`)
plus what the batch was: token ids, padding mask, the image token id, each sample's tags and each
image's patch grid. It knows nothing of Hugging Face, so tests feed it hand-built records;
`vlmoe.analysis.run.collect_routing` drives a real model through it.

Shape legend: B samples, S sequence length, T = B * S routed LM tokens, K top_k, E experts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlmoe.analysis.stats import IMAGE, TEXT, LayerInfo, PatchMap, RoutingStats
from vlmoe.moe.router import Routing


@dataclass
class BatchImages:
    """The images of one batch, in the order the connector saw them."""

    sample_index: list[int]  # [num_images] which sample of the batch each image belongs to
    grids: list[tuple[int, int] | None]  # patch grid (rows, cols) per image; None when unknown
    paths: list[str] = field(default_factory=list)  # image file per image, for patch maps


class RoutingCollector:
    """Adds up expert counts, modality counts, top-1 paths and connector patch maps.

    `layers` fixes the order of layers in the plots; `max_path_tokens` caps the stored top-1 paths
    (the first tokens seen are kept); `max_patch_maps` caps the stored per-image patch maps.

    Example:
        >>> layer = LayerInfo("lm.layers.0.mlp", "lm", num_experts=2, top_k=1)
        >>> collector = RoutingCollector([layer])
        >>> indices = torch.tensor([[0], [1], [1]])
        >>> routing = Routing(indices, torch.ones(3, 1), torch.rand(3, 2), torch.zeros(3, 2))
        >>> collector.add({layer.name: routing}, input_ids=torch.tensor([[5, 9, 9]]), image_token_id=9)
        >>> stats = collector.stats()
        >>> stats.load[layer.name].tolist(), stats.modality_load[layer.name].tolist()
        ([1, 2], [[1, 0], [0, 2]])
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        max_path_tokens: int = 20_000,
        max_patch_maps: int = 4,
        expert_names: Mapping[str, list[str]] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.max_path_tokens = max_path_tokens
        self.max_patch_maps = max_patch_maps
        self.expert_names = dict(expert_names or {})
        self.load = {info.name: np.zeros(info.num_experts, np.int64) for info in self.layers}
        self.modality_load = {info.name: np.zeros((2, info.num_experts), np.int64) for info in self.layers}
        self.group_load: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        self.path_layers = [info.name for info in self.layers if info.kind == "lm"]
        self._paths: list[np.ndarray] = []
        self._path_is_image: list[np.ndarray] = []
        self._num_path_tokens = 0
        self.patch_maps: list[PatchMap] = []
        self.num_samples = 0
        self.num_tokens = 0

    def add(
        self,
        records: Mapping[str, Routing],
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_token_id: int | None = None,
        tags: Sequence[Mapping[str, str]] | None = None,
        images: BatchImages | None = None,
        sample_ids: Sequence[str] | None = None,
    ) -> None:
        """Add one forward pass. `input_ids`/`attention_mask` # [B, S]; `tags[b]` e.g. {"domain": "chart"}."""
        batch = 0 if input_ids is None else input_ids.shape[0]
        tags = list(tags) if tags is not None else [{} for _ in range(batch)]
        self.num_samples += batch
        if input_ids is not None:
            real = (
                torch.ones_like(input_ids, dtype=torch.bool)
                if attention_mask is None
                else attention_mask.bool()
            )
            self.num_tokens += int(real.sum())
        tops: dict[str, Tensor] = {}
        for info in self.layers:
            routing = records.get(info.name)
            if routing is None:  # e.g. the connector in a text-only batch
                continue
            if info.kind == "connector":
                self._add_connector(info, routing, tags, images, sample_ids)
            else:
                if input_ids is None:
                    raise ValueError(f"layer {info.name} routes LM tokens: pass the batch's input_ids")
                tops[info.name] = self._add_lm(info, routing, input_ids, attention_mask, image_token_id, tags)
        if input_ids is not None and self.path_layers and all(name in tops for name in self.path_layers):
            self._add_paths(tops, input_ids, attention_mask, image_token_id)

    def stats(self, meta: Mapping[str, Any] | None = None) -> RoutingStats:
        """Everything added so far, with `meta` (model, data, settings) attached."""
        num_path_layers = len(self.path_layers)
        paths = np.concatenate(self._paths) if self._paths else np.zeros((0, num_path_layers), np.int16)
        is_image = np.concatenate(self._path_is_image) if self._path_is_image else np.zeros(0, bool)
        return RoutingStats(
            layers=list(self.layers),
            load={name: counts.copy() for name, counts in self.load.items()},
            group_load={
                kind: {value: {n: c.copy() for n, c in layers.items()} for value, layers in groups.items()}
                for kind, groups in self.group_load.items()
            },
            modality_load={name: counts.copy() for name, counts in self.modality_load.items()},
            path_layers=list(self.path_layers) if len(paths) else [],
            paths=paths if len(paths) else np.zeros((0, 0), np.int16),
            path_is_image=is_image,
            patch_maps=list(self.patch_maps),
            expert_names=dict(self.expert_names),
            meta={**dict(meta or {}), "num_samples": self.num_samples, "num_tokens": self.num_tokens},
        )

    def _slots(self, info: LayerInfo, routing: Routing) -> tuple[Tensor, Tensor]:
        """(expert index, computed?) of every slot. # [T, K] each"""
        indices = routing.expert_indices.detach().cpu().long()
        kept = torch.ones_like(indices, dtype=torch.bool) if routing.kept is None else routing.kept.cpu()
        return indices, kept

    def _count(self, indices: Tensor, num_experts: int) -> np.ndarray:
        return torch.bincount(indices.reshape(-1), minlength=num_experts).numpy().astype(np.int64)

    def _add_group(self, info: LayerInfo, sample_tags: Mapping[str, str], counts: np.ndarray) -> None:
        for kind, value in sample_tags.items():
            if value is None or value == "":
                continue
            layers = self.group_load.setdefault(kind, {}).setdefault(str(value), {})
            layers.setdefault(info.name, np.zeros(info.num_experts, np.int64))
            layers[info.name] += counts

    def _add_lm(
        self,
        info: LayerInfo,
        routing: Routing,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_token_id: int | None,
        tags: Sequence[Mapping[str, str]],
    ) -> Tensor:
        batch, seq = input_ids.shape
        indices, kept = self._slots(info, routing)
        if indices.shape[0] != batch * seq:
            raise ValueError(
                f"layer {info.name}: its routing covers {indices.shape[0]} tokens but the batch has "
                f"{batch} x {seq}; record one full forward pass (no KV cache) per add()"
            )
        real = (
            torch.ones(batch, seq, dtype=torch.bool)
            if attention_mask is None
            else attention_mask.cpu().bool()
        )
        is_image = (
            torch.zeros(batch, seq, dtype=torch.bool)
            if image_token_id is None
            else input_ids.cpu() == image_token_id
        )
        slot_ok = kept & real.reshape(-1, 1)  # [T, K]
        slot_image = is_image.reshape(-1, 1).expand_as(indices)
        self.load[info.name] += self._count(indices[slot_ok], info.num_experts)
        self.modality_load[info.name][TEXT] += self._count(indices[slot_ok & ~slot_image], info.num_experts)
        self.modality_load[info.name][IMAGE] += self._count(indices[slot_ok & slot_image], info.num_experts)
        per_sample_ok = slot_ok.view(batch, seq, -1)
        per_sample_indices = indices.view(batch, seq, -1)
        for b in range(batch):
            self._add_group(
                info, tags[b], self._count(per_sample_indices[b][per_sample_ok[b]], info.num_experts)
            )
        return indices[:, 0].view(batch, seq)

    def _add_connector(
        self,
        info: LayerInfo,
        routing: Routing,
        tags: Sequence[Mapping[str, str]],
        images: BatchImages | None,
        sample_ids: Sequence[str] | None,
    ) -> None:
        indices, kept = self._slots(info, routing)
        counts = self._count(indices[kept], info.num_experts)
        self.load[info.name] += counts
        self.modality_load[info.name][IMAGE] += counts  # every connector token is an image patch
        sizes = _patches_per_image(indices.shape[0], images)
        if sizes is None:
            return  # cannot tell which patch belongs to which image: overall counts only
        start = 0
        for image_index, size in enumerate(sizes):
            rows = slice(start, start + size)
            start += size
            owner = images.sample_index[image_index]
            if owner < len(tags):
                self._add_group(info, tags[owner], self._count(indices[rows][kept[rows]], info.num_experts))
            grid = images.grids[image_index]  # known: the sizes came from the grids
            if len(self.patch_maps) < self.max_patch_maps:
                self.patch_maps.append(
                    PatchMap(
                        sample_id=str(sample_ids[owner]) if sample_ids is not None else str(owner),
                        image=images.paths[image_index] if image_index < len(images.paths) else "",
                        grid=(int(grid[0]), int(grid[1])),
                        top1=indices[rows, 0].tolist(),
                    )
                )

    def _add_paths(
        self,
        tops: Mapping[str, Tensor],
        input_ids: Tensor,
        attention_mask: Tensor | None,
        image_token_id: int | None,
    ) -> None:
        room = self.max_path_tokens - self._num_path_tokens
        if room <= 0:
            return
        real = (
            torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        )
        real = real.cpu().reshape(-1)
        stacked = torch.stack([tops[name].reshape(-1) for name in self.path_layers], dim=1)  # [T, P]
        paths = stacked[real][:room].numpy().astype(np.int16)
        is_image = (
            np.zeros(len(paths), bool)
            if image_token_id is None
            else (input_ids.cpu().reshape(-1) == image_token_id)[real][:room].numpy()
        )
        self._paths.append(paths)
        self._path_is_image.append(is_image)
        self._num_path_tokens += len(paths)


def _patches_per_image(num_rows: int, images: BatchImages | None) -> list[int] | None:
    """How many connector rows each image has, from the grids; None when any is unknown.

    No guessing (e.g. an even split): tiled images (LLaVA-NeXT, Idefics3) have different row
    counts, and a wrong split would credit one sample's patches to another.
    """
    if images is None or not images.sample_index or any(grid is None for grid in images.grids):
        return None
    sizes = [int(rows * cols) for rows, cols in images.grids]
    return sizes if sum(sizes) == num_rows else None
