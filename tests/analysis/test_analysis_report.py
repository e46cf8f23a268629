"""Every PNG and the HTML report are written, and the HTML embeds each PNG; logs and ablation readers."""

import base64
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from tests.analysis import routing_fixture as fx
from vlmoe.analysis import RoutingCollector, read_ablation, read_log_history, router_series, write_report
from vlmoe.analysis.stats import PatchMap, RoutingStats

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
L0, L1 = fx.L0.name, fx.L1.name


def _log_entries():
    return [
        {"step": 10, "loss": 2.0, f"aux/{L0}/load_balance": 1.3, f"aux/{L1}/load_balance": 1.1},
        {"step": 20, f"aux/{L0}/load_balance": 1.1, f"aux/{L0}/z_loss": 0.02, "learning_rate": 1e-4},
        {"step": 30, f"aux/{L0}/tokens_per_expert": [5, 5, 5, 5], f"aux/{L1}/z_loss": "nan"},
        {"train_runtime": 12.0},  # the trainer's final entry: no router keys, tolerated
    ]


@pytest.fixture
def logs(tmp_path):
    path = tmp_path / "trainer_state.json"
    path.write_text(json.dumps({"global_step": 30, "log_history": _log_entries()}))
    return path


@pytest.fixture
def eval_dir(tmp_path):
    root = tmp_path / "eval"
    runs = [("routed", None, 0.60), ("expert0", 0, 0.55), ("expert3", 3, 0.40)]
    for name, expert, accuracy in runs:
        (root / name).mkdir(parents=True)
        summary = {"task": "chartqa", "force_expert": expert, "metrics": {"relaxed_accuracy": accuracy}}
        (root / name / "summary.json").write_text(json.dumps(summary))
    (root / "broken").mkdir()
    (root / "broken" / "summary.json").write_text("{not json")  # an unfinished run is skipped
    return root


def test_report_writes_every_png_and_embeds_each_in_the_html(tmp_path, logs, eval_dir):
    stats = fx.collector().stats({"model": "hand-built model", "data": "hand-built batch"})
    image = tmp_path / "chart.png"
    Image.new("RGB", (28, 14), "gray").save(image)
    stats.patch_maps[0] = PatchMap("s0", str(image), (1, 2), [3, 1])
    out = tmp_path / "report"
    html_path = write_report(stats, out, logs=logs, eval_dir=eval_dir, title="Routing of a hand-built batch")

    expected = [
        "expert_load.png",
        "expert_load_by_domain.png",
        "expert_load_by_task.png",
        "modality_split.png",
        "top_paths.png",
        "path_pca.png",
        "patch_map_0.png",
        "router_training.png",
    ]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(expected)
    html = html_path.read_text(encoding="utf-8")
    assert html_path == out / "report.html" and html.startswith("<!DOCTYPE html>")
    for name in expected:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert f"data:image/png;base64,{base64.b64encode(data).decode('ascii')}" in html, name
    assert html.count("data:image/png;base64,") == len(expected)
    for text in ("Routing of a hand-built batch", "hand-built model", "hand-built batch", str(logs)):
        assert text in html
    assert "expert 3 (code)" in html and "<b>60.00</b>" in html  # ablation table, best in bold
    assert "Skipped" not in html
    assert (out / "routing_stats.json").is_file() and (out / "routing_paths.npz").is_file()


def test_report_names_what_it_skipped(tmp_path):
    stats = fx.collector().stats()
    stats.patch_maps = []
    html = write_report(stats, tmp_path, eval_dir=tmp_path / "no-such-dir", settings={"seed": 7}).read_text()
    assert "<tr><th>model</th><td>(not recorded)</td></tr>" in html
    assert "<tr><th>seed</th><td>7</td></tr>" in html
    assert "Skipped" in html
    assert "per-patch map: no image" in html
    assert "forced-expert ablation" in html and "no-such-dir" in html


