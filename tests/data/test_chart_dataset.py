"""Sharded chart generation: deterministic per seed, resumable, same output with workers."""

from __future__ import annotations

import gc
import json

import pytest
from typer.testing import CliRunner

from vlmoe.cli import app
from vlmoe.data.chart_conversations import CHART_TASKS
from vlmoe.data.chart_dataset import YOUNG_GC_THRESHOLD, ChartSetConfig, generate_chart_set

CONFIG = ChartSetConfig(n=7, seed=3, size_px=96, shard_size=4)


def _snapshot(out) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_same_seed_gives_byte_identical_output_with_or_without_workers(tmp_path):
    generate_chart_set(tmp_path / "a", CONFIG, workers=1)
    generate_chart_set(tmp_path / "b", CONFIG, workers=2)
    # The generator froze the collector's old objects and raised its threshold: both undone.
    assert gc.get_freeze_count() == 0 and gc.get_threshold()[0] != YOUNG_GC_THRESHOLD
    a, b = _snapshot(tmp_path / "a"), _snapshot(tmp_path / "b")
    assert a == b
    assert sum(name.endswith(".png") for name in a) == 7
    assert sorted(n for n in a if n.endswith("done.json")) == [
        "shard_00000/done.json",
        "shard_00001/done.json",
    ]


def test_other_seed_gives_other_data(tmp_path):
    generate_chart_set(tmp_path / "a", CONFIG)
    generate_chart_set(tmp_path / "b", ChartSetConfig(n=7, seed=4, size_px=96, shard_size=4))
    first = (tmp_path / "a/shard_00000/records.jsonl").read_text()
    assert first != (tmp_path / "b/shard_00000/records.jsonl").read_text()


def test_rerun_skips_done_shards_and_completes_a_partial_one(tmp_path):
    out = tmp_path / "charts"
    generate_chart_set(out, CONFIG)
    reference = _snapshot(out)
    # Simulate a run killed in the middle of shard 1: two images drawn, no JSONL, no done.json.
    for name in ("records.jsonl", "conversations.jsonl", "done.json", "images/00000006.png"):
        (out / "shard_00001" / name).unlink()
    done_png = out / "shard_00000/images/00000000.png"
    done_png.write_bytes(b"kept")  # a complete shard is not touched again
    progress = []
    generate_chart_set(out, CONFIG, on_progress=progress.append)
    assert sum(progress) == 7
    after = _snapshot(out)
    assert after.pop("shard_00000/images/00000000.png") == b"kept"
    reference.pop("shard_00000/images/00000000.png")
    assert after == reference


def test_resuming_with_another_seed_is_refused(tmp_path):
    generate_chart_set(tmp_path, CONFIG)
    with pytest.raises(ValueError, match="seed is 3 but this run asks for 9"):
        generate_chart_set(tmp_path, ChartSetConfig(n=7, seed=9, size_px=96, shard_size=4))


def test_conversations_are_llava_samples_tagged_by_task(tmp_path):
    generate_chart_set(tmp_path, CONFIG)
    samples = [
        json.loads(line) for line in (tmp_path / "shard_00000/conversations.jsonl").read_text().splitlines()
    ]
    assert {s["task"] for s in samples} == set(CHART_TASKS)
    for sample in samples:
        assert (tmp_path / "shard_00000" / sample["image"]).is_file()
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
    records = [json.loads(line) for line in (tmp_path / "shard_00000/records.jsonl").read_text().splitlines()]
    assert [r["image"] for r in records] == [f"images/{i:08d}.png" for i in range(4)]


def test_cli_writes_charts_and_reports_speed(tmp_path):
    result = CliRunner().invoke(
        app, ["data", "charts", "--n", "3", "--out", str(tmp_path), "--seed", "1", "--size", "96"]
    )
    assert result.exit_code == 0, result.output
    assert "3 charts in 1 shard(s)" in result.output
    assert len(list((tmp_path / "shard_00000/images").iterdir())) == 3
