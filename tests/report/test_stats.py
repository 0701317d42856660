"""report/stats.py on hand-made inputs whose answers are known (published values or closed forms)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from scipy import optimize, stats

from handmade import pred
from mathtune.report.stats import (
    NotComputable, accuracy, accuracy_by_steps, arithmetic_slip_share, mcnemar_exact_p, paired_table, regressions,
    wilson_interval,
)


def _wilson_by_inversion(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """An independent reference: the p0 where the score statistic |p - p0| / sqrt(p0 (1 - p0) / n) equals z."""
    p = correct / total

    def score(p0: float) -> float:
        return abs(p - p0) / math.sqrt(p0 * (1 - p0) / total) - z

    eps = 1e-12
    low = 0.0 if correct == 0 else optimize.brentq(score, eps, min(p, 1 - eps))
    high = 1.0 if correct == total else optimize.brentq(score, max(p, eps), 1 - eps)
    return low, high


def test_wilson_12_of_50_matches_statsmodels_value():
    # statsmodels.stats.proportion.proportion_confint(12, 50, method="wilson") = (0.14297, 0.37413)
    low, high = wilson_interval(12, 50)
    assert low == pytest.approx(0.14297, abs=1e-4)
    assert high == pytest.approx(0.37413, abs=1e-4)


@pytest.mark.parametrize(
    "correct,total,expected",
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction)
    [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718))],
)
def test_wilson_matches_newcombe_table(correct, total, expected):
    low, high = wilson_interval(correct, total, z=1.959964)
    assert (low, high) == pytest.approx(expected, abs=6e-5)


@pytest.mark.parametrize("correct,total", [(0, 10), (3, 7), (12, 50), (49, 50), (50, 50)])
def test_wilson_matches_score_test_inversion(correct, total):
    assert wilson_interval(correct, total) == pytest.approx(_wilson_by_inversion(correct, total), abs=1e-9)


def test_accuracy_with_nothing_scored_has_no_value():
    assert accuracy(0, 0) == {"correct": 0, "total": 0, "value": None, "ci95": None}
    acc = accuracy(12, 50)
    assert acc["value"] == 0.24 and acc["ci95"] == pytest.approx([0.14297, 0.37413], abs=1e-4)


def _exact_two_sided(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("b,c", [(1, 9), (0, 5), (10, 10), (3, 12), (25, 14)])
def test_mcnemar_matches_binomtest_and_closed_form(b, c):
    p = mcnemar_exact_p(b, c)
    assert p == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert p == pytest.approx(_exact_two_sided(b, c), rel=1e-12)


def test_mcnemar_textbook_value():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, airway hyper-responsiveness
    # example: 1 and 7 discordant pairs, exact conditional McNemar p = 0.070.
    assert mcnemar_exact_p(1, 7) == pytest.approx(0.0703125, abs=1e-9)
    assert round(mcnemar_exact_p(7, 1), 3) == 0.070


def test_mcnemar_without_discordant_pairs_is_one():
    assert mcnemar_exact_p(0, 0) == 1.0


def test_paired_table_counts_shared_ids_only():
    base = {"a": True, "b": True, "c": False, "d": False, "only-base": True}
    tuned = {"a": True, "b": False, "c": True, "d": False, "only-tuned": True}
    assert paired_table(base, tuned) == {"n": 4, "both_right": 1, "only_base": 1, "only_tuned": 1, "both_wrong": 1}
    with pytest.raises(NotComputable):
        paired_table({"a": True}, {"b": True})


def test_accuracy_by_steps_slips_and_regressions():
    base = [pred(0, True), pred(1, True, 3), pred(2, False, 3, slip=True), pred(3, False, 3)]
    tuned = [pred(0, True), pred(1, False, 3, slip=True), pred(2, True, 3), pred(3, False, 3)]
    by_steps = accuracy_by_steps(tuned)
    assert [(b["steps"], b["correct"], b["total"]) for b in by_steps] == [(2, 1, 1), (3, 1, 3)]
    assert arithmetic_slip_share(tuned) == {"wrong": 2, "with_slip": 1, "value": 0.5}
    assert [r["id"] for r in regressions(base, tuned)] == ["test-1"]
    with pytest.raises(NotComputable):
        arithmetic_slip_share([pred(0, True)])


def test_importing_the_training_module_leaves_scipy_unloaded():
    """Training imports report.stats (through evaluate); scipy.stats loads only when a statistic is computed."""
    code = "import sys, mathtune.training.recipe; print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
