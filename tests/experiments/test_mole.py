"""experiments/mole at smoke scale: the conflicting domains, every arm scored per domain."""

from __future__ import annotations

import math

from PIL import Image

from experiments.evaluation import read_split
from experiments.mole import run
from experiments.mole.domains import DOMAINS, domain_file, sentence_value
from tests.experiments.smoke import smoke_summary


def test_mole_smoke_run_writes_per_domain_scores_grid_and_curves(shared_work, tmp_path):
    results = tmp_path / "results"
    summary = smoke_summary(run, shared_work, results)
    runs = {r["arm"]: r for r in summary["runs"]}
    assert sorted(runs) == sorted(run.arms("smoke"))
    for arm, record in runs.items():
        domains = [arm.split("-", 1)[1]] if arm.startswith("alone-") else DOMAINS
        for domain in domains:
            assert math.isfinite(record[f"{domain}_loss"]), arm
        for key in ("terse_accuracy", "verbose_value_accuracy", "verbose_format", "table_cell_accuracy"):
            assert 0.0 <= record.get(key, 0.0) <= 1.0
    # The conflict: terse and verbose ask the same held-out questions with clashing replies.
    terse = read_split(domain_file(shared_work, "heldout", "terse"))
    verbose = read_split(domain_file(shared_work, "heldout", "verbose"))
    assert [s.images for s in terse] == [s.images for s in verbose]
    for t, v in zip(terse, verbose, strict=True):
        assert sentence_value(v.messages[1]["content"]) == t.messages[1]["content"]
    text = (results / "results.md").read_text()
    assert "| dense LoRA, each domain alone |" in text and "| rank \\ experts | 2 | 4 |" in text
    with Image.open(results / "train_loss.png") as image:
        assert image.width > 100
