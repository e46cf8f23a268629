"""`vlmoe analyze` end to end on tiny upcycled models, and the docstring examples."""

import doctest
import importlib
import json
import re

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vlmoe
from vlmoe.analysis import AnalysisSample, RoutingStats, collect_routing, read_samples
from vlmoe.analysis.cli import load_model, run_analyze
from vlmoe.cli import app
from vlmoe.data import ChartSetConfig, generate_chart_set

CONNECTOR = "model.multi_modal_projector"
LM_LAYERS = ["model.language_model.layers.0.mlp", "model.language_model.layers.1.mlp"]


def _write_data(root, num_samples=5):
    colors = ["red", "green", "blue"]
    samples = []
    for index in range(num_samples):
        sample = {
            "id": f"s{index}",
            "conversations": [
                {"from": "human", "value": "What is in the chart?"},
                {"from": "gpt", "value": "Bars of three colours." * (1 + index % 2)},
            ],
            "domain": "chart" if index % 2 == 0 else "text",
            "task": "chart_qa" if index < 3 else "chart_to_table",
        }
        if index % 2 == 0:  # samples 0, 2, 4 have an image
            Image.new("RGB", (28, 28), colors[index % 3]).save(root / f"{index}.png")
            sample["image"] = f"{index}.png"
            sample["conversations"][0]["value"] = "<image>\n" + sample["conversations"][0]["value"]
        samples.append(sample)
    path = root / "data.json"
    path.write_text(json.dumps(samples))
    return path


