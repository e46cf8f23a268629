"""experiments/moe_tuning at smoke scale: dense and upcycled arms train and are scored."""

from __future__ import annotations

import math

from PIL import Image

from experiments.moe_tuning import run
from tests.experiments.smoke import assert_every_arm_finite, smoke_summary


def test_moe_tuning_smoke_run_writes_finite_scores_tables_and_pictures(shared_work, tmp_path):
    results = tmp_path / "results"
    summary = smoke_summary(run, shared_work, results)
    assert_every_arm_finite(run, summary)
    runs = {r["arm"]: r for r in summary["runs"]}
    # Upcycling keeps the dense function: the same loss before training.
    assert math.isclose(runs["moe"]["initial_loss"], runs["dense"]["initial_loss"], rel_tol=1e-4)
    dense, moe = runs["dense"], runs["moe"]
    assert dense["active_parameters_m"] == dense["total_parameters_m"]
    # top-2 of 4: half of the expert copies are inactive per token, the rest stays active.
    assert dense["total_parameters_m"] < moe["active_parameters_m"] < moe["total_parameters_m"]
    assert "| moe-stage3 |" in (results / "results.md").read_text()
    for picture in (
        "train_loss.png",
        "scores.png",
        "routing/moe/expert_load.png",
        "routing/moe/modality_split.png",
    ):
        with Image.open(results / picture) as image:
            assert image.width > 100
