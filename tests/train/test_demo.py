"""`vlmoe demo` on a two-step recipe: the report folder and its numbers are complete and consistent."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from vlmoe.demo import run_demo

README = Path(__file__).resolve().parents[2] / "README.md"

RECIPE = {
    "name": "demo-test",
    "base": {"family": "llava"},
    "output_dir": "unused",
    "stages": [
        {
            "name": "sft",
            "surgery": [{"connector": {"init": "upcycle", "num_experts": 4, "top_k": 2}}],
            "data": {
                "sources": [
                    {"name": "chart", "charts": {"n": 10, "held_out": 4, "tasks": ["chart_type", "chart_qa"]}}
                ],
                "max_length": 320,  # chart questions with their image tokens reach ~270
            },
            "trainable": ["connector", "router", "experts"],
            "max_steps": 2,
            "batch_size": 2,
            "report_to": [],
        }
    ],
}


@pytest.mark.slow
def test_demo_writes_metrics_curve_and_predictions(tmp_path, monkeypatch):
    recipe = tmp_path / "demo-test.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    monkeypatch.chdir(tmp_path)  # a relative --out, as `make demo` uses
    metrics = run_demo(out=Path("report"), recipe=str(recipe), scale=None, device="cpu")
    report = tmp_path / "report"
    assert json.loads((report / "metrics.json").read_text()) == metrics
    assert (report / "training_curve.png").stat().st_size > 0
    predictions = [json.loads(line) for line in (report / "predictions.jsonl").read_text().splitlines()]
    heldout = (report / "heldout.jsonl").read_text().splitlines()
    assert len(predictions) == len(heldout) == sum(t["samples"] for t in metrics["tasks"].values())
    chart_type = metrics["tasks"]["chart_type"]
    assert chart_type["samples"] == 4 and chart_type["metric"] == "exact_match"
    assert 0.0 <= chart_type["model"] <= 1.0 and 0.0 <= chart_type["majority_baseline"] <= 1.0
    assert metrics["tasks"]["chart_qa"]["metric"] == "relaxed_accuracy"
    html = (report / "routing" / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3  # expert load, modality split, patch maps
    stats = json.loads((report / "routing" / "routing_stats.json").read_text())
    assert stats  # the routing counts behind the pictures
    assert sorted(path.name for path in report.iterdir()) == _readme_demo_report_entries()


def _readme_demo_report_entries() -> list[str]:
    """The entries of demo-report/ the README's `vlmoe demo` section lists."""
    section = README.read_text().split("### `vlmoe demo`", 1)[1]
    listed = section.split("writes `demo-report/`:", 1)[1].split("(see Output and resume)", 1)[0]
    names = re.findall(r"`([^`]+)`", re.sub(r"\([^)]*\)", "", listed))  # without the parenthesised asides
    return sorted(name.rstrip("/") for name in names)


def test_demo_needs_held_out_charts(tmp_path):
    recipe = tmp_path / "no-heldout.yaml"
    stage = {**RECIPE["stages"][0], "data": {"sources": [{"name": "c", "charts": {"n": 4}}]}}
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": [stage]}))
    with pytest.raises(ValueError, match="held_out > 0"):
        run_demo(out=tmp_path / "report", recipe=str(recipe), scale=None, device="cpu")


@pytest.mark.slow
def test_demo_of_a_mocle_recipe_routes_held_out_charts_by_their_cluster(tmp_path):
    stage = {
        **RECIPE["stages"][0],
        "surgery": [{"mocle": {"num_experts": 2, "rank": 2, "alpha": 4, "num_clusters": 2}}],
        "data": {**RECIPE["stages"][0]["data"], "cluster": {"num_clusters": 2}},
        "trainable": ["router", "lora"],
    }
    recipe = tmp_path / "mocle-test.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": [stage]}))
    metrics = run_demo(out=tmp_path / "report", recipe=str(recipe), scale=None, device="cpu")
    heldout = [json.loads(line) for line in (tmp_path / "report/heldout.jsonl").read_text().splitlines()]
    # Held-out questions of one task share an instruction, so they share the nearest centroid.
    by_task = {(s["task"], s["conversations"][0]["value"]): s["cluster_id"] for s in heldout}
    assert all(0 <= cluster < 2 for cluster in by_task.values())
    assert sum(t["samples"] for t in metrics["tasks"].values()) == len(heldout)
    assert (tmp_path / "report/routing/report.html").is_file()


def test_demo_refuses_a_device_or_out_it_cannot_use_before_training(tmp_path):
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    with pytest.raises(ValueError, match="--device 'gpu': not a torch device"):
        run_demo(out=tmp_path / "report", recipe=str(recipe), scale=None, device="gpu")
    a_file = tmp_path / "report.txt"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="is a file; pass a folder"):
        run_demo(out=a_file, recipe=str(recipe), scale=None, device="cpu")
    assert not (tmp_path / "report").exists()  # nothing trained or written


def test_demo_keeps_a_run_folder_in_out_that_is_not_a_demo_run(tmp_path):
    """Without --resume the demo starts over by deleting <out>/run, which must be its own run."""
    recipe = tmp_path / "demo.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    mine = tmp_path / "project" / "run" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("mine")
    with pytest.raises(ValueError, match=r"run holds other files \(notes\.txt\) and no recipe\.json"):
        run_demo(out=tmp_path / "project", recipe=str(recipe), scale=None, device="cpu")
    assert mine.read_text() == "mine"


@pytest.mark.slow  # the two-step recipe through the command: ~5 s
def test_cli_demo_runs_a_recipe_without_scales_at_its_own_sizes_with_scale_none(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from vlmoe.cli import app

    (tmp_path / "own.yaml").write_text(yaml.safe_dump(RECIPE))  # defines no scales, so no tiny
    monkeypatch.chdir(tmp_path)
    args = ["demo", "--recipe", "own.yaml", "--device", "cpu", "--out", "report"]
    refused = CliRunner().invoke(app, args)
    assert (
        refused.exit_code == 1 and "own.yaml: no scale 'tiny'; the recipe defines no scales" in refused.output
    )
    assert "vlmoe demo: --scale none" in refused.output
    result = CliRunner().invoke(app, [*args, "--scale", "none"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert metrics["scale"] is None and metrics["tasks"]["chart_type"]["samples"] == 4
