"""The telemetry pictures (benchmarks/plot_telemetry.py): which points each plot takes, and the
PNGs themselves, from scripted rows and from the JSON of two real H200 calls (s18-run1's
clocks.py, s20-run1's moe_layer.py --telemetry, kept in their result archives)."""

import json
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from plot_telemetry import clocks_series, correlation, plot_file, plot_rounds  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _clock(mhz, watts):
    return {"samples": 10, "sm_mhz": mhz, "sm_mhz_min": mhz, "power_w": watts, "reason_share": {}}


def test_clocks_series_puts_the_burst_first_then_every_quarter_in_order():
    rows = [
        {"method": "dense", "phase": "burst", "ms": [7.0, 9.0, 8.0], "clocks": _clock(1980, 450)},
        {"method": "layer", "phase": "burst", "ms": [8.0], "clocks": None},  # no NVML samples in it
        *(
            {"method": name, "phase": "sustained", "block": block,
             "quarters": [{"ms": base + block + q / 10, **_clock(1500 - q, 700)} for q in range(4)]}
            for block in range(2)
            for name, base in (("dense", 8.5), ("layer", 9.4))
        ),
    ]  # fmt: skip
    series = clocks_series(rows)
    assert list(series) == ["dense", "layer"]
    assert series["dense"]["ms"] == pytest.approx([8.0, 8.5, 8.6, 8.7, 8.8, 9.5, 9.6, 9.7, 9.8])
    assert series["dense"]["sm_mhz"][:3] == [1980, 1500, 1499]
    assert series["layer"]["sm_mhz"][0] is None and len(series["layer"]["power_w"]) == 9


def test_correlation_is_pearsons_r_and_none_where_undefined():
    assert correlation([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    assert correlation([1.0, 2.0], [2.0, 1.0]) is None
    assert correlation([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def _archived(run: str, name: str, folder: Path) -> Path:
    archive = ROOT / "benchmarks" / "results" / run / "results_json.tgz"
    with tarfile.open(archive) as tar:
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extract(f"./{name}", folder, **safe)
    return folder / name


@pytest.mark.parametrize(
    ("run", "name", "picture"),
    [
        ("h200-2026-12-02/s18-run1", "clocks.json", "clocks.png"),
        ("h200-2026-12-03/s20-run1", "moe_layer.json", "moe_layer_rounds.png"),
    ],
)
def test_real_calls_json_become_pngs_beside_it(tmp_path, run, name, picture):
    written = plot_file(_archived(run, name, tmp_path))
    assert written == tmp_path / picture
    assert written.read_bytes()[:8] == PNG_MAGIC and written.stat().st_size > 20_000


def test_rounds_without_telemetry_name_the_file_and_the_switch(tmp_path):
    path = tmp_path / "moe_layer.json"
    rows = [{"method": "layer", "shape": "(1, 2, 3, 4, 5)", "ms": 1.0, "round_ms": [1.0, 1.1]}]
    path.write_text(json.dumps({"device": "cpu", "torch": "x", "rows": rows}))
    with pytest.raises(ValueError, match=r"moe_layer\.json.*--telemetry"):
        plot_file(path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not a benchmark's JSON"):
        plot_file(tmp_path / "broken.json")


def test_rounds_take_only_rounds_with_clocks(tmp_path):
    rows = [
        {"method": "dense", "shape": [8, 4, 4, 2, 1], "round_ms": [1.0, 1.2, 1.1],
         "round_clocks": [_clock(1500, 700), None, _clock(1450, 690)]},
        {"method": "LoRA", "shape": [8, 4, 4], "round_ms": [2.0]},  # no telemetry: left out
    ]  # fmt: skip
    png = plot_rounds(rows, tmp_path / "r.png")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_a_benchmark_without_matplotlib_says_so_and_goes_on(tmp_path, monkeypatch):
    import builtins

    import plot_telemetry

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    path = _archived("h200-2026-12-02/s18-run1", "clocks.json", tmp_path)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plot_telemetry.picture(path) == (
        "no picture of clocks.json: No module named 'matplotlib' (pip install matplotlib)"
    )
    monkeypatch.undo()
    assert plot_telemetry.picture(path) == f"picture: {tmp_path / 'clocks.png'}"