def test_vlmoe_analyze_tiny_llava(tmp_path):
    data = _write_data(tmp_path)
    logs = tmp_path / "log.jsonl"
    logs.write_text(json.dumps({"step": 1, f"aux/{LM_LAYERS[0]}/load_balance": 1.01}) + "\n")
    out = tmp_path / "analysis"
    args = ["analyze", "tiny:llava", "--data", str(data), "--out", str(out), "--max-samples", "4"]
    args += ["--batch-size", "3", "--logs", str(logs), "--device", "cpu"]
    args += ["--expert-names", "general,table,JSON,code"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    html = (out / "report.html").read_text()
    for name in ("expert_load", "expert_load_by_domain", "modality_split", "top_paths", "path_pca"):
        assert (out / f"{name}.png").read_bytes().startswith(b"\x89PNG")
    assert html.count("data:image/png;base64,") == len(list(out.glob("*.png")))
    assert "tiny:llava" in html and str(data) in html and "general" in html

    stats = RoutingStats.load_from(out)
    assert stats.meta["num_samples"] == 4  # --max-samples
    assert [info.name for info in stats.layers] == [CONNECTOR, *LM_LAYERS]
    patches = 2 * 16  # samples 0 and 2 have an image: 4 x 4 patches each
    assert stats.load[CONNECTOR].sum() == patches * 2  # top-2
    assert stats.group_load["domain"]["chart"][CONNECTOR].sum() == patches * 2
    assert "text" not in {
        value for value in stats.group_load["domain"] if CONNECTOR in stats.group_load["domain"][value]
    }
    for layer in LM_LAYERS:
        assert stats.load[layer].sum() == stats.meta["num_tokens"] * 2  # every real token, top-2
        assert stats.modality_load[layer][1].sum() == patches * 2  # image tokens = the patches
    assert stats.paths.shape == (stats.meta["num_tokens"], 2)
    assert stats.path_is_image.sum() == patches
    assert [(m.sample_id, m.grid, len(m.top1)) for m in stats.patch_maps] == [
        ("s0", (4, 4), 16),
        ("s2", (4, 4), 16),
    ]
    assert stats.names_of_experts(CONNECTOR) == ["general", "table", "JSON", "code"]
    assert (out / "patch_map_1.png").is_file() and (out / "router_training.png").is_file()


def test_vlmoe_analyze_reports_bad_input_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["analyze", "tiny:llava", "--data", str(tmp_path / "missing.json"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 1
    assert "vlmoe analyze:" in result.output and "missing.json does not exist" in result.output


def test_a_bad_jsonl_record_is_named_by_its_file_and_line(tmp_path):
    # The blank line makes the bad record's line (4) differ from its index (2).
    good = {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([json.dumps(good), "", json.dumps(good), json.dumps({"id": "b"})]) + "\n")
    expected = rf"analysis data {re.escape(str(path))} line 4: missing field 'conversations'"
    with pytest.raises(ValueError, match=expected):
        read_samples(path)
    (tmp_path / "data.json").write_text(json.dumps([good, {"id": "b"}]))
    with pytest.raises(ValueError, match=r"data\.json record 1: missing field 'conversations'"):
        read_samples(tmp_path / "data.json")


def test_a_chart_set_folder_is_read_shard_by_shard(tmp_path):
    # What `vlmoe data charts --out` writes, analysed as it is: 3 charts in 2 shards.
    charts = tmp_path / "charts"
    shards = generate_chart_set(charts, ChartSetConfig(n=3, size_px=96, shard_size=2, questions_per_chart=1))
    lines = [line for shard in shards for line in (shard / "conversations.jsonl").read_text().splitlines()]
    samples = read_samples(charts)
    assert [sample.id for sample in samples] == [json.loads(line)["id"] for line in lines]
    assert {sample.tags["task"] for sample in samples} == {
        "chart_to_table",
        "chart_to_json",
        "chart_to_code",
        "chart_qa",
        "chart_qa_pot",
    }
    assert all(sample.tags["domain"] == "chart" for sample in samples)
    # Image paths are relative to each shard: chart 2's image is in the second shard.
    last = [sample for sample in samples if sample.id.startswith("chart-0-00000002-")]
    assert last and all(sample.images == (shards[1] / "images" / "00000002.png",) for sample in last)

    with pytest.raises(
        ValueError, match="--image-dir does not apply to the chart set .*leave --image-dir out"
    ):
        read_samples(charts, tmp_path)
    (shards[1] / "done.json").unlink()  # as an interrupted `vlmoe data charts` leaves it
    with pytest.raises(ValueError, match=r"shard_00001 is unfinished .* `vlmoe data charts --out "):
        read_samples(charts)


def test_vlmoe_analyze_takes_a_chart_set_folder(tmp_path):
    charts = tmp_path / "charts"
    generate_chart_set(charts, ChartSetConfig(n=2, size_px=96, questions_per_chart=1))
    out = tmp_path / "analysis"
    args = ["analyze", "tiny:llava", "--data", str(charts), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--max-samples", "6"])
    assert result.exit_code == 0, result.output
    stats = RoutingStats.load_from(out)
    assert stats.meta["num_samples"] == 6
    tasks = {"chart_to_table", "chart_to_json", "chart_to_code", "chart_qa", "chart_qa_pot"}
    assert len(stats.group_load["task"]) > 1 and set(stats.group_load["task"]) <= tasks


def test_cluster_ids_are_read_as_training_reads_them_and_a_bad_one_is_named(tmp_path):
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    path = tmp_path / "data.json"
    path.write_text(
        json.dumps([{"id": i, "cluster_id": c, "conversations": turns} for i, c in [(0, 3.0), (1, "3")]])
    )
    assert [sample.cluster_id for sample in read_samples(path)] == [3, 3]  # was: int('3.0') failed
    assert [sample.tags["cluster_id"] for sample in read_samples(path)] == ["3", "3"]  # one group
    path.write_text(
        json.dumps([{"id": "a", "conversations": turns}, {"cluster_id": "topic-a", "conversations": turns}])
    )
    with pytest.raises(ValueError) as error:  # was: "invalid literal for int() with base 10: 'topic-a'"
        read_samples(path)
    assert str(error.value) == (
        f"analysis data {path} record 1: 'cluster_id' must be an integer cluster number (as vlmoe data "
        "cluster writes), got 'topic-a'; fix it or leave the field out"
    )


def test_cluster_routed_model_sends_each_sample_to_one_expert():
    model, processor = vlmoe.models.tiny("llava")
    vlmoe.add_mole(model, num_experts=4, rank=2, top_k=1, router="cluster", num_clusters=3, universal=True)
    torch.manual_seed(0)
    for _, module in model.named_modules():  # spread the cluster gates so clusters differ
        if hasattr(module, "cluster_embedding") and module.cluster_embedding is not None:
            module.gate.weight.data.normal_(std=3.0)
    samples = [
        AnalysisSample(
            f"s{i}", (), (("user", "Convert the chart."), ("assistant", "| a |")), {"cluster_id": str(i % 3)}
        )
        for i in range(4)
    ]
    stats = collect_routing(model, processor, samples, batch_size=2, progress=False)
    untagged = AnalysisSample("u", (), (("user", "Hi"), ("assistant", "Hello")))
    with pytest.raises(ValueError, match=r"samples \['u'\] have no cluster_id"):
        collect_routing(model, processor, [*samples, untagged], progress=False)
    by_cluster = stats.group_load["cluster_id"]
    assert sorted(by_cluster) == ["0", "1", "2"]
    for layers in by_cluster.values():
        for counts in layers.values():
            assert (counts > 0).sum() == 1  # one instruction cluster, one expert


def test_qwen2_vl_patch_grid_comes_from_image_grid_thw(tmp_path):
    model, processor = vlmoe.models.tiny("qwen2_vl")
    vlmoe.install_moe_connector(model, init="upcycle", num_experts=4, top_k=2)
    Image.new("RGB", (56, 56), "gray").save(tmp_path / "a.png")
    sample = AnalysisSample("q0", (tmp_path / "a.png",), (("user", "What is it?"), ("assistant", "Gray.")))
    stats = collect_routing(model, processor, [sample], progress=False)
    (patch_map,) = stats.patch_maps
    assert patch_map.grid == (2, 2) and len(patch_map.top1) == 4  # 4 x 4 patches, merged 2 x 2
    assert stats.paths.size == 0 and stats.path_layers == []  # no routed LM layer, no paths


@pytest.mark.parametrize("name", ["ablation", "cli", "collect", "logs", "report", "run", "stats"])
def test_analysis_docstring_examples(name):
    module = importlib.import_module(f"vlmoe.analysis.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_tiny_analysis_is_reproducible_for_a_seed(tmp_path):
    data = _write_data(tmp_path, num_samples=3)

    def statistics(name, seed):
        run_analyze("tiny:llava", data=data, out=tmp_path / name, seed=seed, progress=False)
        stats = RoutingStats.load_from(tmp_path / name)
        return (tmp_path / name / "routing_stats.json").read_text(), stats.paths.tolist(), stats.load

    first = statistics("a", seed=0)
    assert statistics("b", seed=0)[:2] == first[:2]  # every count and path: the routers' init is seeded
    other = statistics("c", seed=1)[2]
    assert any(other[layer].tolist() != counts.tolist() for layer, counts in first[2].items())
    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    load_model("tiny:llava")
    assert torch.rand(1) == before  # the caller's random stream is left alone


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--logs", "{tmp}/missing.json"], "--logs {tmp}/missing.json does not exist"),
        (["--eval-dir", "{tmp}/nope"], "--eval-dir {tmp}/nope is not a folder"),
        # Was a line under "Skipped" in a report written after every sample was routed.
        (["--eval-dir", "{tmp}"], "--eval-dir {tmp}: no summary.json with metrics under this folder; pass "),
        (["--expert-names", "a,b"], "--expert-names gives 2 names (a, b) but the connector "),
        (["--max-samples", "-1"], "--max-samples -1: give a number >= 1, or leave it out for all samples"),
        (["--expert-names", "a,,b,c"], "--expert-names 'a,,b,c' has an empty name"),
        (["--out", "{tmp}/data.json"], "--out {tmp}/data.json is a file; pass a folder"),
        (["--data", "{tmp}"], "--data {tmp} is a folder but not a chart set (no manifest.json); pass a "),
        (["--device", "gpu"], "--device 'gpu': not a torch device"),
        (["--device", "cuda:99"], "--device 'cuda:99': "),  # no GPU, or no 100th GPU
        pytest.param(
            ["--device", "cuda"],
            "--device 'cuda': this machine has no usable CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_vlmoe_analyze_refuses_bad_options_in_one_line(tmp_path, args, message):
    data = _write_data(tmp_path, num_samples=1)
    out = tmp_path / "analysis"
    given = ["analyze", "tiny:llava", "--data", str(data), "--out", str(out), "--device", "cpu"]
    result = CliRunner().invoke(app, given + [arg.format(tmp=tmp_path) for arg in args])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("vlmoe analyze: " + message.format(tmp=tmp_path))
    assert len(result.output.splitlines()) == 1 and not out.exists()  # no traceback, no report


def test_vlmoe_analyze_names_itself_for_a_missing_model(tmp_path):
    data = _write_data(tmp_path, num_samples=1)
    args = ["analyze", str(tmp_path / "nope"), "--data", str(data), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "nope is not a local model directory" in result.output and "vlmoe analyze loads" in result.output
    assert "vlmoe eval" not in result.output


def test_expert_names_must_match_each_layer():
    model, processor = vlmoe.models.tiny("llava")
    vlmoe.install_moe_connector(model, init="upcycle", num_experts=4, top_k=2)
    sample = AnalysisSample("s0", (), (("user", "Hi"), ("assistant", "Hello")))
    with pytest.raises(ValueError, match=r"2 names \(a, b\) for 4 experts; give one name per expert"):
        collect_routing(model, processor, [sample], expert_names={CONNECTOR: ["a", "b"]}, progress=False)
    with pytest.raises(ValueError, match="'lm' is not a routed layer; layers: model.multi_modal_projector"):
        collect_routing(model, processor, [sample], expert_names={"lm": ["a"]}, progress=False)


def test_a_record_without_turns_is_named_before_the_model_loads(tmp_path):
    # Before, an empty "conversations" ended in an IndexError deep inside apply_chat_template,
    # after the model was loaded; a string was iterated character by character.
    good = {"id": "a", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "data.json"
    for bad, shown in (([], "[]"), ("hello", '"hello"')):
        path.write_text(json.dumps([good, {"id": "b", "conversations": bad}]))
        with pytest.raises(ValueError) as error:
            read_samples(path)
        assert str(error.value).startswith(
            f"analysis data {path} record 1: 'conversations' is {shown}; it must be a non-empty list of "
            "turns, expected format: "
        )


def test_vlmoe_analyze_of_a_dense_model_names_its_folder(tmp_path):
    # A dense stage's model (MoE-LLaVA's pretraining stage) was told to "load a vlmoe.save
    # directory", which it is, without naming it.
    model, processor = vlmoe.models.tiny("llava")
    vlmoe.save(model, tmp_path / "pretrain" / "final", processor=processor)
    data = _write_data(tmp_path, num_samples=1)
    args = [
        "analyze",
        str(tmp_path / "pretrain" / "final"),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "out"),
    ]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1] == (
        f"vlmoe analyze: {tmp_path / 'pretrain' / 'final'} has no routed sparse layer (MoE FFN, MoLE or MoE "
        "connector): it is a dense model; pass a sparse model's folder (e.g. the final/ of a MoE stage), or "
        "apply vlmoe.upcycle_ffn / add_mole / install_moe_connector and vlmoe.save it"
    )
    assert not (tmp_path / "out").exists()
