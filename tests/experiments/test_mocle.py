"""experiments/mocle at smoke scale: shipped style clusters; every arm on seen and unseen phrasing."""

from __future__ import annotations

from PIL import Image

from experiments.evaluation import read_split
from experiments.mocle import run
from experiments.mocle.styles import HELD_OUT, TRAIN, style_clusters
from tests.experiments.smoke import assert_every_arm_finite, smoke_summary


def test_shipped_clusters_cover_every_style_and_held_out_styles_are_never_trained(tmp_path):
    clusters = style_clusters(tmp_path)  # the file in experiments/mocle/clusters, no encoder needed
    assert set(clusters) == {s for pool in (TRAIN, HELD_OUT) for styles in pool.values() for s in styles}
    assert all(0 <= c < run.NUM_CLUSTERS for c in clusters.values())
    for task, styles in HELD_OUT.items():
        assert not set(styles) & set(TRAIN[task])


def test_mocle_smoke_run_scores_seen_and_unseen_phrasings(shared_work, tmp_path):
    results = tmp_path / "results"
    summary = smoke_summary(run, shared_work, results)
    assert_every_arm_finite(run, summary)
    clusters = style_clusters(tmp_path)
    for sample in read_split(run.data_file(shared_work, "heldout_unseen_chart_qa")):
        style = sample.messages[0]["content"].split("\n")[-1]
        assert style in HELD_OUT["chart_qa"] and sample.cluster_id == clusters[style]
    assert "| mocle+universal |" in (results / "results.md").read_text()
    for picture in ("train_loss.png", "unseen_scores.png", "routing/mocle/expert_load_by_task.png"):
        with Image.open(results / picture) as image:
            assert image.width > 100
