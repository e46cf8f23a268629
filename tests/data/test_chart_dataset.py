"""Sharded chart generation: deterministic per seed, resumable, same output with workers."""

from __future__ import annotations

import gc
import json
import re

import pytest
from typer.testing import CliRunner

from vlmoe.cli import app
from vlmoe.data.chart_conversations import CHART_TASKS
from vlmoe.data.chart_dataset import YOUNG_GC_THRESHOLD, ChartSetConfig, generate_chart_set

CONFIG = ChartSetConfig(n=7, seed=3, size_px=96, shard_size=4)


def _message(result) -> str:
    return " ".join(result.output.replace("│", " ").split())  # undo rich's boxed line wrapping


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


@pytest.mark.parametrize(
    ("config", "workers", "message"),
    [
        (ChartSetConfig(n=0), 1, "--n must be at least 1, got 0"),
        (ChartSetConfig(n=3, size_px=0), 1, "--size must be between 64 and 4096, got 0"),
        (ChartSetConfig(n=3, size_px=5000), 1, "--size must be between 64 and 4096, got 5000"),
        (ChartSetConfig(n=3, shard_size=0), 1, "--shard-size must be at least 1, got 0"),
        (ChartSetConfig(n=3, seed=-1), 1, "--seed must be at least 0, got -1"),
        (ChartSetConfig(n=3, seed=1.5), 1, r"--seed must be a whole number at least 0, got 1.5 \(float\)"),
        (ChartSetConfig(n="3"), 1, r"--n must be a whole number at least 1, got '3' \(str\)"),
        (ChartSetConfig(n=3, questions_per_chart=-1), 1, "questions_per_chart must be at least 0"),
        (ChartSetConfig(n=3), 0, "--workers must be at least 1, got 0"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, config, workers, message):
    out = tmp_path / "charts"
    with pytest.raises(ValueError, match=message):
        generate_chart_set(out, config, workers=workers)
    assert not out.exists()  # no manifest of the bad setting, so a corrected run can use this --out


def test_cli_refuses_a_bad_option_before_the_progress_bar_and_the_corrected_run_works(tmp_path):
    out = tmp_path / "charts"
    for option, message in (("--size", "--size must be between 64 and 4096, got 0"), ("--n", "--n must be")):
        args = ["data", "charts", "--n", "3", "--out", str(out), "--size", "96", option, "0"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and message in _message(result)
        assert "0/" not in result.output and not out.exists()  # no bar started, nothing written
    result = CliRunner().invoke(app, ["data", "charts", "--n", "3", "--out", str(out), "--size", "96"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["size_px"] == 96


def test_out_that_is_a_file_is_refused_with_the_fix(tmp_path):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(ValueError, match=r"--out .*notes.txt is a file; pass a folder"):
        generate_chart_set(tmp_path / "notes.txt", CONFIG)
    with pytest.raises(ValueError, match=r"--out .*notes.txt/charts is inside .*notes.txt, which is a file"):
        generate_chart_set(tmp_path / "notes.txt" / "charts", CONFIG)
    result = CliRunner().invoke(app, ["data", "charts", "--n", "3", "--out", str(tmp_path / "notes.txt")])
    assert result.exit_code == 2 and "is a file; pass a folder" in _message(result)


def test_cli_reports_an_os_error_on_out_in_one_line_with_exit_code_1(tmp_path):
    out = tmp_path / ("x" * 300)  # a name longer than any file system allows: fails for root too
    result = CliRunner().invoke(app, ["data", "charts", "--n", "3", "--out", str(out)])
    # exit code 1 alone would not tell: CliRunner gives 1 for an uncaught exception as well
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.stderr == f"vlmoe data charts: File name too long ({out})\n"


def test_a_smaller_n_is_refused_and_leaves_the_set_whole_a_larger_one_extends_it(tmp_path):
    out = tmp_path / "charts"
    generate_chart_set(out, CONFIG)  # 7 charts, shards of 4
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"holds 7 charts but this run asks for --n 5.*Pass --n 7 or more"):
        generate_chart_set(out, ChartSetConfig(n=5, seed=3, size_px=96, shard_size=4))
    assert _snapshot(out) == before
    # An interrupted run counts the images it drew: chart 6 exists, so --n 6 would orphan it.
    (out / "shard_00001/done.json").unlink()
    with pytest.raises(ValueError, match="holds 7 charts"):
        generate_chart_set(out, ChartSetConfig(n=6, seed=3, size_px=96, shard_size=4))
    generate_chart_set(out, ChartSetConfig(n=9, seed=3, size_px=96, shard_size=4))
    for shard, count in (("shard_00000", 4), ("shard_00001", 4), ("shard_00002", 1)):
        records = (out / shard / "records.jsonl").read_text().splitlines()
        assert len(records) == count == len(list((out / shard / "images").iterdir()))
        assert json.loads((out / shard / "done.json").read_text())["count"] == count


def _disk_full_at(monkeypatch, name: str) -> None:
    """Make writing the file `name` fail as a full disk does."""
    from vlmoe.data import chart_dataset

    write = chart_dataset._atomic_write

    def failing(path, data):
        if path.name == name:
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(chart_dataset, "_atomic_write", failing)


def test_an_extension_cut_short_leaves_the_grown_shard_unfinished_and_a_rerun_completes_it(
    tmp_path, monkeypatch
):
    from vlmoe.data.chart_dataset import chart_set_shards

    out = tmp_path / "charts"
    generate_chart_set(out, ChartSetConfig(n=5, seed=3, size_px=96, shard_size=4))  # shard 1 holds 1 chart
    bigger = ChartSetConfig(n=8, seed=3, size_px=96, shard_size=4)
    with monkeypatch.context() as patch:
        _disk_full_at(patch, "conversations.jsonl")  # shard 1's records.jsonl now has 4 charts, not 1
        with pytest.raises(OSError, match="No space left"):
            generate_chart_set(out, bigger)
    # shard 1's done.json of the 1-chart shard must not make the half-written 4-chart one read as done
    with pytest.raises(ValueError, match="shard_00001 is unfinished"):
        chart_set_shards(out)
    generate_chart_set(out, bigger)
    generate_chart_set(tmp_path / "fresh", bigger)
    assert _snapshot(out) == _snapshot(tmp_path / "fresh")
    records = [line for shard in chart_set_shards(out) for line in (shard / "records.jsonl").open()]
    assert [json.loads(line)["id"] for line in records] == [f"chart-3-{i:08d}" for i in range(8)]


@pytest.mark.parametrize("damaged", ["{", "[4]", "\udcff"])
def test_a_damaged_done_json_is_redrawn_not_a_crash(tmp_path, damaged):
    out = tmp_path / "charts"
    generate_chart_set(out, CONFIG)
    reference = _snapshot(out)
    (out / "shard_00001/records.jsonl").unlink()
    (out / "shard_00001/done.json").write_bytes(damaged.encode(errors="surrogateescape"))
    generate_chart_set(out, CONFIG)
    assert _snapshot(out) == reference


def test_extending_a_set_with_another_number_of_questions_is_refused(tmp_path):
    out = tmp_path / "charts"
    generate_chart_set(out, ChartSetConfig(n=2, seed=3, size_px=96, questions_per_chart=2))
    before = _snapshot(out)
    with pytest.raises(
        ValueError, match="questions_per_chart is 2 but this run asks for 4; resume with the same"
    ):
        generate_chart_set(out, ChartSetConfig(n=3, seed=3, size_px=96))  # chart 2 would have 4 questions
    assert _snapshot(out) == before
    generate_chart_set(out, ChartSetConfig(n=3, seed=3, size_px=96, questions_per_chart=2))
    records = [json.loads(line) for line in (out / "shard_00000/records.jsonl").read_text().splitlines()]
    assert [len(r["qa"]) for r in records] == [2, 2, 2]
    # a manifest written before questions_per_chart was recorded still resumes
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["questions_per_chart"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    generate_chart_set(out, ChartSetConfig(n=3, seed=3, size_px=96, questions_per_chart=2))


def _whole_set(out) -> tuple[list[str], list[str], dict[str, bytes]]:
    """Records and conversations in chart order, and every image by name, whatever the shards."""
    from vlmoe.data.chart_dataset import chart_set_shards

    shards = chart_set_shards(out)
    records = [line for s in shards for line in (s / "records.jsonl").read_text().splitlines()]
    conversations = [line for s in shards for line in (s / "conversations.jsonl").read_text().splitlines()]
    images = {p.name: p.read_bytes() for s in shards for p in sorted((s / "images").iterdir())}
    return records, conversations, images


def test_the_same_seed_gives_the_same_charts_whatever_the_shard_size(tmp_path):
    sets = [
        _whole_set(
            generate_chart_set(
                tmp_path / str(size), ChartSetConfig(n=7, seed=3, size_px=96, shard_size=size)
            )[0].parent
        )
        for size in (1, 3, 7, 100)
    ]
    assert all(s == sets[0] for s in sets[1:])
    records, _, images = sets[0]
    assert [json.loads(r)["id"] for r in records] == [f"chart-3-{i:08d}" for i in range(7)]
    assert sorted(images) == [f"{i:08d}.png" for i in range(7)]


@pytest.mark.parametrize("size", [64, 4096])
def test_one_chart_at_the_size_limits(tmp_path, size):
    from PIL import Image

    (shard,) = generate_chart_set(tmp_path, ChartSetConfig(n=1, seed=0, size_px=size))
    assert Image.open(shard / "images/00000000.png").size == (size, size)
    (record,) = [json.loads(line) for line in (shard / "records.jsonl").read_text().splitlines()]
    assert record["id"] == "chart-0-00000000"
    inches, dpi = re.search(r"figsize=\(([\d.]+), [\d.]+\), dpi=(\d+)", record["code"]).groups()
    assert round(float(inches) * int(dpi)) == size  # the plotting code draws the same size
    assert json.loads((shard / "done.json").read_text()) == {"count": 1, "first": 0}


def test_a_disk_full_while_drawing_leaves_no_half_image_that_counts_and_a_rerun_completes(
    tmp_path, monkeypatch
):
    from pathlib import Path

    from vlmoe.data.chart_dataset import chart_set_shards, charts_held

    write_bytes = Path.write_bytes

    def half_then_full(path, data):
        if path.name == "00000005.png.tmp":
            write_bytes(path, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        return write_bytes(path, data)

    out = tmp_path / "charts"
    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_bytes", half_then_full)
        with pytest.raises(OSError, match="No space left"):
            generate_chart_set(out, CONFIG)
    assert not (out / "shard_00001/images/00000005.png").exists() and charts_held(out) == 5
    with pytest.raises(ValueError, match="shard_00001 is unfinished"):
        chart_set_shards(out)
    generate_chart_set(out, CONFIG)
    generate_chart_set(tmp_path / "fresh", CONFIG)
    assert _snapshot(out) == _snapshot(tmp_path / "fresh")  # the half-written .tmp is gone too
