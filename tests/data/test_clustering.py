"""MoCLE instruction clustering with the offline all-MiniLM-L6-v2: deterministic, consistent."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from vlmoe.cli import app
from vlmoe.data.clustering import (
    assign_clusters,
    assign_embeddings,
    embed_instructions,
    fit_instruction_clusters,
    load_clusters,
    load_sentence_encoder,
)

INSTRUCTIONS = [
    "Convert the chart into a table.",
    "Extract the data table from this chart.",
    "Write the chart's numbers as a markdown table.",
    "Describe the image in detail.",
    "Give a detailed description of this picture.",
    "What is happening in this photo? Describe it.",
    "Translate this sentence into French.",
    "Translate the following text to German.",
    "How do you say this in Spanish? Translate it.",
    "Write Python code that draws this chart.",
    "Generate the matplotlib code for this plot.",
    "Give the plotting code that reproduces the figure.",
]


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def embeddings(encoder):
    return embed_instructions(INSTRUCTIONS, encoder)


def test_embeddings_are_unit_vectors_of_minilm(embeddings):
    assert embeddings.shape == (12, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


def test_kmeans_is_deterministic_and_groups_tasks(embeddings):
    first = fit_instruction_clusters(embeddings, num_clusters=4, seed=0)
    second = fit_instruction_clusters(embeddings, num_clusters=4, seed=0)
    assert np.array_equal(first.centroids, second.centroids)
    assert np.array_equal(first.labels, second.labels)
    groups = first.labels.reshape(4, 3)  # the instructions come in four tasks of three
    assert all(len(set(g)) == 1 for g in groups.tolist()) and len(set(groups[:, 0])) == 4


def test_assigning_training_texts_gives_the_kmeans_labels(embeddings, encoder):
    clusters = fit_instruction_clusters(embeddings, num_clusters=5, seed=3)
    assert np.array_equal(assign_embeddings(embeddings, clusters.centroids), clusters.labels)
    assert np.array_equal(assign_clusters(INSTRUCTIONS, clusters.centroids, encoder), clusters.labels)
    new = assign_clusters(["Turn this bar chart into a table, please."], clusters.centroids, encoder)
    assert new.tolist() == [clusters.labels[0]]


def test_more_clusters_than_instructions_is_refused_with_the_fix(embeddings):
    with pytest.raises(
        ValueError, match=r"12 instructions \(12 distinct\) cannot make 64 clusters; use --k 12"
    ):
        fit_instruction_clusters(embeddings, num_clusters=64)


def test_cli_writes_cluster_ids_and_centroids_the_model_keeps(tmp_path, embeddings):
    data = tmp_path / "train.jsonl"
    rows = [
        {
            "id": str(i),
            "image": f"{i}.png",
            "conversations": [{"from": "human", "value": f"<image>\n{t}"}, {"from": "gpt", "value": "ok"}],
        }
        for i, t in enumerate(INSTRUCTIONS)
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = CliRunner().invoke(
        app, ["data", "cluster", "--data", str(data), "--k", "4", "--out", str(tmp_path / "c")]
    )
    assert result.exit_code == 0, result.output
    printed = " ".join(result.output.split())
    for name in ("train.clustered.jsonl", "centroids.safetensors", "clusters.json"):  # every file written
        assert str(tmp_path / "c" / name) in printed and (tmp_path / "c" / name).is_file()
    written = [json.loads(line) for line in (tmp_path / "c/train.clustered.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    expected = fit_instruction_clusters(embeddings, num_clusters=4, seed=0)  # <image> is not embedded
    assert [r["cluster_id"] for r in written] == expected.labels.tolist()
    saved = load_clusters(tmp_path / "c")
    assert saved.num_clusters == 4 and saved.embedding_model == "sentence-transformers/all-MiniLM-L6-v2"
    np.testing.assert_array_equal(saved.centroids, expected.centroids)
    too_many = CliRunner().invoke(app, ["data", "cluster", "--data", str(data), "--out", str(tmp_path / "d")])
    message = " ".join(too_many.output.replace("│", " ").split())  # undo rich's boxed line wrapping
    assert too_many.exit_code == 2 and "use --k 12 or fewer" in message


def test_cli_refuses_an_out_that_is_a_file_before_embedding(tmp_path):
    data = tmp_path / "train.jsonl"
    turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "ok"}]
    data.write_text(json.dumps({"id": "0", "conversations": turns}) + "\n")
    result = CliRunner().invoke(app, ["data", "cluster", "--data", str(data), "--k", "1", "--out", str(data)])
    message = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "is a file; pass a folder" in message
    assert data.read_text().count("\n") == 1  # the data file is left as it was


def test_cli_refuses_k_0_before_loading_the_encoder(tmp_path, monkeypatch):
    from vlmoe.data import clustering

    monkeypatch.setattr(clustering, "load_sentence_encoder", lambda model: pytest.fail("encoder loaded"))
    data = tmp_path / "train.jsonl"
    turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "ok"}]
    data.write_text(json.dumps({"id": "0", "conversations": turns}) + "\n")
    result = CliRunner().invoke(
        app, ["data", "cluster", "--data", str(data), "--k", "0", "--out", str(tmp_path / "c")]
    )
    message = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code == 2 and "--k must be at least 1, got 0" in message


def test_cli_names_an_empty_data_file_instead_of_asking_for_k_0(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short path: rich wraps the message at the terminal width
    (tmp_path / "train.jsonl").write_text("")
    result = CliRunner().invoke(app, ["data", "cluster", "--data", "train.jsonl", "--k", "2", "--out", "c"])
    message = " ".join(result.output.replace("│", " ").split())  # undo rich's boxed line wrapping
    assert result.exit_code == 2 and "--data train.jsonl holds no samples" in message
    assert "--k 0" not in message


def test_cli_names_a_bad_sample_with_a_fix_it_offers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a short path: rich wraps the message at the terminal width
    data = tmp_path / "train.jsonl"
    good = {"id": "a", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "ok"}]}
    data.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b", "conversations": []}) + "\n")
    result = CliRunner().invoke(app, ["data", "cluster", "--data", "train.jsonl", "--out", "c"])
    message = " ".join(result.output.replace("│", " ").split())  # undo rich's boxed line wrapping
    assert result.exit_code == 2
    assert "--data: train.jsonl:2: sample 'b'" in message and "fix or remove the sample" in message
    assert "on_error" not in message


def test_cli_reports_an_unreadable_model_folder_in_one_line_with_exit_code_1(tmp_path):
    data = tmp_path / "train.jsonl"
    turns = [{"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "ok"}]
    data.write_text(json.dumps({"id": "0", "conversations": turns}) + "\n")
    model = tmp_path / "model"
    (model / "modules.json").mkdir(parents=True)  # unreadable as a file, for root too
    args = [
        "data",
        "cluster",
        "--data",
        str(data),
        "--k",
        "1",
        "--out",
        str(tmp_path / "c"),
        "--model",
        str(model),
    ]
    result = CliRunner().invoke(app, args)
    # exit code 1 alone would not tell: CliRunner gives 1 for an uncaught exception as well
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"vlmoe data cluster: Is a directory ({model / 'modules.json'})\n"


def test_missing_cluster_files_are_named_with_the_command_that_makes_them(tmp_path):
    from vlmoe.data.clustering import CENTROIDS_FILE, InstructionClusters, save_clusters

    fix = f"make it with `vlmoe data cluster --data <conversations .json or .jsonl> --out {tmp_path}`"
    with pytest.raises(FileNotFoundError) as error:
        load_clusters(tmp_path)
    assert str(error.value) == f"{tmp_path / 'clusters.json'} not found; {fix}"
    clusters = InstructionClusters(np.eye(2, 3, dtype=np.float32), np.zeros(0), "minilm", seed=0)
    save_clusters(tmp_path, clusters)
    (tmp_path / CENTROIDS_FILE).unlink()  # clusters.json alone: the centroids are named too
    with pytest.raises(FileNotFoundError) as error:
        load_clusters(tmp_path)
    assert str(error.value) == f"{tmp_path / CENTROIDS_FILE} not found; {fix}"


def test_damaged_or_mismatched_cluster_files_are_named_with_the_fix(tmp_path):
    from vlmoe.data.clustering import CENTROIDS_FILE, CLUSTERS_CONFIG_FILE, InstructionClusters, save_clusters

    remake = (
        f"make both again with `vlmoe data cluster --data <conversations .json or .jsonl> --out {tmp_path}`"
    )
    save_clusters(
        tmp_path, InstructionClusters(np.eye(3, 4, dtype=np.float32), np.zeros(0), "minilm", seed=0)
    )
    config = (tmp_path / CLUSTERS_CONFIG_FILE).read_text()
    for damaged in ("{", "[]", '{"num_clusters": 3}'):
        (tmp_path / CLUSTERS_CONFIG_FILE).write_text(damaged)
        with pytest.raises(ValueError) as error:
            load_clusters(tmp_path)
        assert str(error.value) == (
            f"{tmp_path / CLUSTERS_CONFIG_FILE} is not a clusters.json (fields embedding_model, "
            f"num_clusters, embedding_dim, seed); {remake}"
        )
    (tmp_path / CLUSTERS_CONFIG_FILE).write_text(config)
    (tmp_path / CENTROIDS_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match=f"{CENTROIDS_FILE} holds no 'centroids' array"):
        load_clusters(tmp_path)
    # centroids of another embedding model (8-dim) beside the clusters.json of a 4-dim one
    other = tmp_path / "other"
    save_clusters(other, InstructionClusters(np.eye(3, 8, dtype=np.float32), np.zeros(0), "other", seed=0))
    (tmp_path / CENTROIDS_FILE).write_bytes((other / CENTROIDS_FILE).read_bytes())
    with pytest.raises(ValueError) as error:
        load_clusters(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / CENTROIDS_FILE}: embedding_dim is 8 but clusters.json says 4; the two files come from "
        f"different runs: {remake}"
    )


def test_centroids_of_another_run_of_the_same_shape_are_refused_by_their_hash(tmp_path):
    from vlmoe.data.clustering import CENTROIDS_FILE, CLUSTERS_CONFIG_FILE, InstructionClusters, save_clusters

    first = InstructionClusters(np.eye(3, 4, dtype=np.float32), np.zeros(0), "minilm", seed=0)
    second = InstructionClusters(np.eye(3, 4, dtype=np.float32)[::-1].copy(), np.zeros(0), "minilm", seed=1)
    save_clusters(tmp_path / "a", first)
    save_clusters(tmp_path / "b", second)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [CENTROIDS_FILE, CLUSTERS_CONFIG_FILE]
    # A kill between the two writes of a second save: its centroids beside the first's clusters.json.
    (tmp_path / "a" / CENTROIDS_FILE).write_bytes((tmp_path / "b" / CENTROIDS_FILE).read_bytes())
    with pytest.raises(ValueError, match=r"is not the centroids file clusters\.json was written with"):
        load_clusters(tmp_path / "a")
    # A clusters.json written before the hash was recorded still loads.
    config = json.loads((tmp_path / "b" / CLUSTERS_CONFIG_FILE).read_text())
    del config["centroids_sha256"]
    (tmp_path / "b" / CLUSTERS_CONFIG_FILE).write_text(json.dumps(config))
    assert np.array_equal(load_clusters(tmp_path / "b").centroids, second.centroids)
