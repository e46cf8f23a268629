"""`RoutingStats`: what a model's routers did over a dataset, small enough to save and redraw.

Shape legend: L layers, E experts, K top_k, N recorded tokens, P path layers.

Counts are of token-slots (every one of a token's top-k choices that was computed; padding and
capacity-dropped slots excluded). Paths and the PCA use each token's top-1 expert.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vlmoe.atomic import write_atomically

STATS_JSON = "routing_stats.json"
PATHS_NPZ = "routing_paths.npz"
TEXT, IMAGE = 0, 1  # rows of `modality_load`


@dataclass
class LayerInfo:
    """One routed layer: its qualified module name, whether it is the connector, its router size."""

    name: str
    kind: str  # "connector" (every token an image patch) or "lm" (text and image tokens)
    num_experts: int
    top_k: int

    @property
    def label(self) -> str:
        """A short name for plots: "connector", "layer 3", or the module name."""
        if self.kind == "connector":
            return "connector"
        parts = self.name.split(".")
        for i, part in enumerate(parts[:-1]):
            if part == "layers" and parts[i + 1].isdigit():
                return f"layer {parts[i + 1]}"
        return self.name


@dataclass
class PatchMap:
    """The connector's top-1 expert for each patch of one image, in raster order."""

    sample_id: str
    image: str  # path of the input image ("" when unknown: drawn on a blank canvas)
    grid: tuple[int, int]  # (rows, cols) of patches
    top1: list[int]  # [rows * cols]


