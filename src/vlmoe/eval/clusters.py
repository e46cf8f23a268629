"""MoCLE at inference: each new question goes to the instruction cluster of its nearest centroid.

A MoCLE model routes its LoRA experts by the sample's instruction cluster, so generation needs a
cluster id per prompt. Training saved the k-means centroids next to the model (`clusters/` in
each MoCLE stage's `final` folder, or `vlmoe data cluster --out`); here the question text the
model is shown is embedded with the same sentence encoder and assigned to its nearest centroid,
the rule k-means itself used on the training instructions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from vlmoe.data.clustering import (
    CENTROIDS_FILE,
    CLUSTERS_CONFIG_FILE,
    assign_embeddings,
    embed_instructions,
    encoder_for,
)
from vlmoe.data.clustering import load_clusters as read_clusters
from vlmoe.moe import routes_by_cluster, sparse_layers

CLUSTERS_DIR = "clusters"  # where a MoCLE model keeps its centroids, inside the model folder


@dataclass
class ClusterAssigner:
    """Nearest-centroid cluster ids for instruction texts."""

    centroids: np.ndarray  # [K, D]
    encoder: Any  # a SentenceTransformer
    source: Path  # the clusters folder, named in errors and records

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    def assign(self, instructions: Sequence[str]) -> list[int]:
        """One cluster id per instruction (its nearest centroid)."""
        embeddings = embed_instructions(list(instructions), self.encoder)
        return assign_embeddings(embeddings, self.centroids).tolist()


def cluster_assigner(
    model: nn.Module, clusters_dir: str | Path | None, embedding_model: str | Path | None = None
) -> ClusterAssigner | None:
    """The assigner a cluster-routed (MoCLE) model needs; None for every other model.

    `clusters_dir` holds the centroids.safetensors and clusters.json written in training;
    `embedding_model` overrides the sentence encoder clusters.json names.

    Example:
        >>> from vlmoe.models import tiny
        >>> cluster_assigner(tiny("llava")[0], None) is None  # not MoCLE: no cluster ids needed
        True
    """
    if not routes_by_cluster(model):
        return None
    if clusters_dir is None or not (Path(clusters_dir) / CLUSTERS_CONFIG_FILE).is_file():
        where = "no clusters folder was given" if clusters_dir is None else f"{clusters_dir} has none"
        raise FileNotFoundError(
            f"the model routes by instruction cluster (MoCLE), so it needs the centroids it was trained "
            f"with, but {where} ({CLUSTERS_CONFIG_FILE}); pass --clusters DIR (a MoCLE stage saves them in "
            f"its final/{CLUSTERS_DIR}, `vlmoe data cluster --out DIR` writes them)"
        )
    clusters_dir = Path(clusters_dir)
    clusters = read_clusters(clusters_dir)
    expected = {
        layer.router.config.num_clusters
        for _, layer in sparse_layers(model)
        if layer.router.config.input == "cluster"
    }
    # Fewer centroids than the router's table is a trained model too: training fits at most one
    # cluster per distinct instruction, and its ids (and so ours) all index the table.
    if clusters.num_clusters > min(expected):
        raise ValueError(
            f"{clusters_dir} has {clusters.num_clusters} centroids but the model's cluster routers expect "
            f"{sorted(expected)} clusters; pass the clusters folder this model was trained with"
        )
    encoder = encoder_for(clusters, embedding_model)
    # Another encoder's embeddings have no nearest centroid; say so now, not as numpy's matmul error.
    dim, centroid_dim = embed_instructions(["dimension probe"], encoder).shape[1], clusters.centroids.shape[1]
    if dim != centroid_dim:
        used = embedding_model if embedding_model is not None else clusters.embedding_model
        raise ValueError(
            f"{clusters_dir / CENTROIDS_FILE}: its centroids are {centroid_dim}-dim embeddings "
            f"of {clusters.embedding_model!r} but the sentence encoder {str(used)!r} gives {dim}-dim ones; "
            f"pass the --embedding-model the clusters were made with, or leave it out to use the one "
            f"{CLUSTERS_CONFIG_FILE} names"
        )
    return ClusterAssigner(clusters.centroids, encoder, clusters_dir)


def default_clusters_dir(model_dir: str | Path) -> Path | None:
    """`<model_dir>/clusters` when the model folder carries its centroids, else None."""
    candidate = Path(model_dir) / CLUSTERS_DIR
    return candidate if (candidate / CLUSTERS_CONFIG_FILE).is_file() else None
