"""MoCLE at inference: questions are assigned their nearest training centroid and routed by it."""

import json
from pathlib import Path

import pytest
import torch
from benchmark_copies import image, write_json
from PIL import Image
from typer.testing import CliRunner

import vlmoe
from vlmoe.cli import app
from vlmoe.data.clustering import (
    DEFAULT_EMBEDDING_NAME,
    embed_instructions,
    fit_instruction_clusters,
    load_sentence_encoder,
    save_clusters,
)
from vlmoe.eval.clusters import CLUSTERS_DIR, cluster_assigner, default_clusters_dir
from vlmoe.eval.generate import GenerationSettings, chat_prompt, generate_token_ids
from vlmoe.eval.runner import EvalConfig, load_model_for_eval, run_eval
from vlmoe.eval.tasks import read_task
from vlmoe.models import tiny
from vlmoe.moe import MoLELinear, routing_inputs

TABLE = ["Convert the chart into a table.", "Write the chart's data as a table."]
FRENCH = ["Translate this sentence into French.", "Say this in French, please."]


@pytest.fixture(scope="module")
def encoder():
    return load_sentence_encoder()


@pytest.fixture(scope="module")
def mocle_dir(tmp_path_factory, encoder) -> Path:
    """A tiny MoCLE model (2 clusters, experts made to differ) saved with centroids of two topics."""
    torch.manual_seed(0)
    model, processor = tiny("llava")
    vlmoe.add_mole(model, num_experts=2, rank=2, router="cluster", num_clusters=2, universal=True)
    for module in model.modules():
        if isinstance(module, MoLELinear):  # nonzero B: the experts change the function
            for name, parameter in module.named_parameters():
                if "lora_B" in name:
                    parameter.data.normal_(0, 2.0)
            if module.router is not None:  # cluster c -> expert c, so the two clusters differ
                module.router.cluster_embedding.weight.data.zero_().fill_diagonal_(10.0)
                module.router.gate.weight.data.zero_().fill_diagonal_(1.0)
    path = vlmoe.save(model, tmp_path_factory.mktemp("models") / "mocle", processor=processor)
    clusters = fit_instruction_clusters(embed_instructions(TABLE + FRENCH, encoder), num_clusters=2)
    clusters.embedding_model = DEFAULT_EMBEDDING_NAME
    save_clusters(path / CLUSTERS_DIR, clusters)
    return path


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("llava-eval")
    image(root / "c.png")
    texts = ["Turn this chart into a table.", "Translate 'good morning' into French."] * 2
    records = [
        {
            "id": f"q{i}",
            "image": "c.png",
            "conversations": [{"from": "human", "value": f"<image>\n{text}"}, {"from": "gpt", "value": "x"}],
        }
        for i, text in enumerate(texts)
    ]
    return write_json(root / "eval.json", records)


def _training_label(text: str, mocle_dir: Path) -> int:
    """The cluster of the training topic `text` belongs to, from the saved centroids."""
    assigner = cluster_assigner(vlmoe.load(mocle_dir), mocle_dir / CLUSTERS_DIR)
    return assigner.assign([text])[0]


def test_new_questions_go_to_their_topics_cluster(mocle_dir):
    model = vlmoe.load(mocle_dir)
    assigner = cluster_assigner(model, default_clusters_dir(mocle_dir))
    table, french = assigner.assign([TABLE[0], FRENCH[0]])
    assert table != french
    new = assigner.assign(["Turn this chart into a table.", "Translate 'good morning' into French."])
    assert new == [table, french]


