"""experiments/chartmoe at smoke scale: every arm trains and is scored; the tables and pictures exist."""

from __future__ import annotations

import math

from PIL import Image

import vlmoe
from experiments import common
from experiments.chartmoe import run
from tests.experiments.smoke import assert_every_arm_finite, smoke_summary


def test_chartmoe_smoke_run_writes_finite_scores_tables_and_pictures(shared_work, tmp_path):
    results = tmp_path / "results"
    summary = smoke_summary(run, shared_work, results)
    assert summary["scale"] == "smoke"
    assert_every_arm_finite(run, summary)
    for metrics in summary["arms"].values():
        for name in ("relaxed_accuracy", "table_cell_accuracy", "table_exact_match"):
            assert 0.0 <= metrics[name][0] <= 1.0
    runs = {r["arm"]: r for r in summary["runs"]}
    # Upcycled experts (and zero-init LoRA) start exactly at the dense model's function.
    assert math.isclose(runs["upcycle"]["initial_loss"], runs["upcycle"]["base_loss"], rel_tol=1e-4)
    assert not math.isclose(runs["random"]["initial_loss"], runs["random"]["base_loss"], rel_tol=1e-4)
    for arm in run.ARMS:  # every patch of every analysed chart is in exactly one region
        shares = runs[arm]["region_shares"]
        assert all(math.isclose(sum(v), 1.0, abs_tol=1e-3) or sum(v) == 0 for v in shares.values())
        assert math.isclose(sum(runs[arm]["expert_load"]), 1.0, abs_tol=1e-3)
    table = (results / "results.md").read_text()
    assert "| aligned+balance |" in table and "chart QA relaxed acc." in table
    assert "not results" in table  # smoke numbers are labelled as such
    for picture in ("sft_loss.png", "scores.png", "routing/aligned/patch_map_0.png"):
        with Image.open(results / picture) as image:
            assert image.width > 100

    # The general model's projector is a fresh one (trained on chart type and QA), not the
    # pre-trained projector: aligned experts then have something to add over it. Two smoke steps
    # of Adam at lr 1e-3 move a weight by at most ~0.002; a re-initialisation moves it far more.
    name = "model.multi_modal_projector.linear_1.weight"
    pretrained = vlmoe.load(common.pretrained_model(shared_work)).state_dict()[name]
    general = vlmoe.load(run.general_model(shared_work, 0)).state_dict()[name]
    assert (general - pretrained).abs().max() > 0.05
