"""report/stats.py on hand-made inputs whose answers are known (published values or closed forms)."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from scipy import optimize, stats

from handmade import pred
from mathtune.report.stats import (
    NotComputable, accuracy, accuracy_by_steps, arithmetic_slip_share, mcnemar_critical_counts, mcnemar_exact_p,
    mcnemar_power, min_detectable_gain, paired_table, problems_needed, regressions, wilson_interval,
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


# --- what the paired design could detect ---


def test_critical_counts_are_where_the_exact_test_starts_rejecting():
    critical = mcnemar_critical_counts(80)
    for d in range(81):
        c = int(critical[d])
        if c <= d:
            assert mcnemar_exact_p(d - c, c) <= 0.05, d
        else:
            assert all(mcnemar_exact_p(d - k, k) > 0.05 for k in range(d + 1)), d
        if c - 1 > d / 2:
            assert mcnemar_exact_p(d - c + 1, c - 1) > 0.05, d
    # 2 x 0.5^6 = 0.031 rejects, 2 x 0.5^5 = 0.0625 does not: six of six discordant problems is the least evidence
    assert list(critical[:7]) == [1, 2, 3, 4, 5, 6, 6]


def test_power_when_every_discordant_problem_favours_the_tuned_model_is_a_binomial_tail():
    # With no only-base problems the test rejects once 6 problems are discordant: power = P(Binomial(n, gain) >= 6).
    for n, gain in ((20, 0.3), (100, 0.05), (250, 0.02)):
        assert mcnemar_power(n, gain, gain) == pytest.approx(stats.binom.sf(5, n, gain), rel=1e-9)
    assert mcnemar_power(0, 0.1, 0.2) == 0.0 and mcnemar_power(50, 0.0, 0.0) == 0.0
    with pytest.raises(ValueError):
        mcnemar_power(50, 0.3, 0.2)  # a gain larger than the discordant rate is impossible


@pytest.mark.parametrize("n,gain,discordant", [(60, 0.15, 0.3), (200, 0.05, 0.12)])
def test_power_matches_a_simulation_of_the_paired_evaluation(n, gain, discordant):
    """Simulated evaluations: each problem only-tuned, only-base or neither; the exact test run on each."""
    import numpy as np

    rng = np.random.default_rng(0)
    draws = 4000
    only_tuned_p, only_base_p = (discordant + gain) / 2, (discordant - gain) / 2
    counts = rng.multinomial(n, [only_tuned_p, only_base_p, 1 - discordant], size=draws)
    cache = {}
    rejected = 0
    for c, b, _ in counts:
        if (b, c) not in cache:
            cache[(b, c)] = c > b and _exact_two_sided(b, c) <= 0.05
        rejected += cache[(b, c)]
    power = mcnemar_power(n, gain, discordant)
    assert rejected / draws == pytest.approx(power, abs=3 * math.sqrt(power * (1 - power) / draws) + 1e-3)


def test_min_detectable_gain_with_no_discordant_problem_solves_the_binomial_tail():
    # 0 -> 0 on 20 problems: the gain g with P(Binomial(20, g) >= 6) = 0.8, found independently by brentq.
    expected = optimize.brentq(lambda g: stats.binom.sf(5, 20, g) - 0.8, 1e-6, 1)
    assert min_detectable_gain(20, 0.0) == pytest.approx(expected, abs=2e-6)
    assert round(expected * 100, 1) == 36.6


def test_min_detectable_gain_is_where_the_power_reaches_80_percent():
    gain = min_detectable_gain(250, 0.04)
    discordant = max(0.04, gain)
    assert mcnemar_power(250, gain, discordant) >= 0.8 > mcnemar_power(250, gain - 1e-4, max(0.04, gain - 1e-4))
    # more problems, smaller detectable gains; more discordant problems (noise), larger ones
    assert min_detectable_gain(1000, 0.04) < gain < min_detectable_gain(250, 0.2)


def test_min_detectable_gain_without_enough_problems_says_why():
    with pytest.raises(NotComputable, match="No paired problems"):
        min_detectable_gain(0, 0.0)
    with pytest.raises(NotComputable, match="too few problems"):
        min_detectable_gain(5, 0.2)  # five problems can never give p <= 0.05


@pytest.mark.parametrize("observed", [0.0, 0.2])
def test_problems_needed_is_the_first_n_with_80_percent_power(observed):
    n = problems_needed(0.05, observed)
    discordant = max(observed, 0.05)
    assert mcnemar_power(n, 0.05, discordant) >= 0.8
    assert all(mcnemar_power(m, 0.05, discordant) < 0.8 for m in range(max(1, n - 60), n))


def test_problems_needed_is_close_to_connors_normal_approximation():
    # Connor (1987): n = (z_a sqrt(psi) + z_b sqrt(psi - delta^2))^2 / delta^2 = 625.5 for psi = 0.2, delta = 0.05;
    # the exact test, being conservative, needs a few per cent more.
    z_a, z_b = stats.norm.isf(0.025), stats.norm.isf(0.2)
    connor = (z_a * math.sqrt(0.2) + z_b * math.sqrt(0.2 - 0.05**2)) ** 2 / 0.05**2
    assert connor == pytest.approx(625.5, abs=0.5)
    assert connor < problems_needed(0.05, 0.2) < 1.1 * connor
    assert problems_needed(0.05, 0.0) == next(n for n in range(1, 1000) if stats.binom.sf(5, n, 0.05) >= 0.8)