def test_run_eval_routes_each_question_by_its_cluster(mocle_dir, questions, tmp_path):
    model, processor = load_model_for_eval(mocle_dir)
    settings = GenerationSettings(max_new_tokens=4, batch_size=4)
    config = EvalConfig(
        task="llava", data=questions, out_dir=tmp_path, clusters=mocle_dir / CLUSTERS_DIR, generation=settings
    )
    run_eval(model, processor, config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    table = _training_label(TABLE[0], mocle_dir)
    french = _training_label(FRENCH[0], mocle_dir)
    assert [r["cluster_id"] for r in records] == [table, french, table, french]

    # The answers are what generation gives with exactly those cluster ids...
    samples = read_task("llava", questions)
    prompts = [chat_prompt(processor, s.question, 1) for s in samples]
    images = [[Image.open(path).convert("RGB") for path in s.images] for s in samples]
    routed = generate_token_ids(model, processor, prompts, images, settings, 0, [table, french] * 2)
    texts = processor.tokenizer.batch_decode(routed, skip_special_tokens=True)
    assert [r["raw_answer"] for r in records] == [t.strip() for t in texts]
    # ... and the cluster matters: the other cluster's experts give other logits.
    inputs = processor(text=prompts[:1], images=images[:1], return_tensors="pt")
    logits = []
    for cluster in (table, french):
        with torch.no_grad(), routing_inputs(model, cluster_ids=torch.tensor([cluster])):
            logits.append(model(**inputs).logits)
    assert (logits[0] - logits[1]).abs().max() > 1e-2


def test_mocle_model_without_centroids_is_a_clear_error(mocle_dir, questions, tmp_path):
    model = vlmoe.load(mocle_dir)
    with pytest.raises(FileNotFoundError, match="--clusters DIR"):
        cluster_assigner(model, None)
    with pytest.raises(FileNotFoundError, match="routes by instruction cluster"):
        cluster_assigner(model, tmp_path)
    three = fit_instruction_clusters(embed_instructions(TABLE + FRENCH, load_sentence_encoder()), 3)
    save_clusters(tmp_path / "three", three)
    with pytest.raises(ValueError, match="has 3 centroids but the model's cluster routers expect \\[2\\]"):
        cluster_assigner(model, tmp_path / "three")


def test_fewer_instructions_than_the_routers_clusters_train_and_evaluate_with_the_same_ids(tmp_path):
    from vlmoe.data.conversations import ConversationSample
    from vlmoe.train.data import with_clusters
    from vlmoe.train.recipe import ClusterConfig

    texts = [TABLE[0], FRENCH[0], "Describe the image in detail."]  # 3 instructions, 4 clusters asked
    samples = [
        ConversationSample(
            str(i), [], [{"role": "user", "content": t}, {"role": "assistant", "content": "x"}]
        )
        for i, t in enumerate(texts * 2)
    ]
    trained = with_clusters(samples, ClusterConfig(num_clusters=4), tmp_path / "clusters")  # k-means, k=3
    model, _ = tiny("llava")
    vlmoe.add_mole(model, num_experts=2, rank=2, router="cluster", num_clusters=4, universal=True)
    assigner = cluster_assigner(model, tmp_path / "clusters")  # 3 centroids index a table of 4
    assert assigner.num_clusters == 3
    assert assigner.assign(texts * 2) == [s.cluster_id for s in trained]
    assert sorted(set(assigner.assign(texts))) == [0, 1, 2]


def test_an_embedding_model_other_than_the_centroids_is_refused_naming_both(mocle_dir, encoder, tmp_path):
    from sentence_transformers import SentenceTransformer, models

    torch.manual_seed(0)
    small = SentenceTransformer(modules=[*encoder, models.Dense(384, 32)], device="cpu")  # 32-dim sentences
    small.save(str(tmp_path / "small"))
    with pytest.raises(ValueError) as error:
        cluster_assigner(vlmoe.load(mocle_dir), mocle_dir / CLUSTERS_DIR, tmp_path / "small")
    assert str(error.value) == (
        f"{mocle_dir / CLUSTERS_DIR / 'centroids.safetensors'}: its centroids are 384-dim embeddings of "
        f"{DEFAULT_EMBEDDING_NAME!r} but the sentence encoder {str(tmp_path / 'small')!r} gives 32-dim ones; "
        "pass the --embedding-model the clusters were made with, or leave it out to use the one "
        "clusters.json names"
    )


def test_dense_and_token_routed_models_need_no_clusters():
    model, _ = tiny("llava")
    vlmoe.add_mole(model, num_experts=2, rank=2)
    assert cluster_assigner(model, None) is None


def test_cli_eval_finds_the_centroids_in_the_model_folder(mocle_dir, questions, tmp_path):
    out = tmp_path / "out"
    arguments = ["eval", str(mocle_dir), "--task", "llava", "--data", str(questions), "--out", str(out)]
    result = CliRunner().invoke(app, [*arguments, "--max-new-tokens", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len({r["cluster_id"] for r in records}) == 2
    run = json.loads((out / "run.json").read_text())
    assert run["clusters"] == str((mocle_dir / CLUSTERS_DIR).resolve())