def test_router_series_from_trainer_state(logs):
    series = router_series(read_log_history(logs))
    assert series["load_balance"] == {L0: ([10.0, 20.0], [1.3, 1.1]), L1: ([10.0], [1.1])}
    assert series["z_loss"] == {L0: ([20.0], [0.02])}  # the "nan" string is dropped
    steps, values = series["load_entropy"][L0]  # a tokens-per-expert list becomes its entropy
    assert steps == [30.0] and values == pytest.approx([1.3862943611])


def test_log_history_from_jsonl_tolerates_a_half_written_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"aux/a.b/z_loss": 1.0}\n\n{"step": 5, "aux/a.b/z_loss": 0.5}\n{"step": 6, "aux')
    series = router_series(read_log_history(path))
    assert series == {"z_loss": {"a.b": ([0.0, 5.0], [1.0, 0.5])}}  # no step: the entry's index


def test_log_history_from_a_folder_and_errors(tmp_path, logs):
    checkpoint = tmp_path / "run" / "checkpoint-30"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(logs.read_text())
    assert len(read_log_history(tmp_path / "run")) == 4
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no stage_done.json, trainer_state.json or"):
        read_log_history(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_log_history(tmp_path / "nothing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n{"b": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_log_history(bad)


def test_ablation_table(eval_dir):
    table = read_ablation(eval_dir)
    assert table.columns == ["routed", "expert 0", "expert 3"]
    assert table.rows == {("chartqa", "relaxed_accuracy"): {"routed": 0.6, "expert 0": 0.55, "expert 3": 0.4}}
    html = table.to_html(["general", "table", "JSON", "code"])
    assert "expert 0 (general)" in html and "<td>40.00</td>" in html


def test_ablation_refuses_two_runs_of_one_setting(eval_dir):
    # Before, the later file's number silently replaced the earlier one's in the table.
    other = eval_dir / "other-model" / "routed"
    other.mkdir(parents=True)
    summary = {"task": "chartqa", "force_expert": None, "metrics": {"relaxed_accuracy": 0.1}}
    (other / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError) as error:
        read_ablation(eval_dir)
    assert str(error.value) == (
        f"{other / 'summary.json'} and {eval_dir / 'routed' / 'summary.json'} are both chartqa results of "
        "one setting (routed); a table compares one model's settings: pass the folder of one model's runs "
        "as --eval-dir"
    )


def test_ablation_refuses_settings_scored_on_different_numbers_of_samples(tmp_path):
    # A forced run with --limit 50 beside a routed run over every sample compared two sample sets.
    for name, forced, count in [("routed", None, 200), ("forced-1", 1, 50)]:
        (tmp_path / name).mkdir()
        summary = {"task": "chartqa", "force_expert": forced, "num_samples": count, "metrics": {"acc": 0.5}}
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError) as error:
        read_ablation(tmp_path)
    assert str(error.value) == (
        f"{tmp_path / 'forced-1' / 'summary.json'} scores 50 chartqa samples and "
        f"{tmp_path / 'routed' / 'summary.json'} scores 200; a table compares settings on the same samples: "
        "rerun them with the same --limit (or none)"
    )
    (tmp_path / "forced-1" / "summary.json").write_text(
        json.dumps({"task": "chartqa", "force_expert": 1, "num_samples": 200, "metrics": {"acc": 0.25}})
    )
    assert read_ablation(tmp_path).rows == {("chartqa", "acc"): {"routed": 0.5, "expert 1": 0.25}}


def test_report_of_text_only_data_says_the_connector_saw_no_image(tmp_path):
    # Before, the connector's heatmap row read 0 % for every expert and the skipped patch map
    # blamed LLaVA-NeXT tiles.
    collector = RoutingCollector([fx.CONNECTOR, fx.L1])
    records = {fx.L1.name: fx.records()[fx.L1.name]}
    collector.add(records, input_ids=fx.INPUT_IDS, attention_mask=fx.ATTENTION_MASK, tags=fx.TAGS)
    html = write_report(collector.stats(), tmp_path).read_text()
    skipped = re.findall(r"<li>(.*?)</li>", html)
    assert skipped == [
        "connector: no token was routed through it (no sample had an image); its heatmap row is blank"
    ]


def test_log_history_of_a_vlmoe_train_stage_folder_is_the_whole_stage(tmp_path):
    # vlmoe train writes <stage>/stage_done.json with the full log_history; its checkpoints' HF
    # trainer_state.json stops at the last save. Before, the folder gave the checkpoint's entries
    # (or, with no checkpoint left, "no trainer_state.json").
    entries = _log_entries()
    stage = tmp_path / "runs" / "chart_qa_pot"
    checkpoint = stage / "checkpoints" / "checkpoint-10"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": entries[:1]}))
    os.utime(checkpoint / "trainer_state.json", (1_000, 1_000))
    (stage / "stage_done.json").write_text(json.dumps({"stage": "chart_qa_pot", "log_history": entries}))
    assert read_log_history(stage) == entries
    assert read_log_history(stage.parent) == entries  # the recipe's output folder
    shutil.rmtree(stage / "checkpoints")
    assert read_log_history(stage) == entries
    # A later stage still training: its newest checkpoint is newer than the stage done before it.
    running = tmp_path / "runs" / "sft" / "checkpoints" / "checkpoint-5"
    running.mkdir(parents=True)
    (running / "trainer_state.json").write_text(json.dumps({"log_history": entries[1:2]}))
    os.utime(stage / "stage_done.json", (1_000, 1_000))
    assert read_log_history(tmp_path / "runs") == entries[1:2]


def _interrupted_write(names):
    """A Path.write_text that, for a file whose name holds one of `names`, stops halfway (a kill)."""
    write_text = Path.write_text

    def write(path, text, *args, **kwargs):
        if any(name in path.name for name in names):
            write_text(path, text[: len(text) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return write_text(path, text, *args, **kwargs)

    return write


@pytest.mark.parametrize("name", ["report.html", "routing_stats.json"])
def test_an_interrupted_rerun_leaves_the_earlier_report_whole(tmp_path, monkeypatch, name):
    # Before, report.html and routing_stats.json were written in place: a kill while writing them
    # left half a page, or a JSON that RoutingStats.load_from cannot read.
    out = tmp_path / "analysis"
    stats = fx.collector().stats({"model": "first"})
    before = write_report(stats, out).read_text()
    monkeypatch.setattr(Path, "write_text", _interrupted_write([name]))
    with pytest.raises(KeyboardInterrupt):
        write_report(fx.collector().stats({"model": "second"}), out)
    monkeypatch.undo()
    assert (out / "report.html").read_text() == before
    assert RoutingStats.load_from(out).meta["model"] == (
        "first" if name == "routing_stats.json" else "second"
    )
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_text_from_the_data_is_escaped_in_the_page(tmp_path):
    # A tag's name reached the caption of its section unescaped (RoutingCollector takes any tags).
    collector = RoutingCollector([fx.L1])
    tags = [{"<b>src</b> & co": "<script>alert(1)</script>"}, {"task": "a & b"}]
    records = {fx.L1.name: fx.records()[fx.L1.name]}
    collector.add(records, input_ids=fx.INPUT_IDS, attention_mask=fx.ATTENTION_MASK, tags=tags)
    html = write_report(collector.stats({"model": "<script>m</script>"}), tmp_path).read_text()
    assert "<b>src" not in html and "<script>" not in html
    assert "<h2>Expert load by &lt;b&gt;src&lt;/b&gt; &amp; co</h2>" in html
    assert "As above, for the samples of each &lt;b&gt;src&lt;/b&gt; &amp; co (" in html
    assert "<td>&lt;script&gt;m&lt;/script&gt;</td>" in html


def test_log_history_of_a_binary_file_names_it(tmp_path):
    # HF's TensorBoard events file, passed as the training log: it said only "'utf-8' codec can't
    # decode byte 0x8c in position 9".
    events = tmp_path / "events.out.tfevents.1700000000.host"
    events.write_bytes(b"\x18\x00\x00\x00\x00\x00\x00\x00\xa3\x8c\x7f\xff")
    with pytest.raises(ValueError) as error:
        read_log_history(events)
    assert str(error.value) == (
        f"--logs {events} is not a text file (TensorBoard events are not read); pass a trainer_state.json, "
        "a stage_done.json, a JSONL log or the training run's folder"
    )
