"""report/hard_examples.py: reason tags, robust outliers and tag clusters on planted examples."""

from __future__ import annotations

import numpy as np
import pytest

from mathtune.report.hard_examples import (
    outlier_loss_cutoff, reason_tags, robust_outliers, robust_z_scores, tag_clusters,
)
from mathtune.report.stats import NotComputable


def test_reason_tags():
    assert reason_tags("Prices rose by 20% this year.") == ["percentage", "growth/rate"]
    assert "price tiers" in reason_tags("Apples cost $2, pears $3 and a melon $5. How much for all?")
    assert reason_tags("A movie lasts 2 hours and 30 minutes.") == ["unit/time conversion"]
    assert reason_tags("She buys 3 dozen eggs.") == ["unit/time conversion"]
    assert reason_tags("Tom has 3 apples.", gold_steps=6) == ["many steps"]
    assert reason_tags("A house costs 250,000 dollars.") == ["large numbers"]
    assert reason_tags("Tom has 3 apples and eats 1.", gold_steps=2) == []


def test_robust_outliers_finds_planted_examples():
    spread = np.linspace(0.9, 1.1, 60)  # evenly spread: no outlier but the planted ones
    records = [{"id": f"train-{i}", "loss": float(v), "question": "Tom has 3 apples."} for i, v in enumerate(spread)]
    records[7] = {"id": "train-7", "loss": 3.0, "question": "A price rose by 15% per year.", "gold_steps": 3}
    records[40] = {"id": "train-40", "loss": 2.6, "question": "Sam has 4 pens.", "gold_steps": 7}
    found = robust_outliers(records)
    assert [o["id"] for o in found] == ["train-7", "train-40"]
    assert found[0]["robust_z"] > 3.5 and found[0]["tags"] == ["percentage", "growth/rate"]
    assert found[1]["tags"] == ["many steps"]
    values = [r["loss"] for r in records]
    median = float(np.median(values))
    mad = float(np.median(np.abs(np.array(values) - median)))
    assert found[0]["robust_z"] == pytest.approx(0.6745 * (3.0 - median) / mad)
    cutoff = outlier_loss_cutoff(values)["loss_cutoff"]
    assert 1.0 < cutoff < 2.6


def test_robust_z_undefined_when_mad_is_zero():
    with pytest.raises(NotComputable, match="MAD"):
        robust_z_scores([1.0, 1.0, 1.0, 5.0])


def test_tag_clusters_need_overrepresentation():
    outliers = [{"robust_z": 5, "question": "q", "tags": ["percentage"]}] * 3
    examples = [{"question": "Up 5% today."}] * 3 + [{"question": "Tom has 3 apples."}] * 27
    assert tag_clusters(outliers, examples) == [
        {"tag": "percentage", "outliers": 3, "outlier_share": 1.0, "validation_share": 0.1}]
    common = [{"question": "Up 5% today."}] * 30  # every problem is a percentage problem: no cluster
    assert tag_clusters(outliers, common) == []