@dataclass
class RoutingStats:
    """Routing statistics of one model over one dataset; `save`/`load` round-trip them exactly.

    Example:
        >>> stats = RoutingStats(layers=[LayerInfo("model.layers.0.mlp", "lm", 2, 1)])
        >>> stats.load["model.layers.0.mlp"] = np.array([3, 1])
        >>> stats.load_fractions()[0].tolist()
        [0.75, 0.25]
    """

    layers: list[LayerInfo] = field(default_factory=list)
    load: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [E] slots
    group_load: dict[str, dict[str, dict[str, np.ndarray]]] = field(
        default_factory=dict
    )  # kind->value->layer
    modality_load: dict[str, np.ndarray] = field(default_factory=dict)  # layer -> [2, E] (text, image)
    path_layers: list[str] = field(default_factory=list)  # the P LM layers a path runs through
    paths: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int16))  # [N, P] top-1
    path_is_image: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # [N]
    patch_maps: list[PatchMap] = field(default_factory=list)
    expert_names: dict[str, list[str]] = field(default_factory=dict)  # layer -> names (else "expert i")
    meta: dict[str, Any] = field(default_factory=dict)  # model, data, settings, counts

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(f"no routed layer {name!r}; layers: {[info.name for info in self.layers]}")

    def names_of_experts(self, layer: str) -> list[str]:
        count = self.layer(layer).num_experts
        names = self.expert_names.get(layer)
        return list(names) if names and len(names) == count else [f"expert {i}" for i in range(count)]

    @property
    def max_experts(self) -> int:
        return max((info.num_experts for info in self.layers), default=0)

    def load_fractions(self, group: tuple[str, str] | None = None) -> np.ndarray:
        """Share of each layer's token-slots per expert. # [L, max E], NaN where a layer has fewer.

        `group=("domain", "chart")` restricts to the samples tagged so. A layer no token reached
        (the connector in text-only data) is all NaN: it has no shares, which 0 % would claim.
        """
        counts = self.load if group is None else self.group_load.get(group[0], {}).get(group[1], {})
        matrix = np.full((len(self.layers), self.max_experts), np.nan)
        for row, info in enumerate(self.layers):
            layer_counts = np.asarray(counts.get(info.name, np.zeros(info.num_experts)), dtype=float)
            total = layer_counts.sum()
            if total > 0:
                matrix[row, : info.num_experts] = layer_counts / total
        return matrix

    def modality_shares(self, layer: str) -> np.ndarray:
        """Each expert's share of token-slots from text (row 0) and image (row 1) tokens. # [2, E]"""
        counts = np.asarray(self.modality_load[layer], dtype=float)
        totals = counts.sum(axis=0, keepdims=True)
        return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)

    def top_paths(self, n: int = 10) -> list[tuple[tuple[int, ...], int, int, int]]:
        """The n most frequent top-1 paths: (path, count, text count, image count), most frequent first.

        Ties go to the path seen first, so the order is deterministic.
        """
        if self.paths.size == 0:
            return []
        unique, first, inverse, counts = np.unique(
            self.paths, axis=0, return_index=True, return_inverse=True, return_counts=True
        )
        inverse = inverse.reshape(-1)
        image_counts = np.bincount(inverse, weights=self.path_is_image.astype(float), minlength=len(unique))
        order = sorted(range(len(unique)), key=lambda i: (-counts[i], first[i]))[:n]
        return [
            (
                tuple(int(e) for e in unique[i]),
                int(counts[i]),
                int(counts[i] - image_counts[i]),
                int(image_counts[i]),
            )
            for i in order
        ]

    def path_one_hot(self) -> np.ndarray:
        """Each token's path as concatenated one-hot vectors, one block per path layer. # [N, P * E]"""
        num_tokens, num_layers = self.paths.shape
        width = max((self.layer(name).num_experts for name in self.path_layers), default=0)
        one_hot = np.zeros((num_tokens, num_layers * width), dtype=np.float32)
        rows = np.arange(num_tokens)
        for p in range(num_layers):
            one_hot[rows, p * width + self.paths[:, p].astype(np.int64)] = 1.0
        return one_hot

    def path_pca(self, seed: int = 0) -> np.ndarray:
        """2-D PCA of `path_one_hot` (zeros where the paths do not vary). # [N, 2]"""
        one_hot = self.path_one_hot().astype(np.float64)
        projected = np.zeros((len(one_hot), 2))
        if len(one_hot) < 2 or not np.any(one_hot.std(axis=0) > 0):
            return projected
        from sklearn.decomposition import PCA

        components = min(2, len(one_hot), one_hot.shape[1])
        projected[:, :components] = PCA(n_components=components, random_state=seed).fit_transform(one_hot)
        return projected

    def save(self, directory: str | Path) -> Path:
        """Write `routing_stats.json` and `routing_paths.npz` into `directory`; returns the JSON path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = {
            "layers": [asdict(info) for info in self.layers],
            "load": {name: _ints(c) for name, c in self.load.items()},
            "group_load": {
                kind: {
                    value: {name: _ints(c) for name, c in layers.items()} for value, layers in groups.items()
                }
                for kind, groups in self.group_load.items()
            },
            "modality_load": {name: _ints(c) for name, c in self.modality_load.items()},
            "path_layers": self.path_layers,
            "patch_maps": [asdict(patch_map) for patch_map in self.patch_maps],
            "expert_names": self.expert_names,
            "meta": self.meta,
        }
        path = directory / STATS_JSON
        text = json.dumps(data, indent=1, default=str)
        write_atomically(path, lambda temp: temp.write_text(text, encoding="utf-8"))

        def write_paths(temp: Path) -> None:
            with temp.open("wb") as file:  # a file object: np.savez would add ".npz" to a temp name
                np.savez(file, paths=self.paths, path_is_image=self.path_is_image)

        write_atomically(directory / PATHS_NPZ, write_paths)
        return path

    @classmethod
    def load_from(cls, directory: str | Path) -> RoutingStats:
        """Read what `save` wrote, so plots can be redrawn without the model."""
        directory = Path(directory)
        path = directory / STATS_JSON
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist; point at a folder written by RoutingStats.save or vlmoe analyze"
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        arrays = np.load(directory / PATHS_NPZ)
        return cls(
            layers=[LayerInfo(**info) for info in data["layers"]],
            load={name: np.array(c, dtype=np.int64) for name, c in data["load"].items()},
            group_load={
                kind: {
                    value: {name: np.array(c, dtype=np.int64) for name, c in layers.items()}
                    for value, layers in groups.items()
                }
                for kind, groups in data["group_load"].items()
            },
            modality_load={name: np.array(c, dtype=np.int64) for name, c in data["modality_load"].items()},
            path_layers=list(data["path_layers"]),
            paths=arrays["paths"],
            path_is_image=arrays["path_is_image"],
            patch_maps=[
                PatchMap(m["sample_id"], m["image"], tuple(m["grid"]), list(m["top1"]))
                for m in data["patch_maps"]
            ],
            expert_names=data["expert_names"],
            meta=data["meta"],
        )


def expert_load_entropy(tokens_per_expert: Any) -> float:
    """Entropy (nats) of an expert-load distribution; log(E) when balanced, 0 when one expert takes all.

    A trainer can log it per layer as `aux/<layer name>/load_entropy` for `vlmoe analyze --logs`.

    Example:
        >>> round(expert_load_entropy([5, 5, 5, 5]), 4) == round(float(np.log(4)), 4)
        True
        >>> expert_load_entropy([7, 0, 0])
        0.0
    """
    counts = np.asarray(tokens_per_expert, dtype=float).reshape(-1)
    total = counts.sum()
    if total <= 0:
        return 0.0
    shares = counts[counts > 0] / total
    return float(-(shares * np.log(shares)).sum()) + 0.0


def _ints(counts: np.ndarray) -> list:
    return np.asarray(counts).astype(np.int64).tolist()
