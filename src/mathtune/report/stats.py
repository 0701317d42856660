"""Statistics of answers: accuracy with its Wilson interval, paired comparison, exact McNemar and its power.

A leaf module (nothing from mathtune), shared by evaluation (scores.json) and the report
(summary.json), so that both compute every accuracy the same way. A figure the inputs do not
support raises NotComputable, whose message says why, for the report's `missing` list.
"""

from __future__ import annotations

import math
from collections import Counter


class NotComputable(ValueError):
    """The inputs do not support a figure; the message says why, for the report's `missing` list."""


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: unlike the Wald interval it stays inside [0, 1] and keeps its coverage at 0/n.

    By hand because scipy's `BinomTest.proportion_ci` takes a confidence level, not z; the closed
    form is short and matches statsmodels' `proportion_confint(method="wilson")`.
    """
    if total <= 0 or not 0 <= correct <= total:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct}/{total}")
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(correct: int, total: int) -> dict:
    """Share correct with its 95% Wilson interval; value and interval are None when nothing was scored."""
    if total == 0:
        return {"correct": correct, "total": 0, "value": None, "ci95": None}
    return {"correct": correct, "total": total, "value": correct / total, "ci95": list(wilson_interval(correct, total))}


def accuracy_by_steps(predictions: list[dict]) -> list[dict]:
    """Strict exact match grouped by the gold solution's number of lines."""
    groups: dict[int, list[bool]] = {}
    for p in predictions:
        if isinstance(p.get("gold_steps"), int):
            groups.setdefault(p["gold_steps"], []).append(bool(p.get("correct_strict")))
    if not groups:
        raise NotComputable("The predictions carry no gold_steps, so accuracy by reasoning steps cannot be computed.")
    return [{"steps": k, **accuracy(sum(v), len(v))} for k, v in sorted(groups.items())]


def arithmetic_slip_share(predictions: list[dict]) -> dict:
    """Among wrong answers (strict), the share whose generation holds an arithmetic slip (a claimed result that is wrong)."""
    wrong = [p for p in predictions if not p.get("correct_strict")]
    if not wrong:
        raise NotComputable("Every answer was right, so there are no wrong answers to check for arithmetic slips.")
    slips = sum(bool(p.get("arithmetic_slip")) for p in wrong)
    return {"wrong": len(wrong), "with_slip": slips, "value": slips / len(wrong)}


def paired_table(base: dict, tuned: dict) -> dict:
    """The 2x2 table of the two models' correctness on the problems both were scored on."""
    shared = base.keys() & tuned.keys()
    if not shared:
        raise NotComputable("The base and tuned evaluations share no problem ids, so they cannot be paired.")
    cells = Counter((bool(base[i]), bool(tuned[i])) for i in shared)
    return {
        "n": len(shared),
        "both_right": cells[(True, True)],
        "only_base": cells[(True, False)],
        "only_tuned": cells[(False, True)],
        "both_wrong": cells[(False, False)],
    }


def mcnemar_exact_p(only_base: int, only_tuned: int) -> float:
    """Two-sided exact McNemar test: a binomial test of the discordant pairs against an even split."""
    n = only_base + only_tuned
    if n == 0:
        return 1.0
    from scipy import stats  # here, not at the top: training imports this module and need not hold scipy

    return float(stats.binomtest(only_base, n, 0.5, alternative="two-sided").pvalue)


def regressions(base_predictions: list[dict], tuned_predictions: list[dict]) -> list[dict]:
    """Problems the base model solved and the tuned model got wrong (strict), in the tuned file's order."""
    base = {p["id"]: p for p in base_predictions}
    return [
        {"id": t["id"], "question": t.get("question"), "gold": t.get("gold"),
         "base_pred": base[t["id"]].get("pred_strict"), "tuned_pred": t.get("pred_strict")}
        for t in tuned_predictions
        if t["id"] in base and base[t["id"]].get("correct_strict") and not t.get("correct_strict")
    ]


# --- what the paired design could detect -----------------------------------------------------------------------------
# Power of the two-sided exact McNemar test, computed exactly (no normal approximation). The model of a paired
# evaluation of n problems: each problem is, independently, solved only by the tuned model with probability p01,
# only by the base model with p10, else by both or neither. The gain is p01 - p10; the discordant rate is p01 + p10.
# The number of discordant problems D is Binomial(n, p01 + p10); given D, the only-tuned count is
# Binomial(D, p01 / (p01 + p10)), and the exact test rejects from that count alone.

ALPHA = 0.05  # the test's level: the report calls p < 0.05 significant
POWER = 0.8  # the usual planning target: a real gain of this size is found four times in five


def mcnemar_critical_counts(max_discordant: int, alpha: float = ALPHA):
    """For each discordant count D = 0..max_discordant, the smallest only-tuned count c (> D / 2) at which the
    two-sided exact McNemar test rejects at `alpha` (mcnemar_exact_p(D - c, c) <= alpha); D + 1 where none does.

    With p = 1/2 the two-sided p-value of c > D / 2 is 2 P(X >= c), X ~ Binomial(D, 1/2), so c is the smallest
    count whose upper tail is at most alpha / 2. As a numpy array indexed by D.
    """
    import numpy as np
    from scipy import stats

    d = np.arange(max_discordant + 1)
    c = np.floor(d / 2).astype(int) + 1  # the smallest count above D / 2
    c = np.maximum(c, stats.binom.isf(alpha / 2, d, 0.5).astype(int))  # near the answer; corrected both ways below
    while (move := (2 * stats.binom.sf(c - 1, d, 0.5) > alpha) & (c <= d)).any():
        c += move
    while (move := (c - 1 > d / 2) & (2 * stats.binom.sf(c - 2, d, 0.5) <= alpha)).any():
        c -= move
    return np.minimum(c, d + 1)


def mcnemar_power(n: int, gain: float, discordant: float, alpha: float = ALPHA, critical=None) -> float:
    """Probability that the two-sided exact McNemar test at `alpha` finds the tuned model better (more only-tuned
    than only-base problems, p <= alpha) on n paired problems, when the true gain (only-tuned rate minus
    only-base rate) is `gain` and the true discordant rate (their sum) is `discordant`.

    `critical`: mcnemar_critical_counts(m) for some m >= n, to reuse across calls.
    """
    import numpy as np
    from scipy import stats

    if not (0 <= gain <= discordant <= 1):
        raise ValueError(f"need 0 <= gain <= discordant rate <= 1, got gain {gain}, discordant rate {discordant}")
    if n <= 0 or discordant == 0:
        return 0.0
    d = np.arange(n + 1)
    critical = mcnemar_critical_counts(n, alpha) if critical is None else critical[: n + 1]
    only_tuned_share = (discordant + gain) / (2 * discordant)  # p01 / (p01 + p10)
    return float(np.sum(stats.binom.pmf(d, n, discordant) * stats.binom.sf(critical - 1, d, only_tuned_share)))


def design_discordant_rate(observed: float, gain: float) -> float:
    """The discordant rate assumed for a gain: the observed one, but never below the gain itself (a gain of g
    points needs at least g% of the problems to change sides). With no discordant problem observed this is the
    gain alone, the most favourable case (no problem gets worse), so what follows from it is a lower bound."""
    return max(observed, gain)


def min_detectable_gain(n: int, observed_discordant: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest gain (a share, 0.031 = 3.1 points) that the exact McNemar test at `alpha` detects with
    probability `power` on n paired problems, with the discordant rate design_discordant_rate(observed, gain).

    Power grows with the gain, so the gain is found by bisection to 1e-6. Raises NotComputable when there are
    no problems, or when even a gain of 100 points would be missed (too few problems for any test at alpha).
    """
    if n <= 0:
        raise NotComputable("No paired problems, so no gain could have been detected.")
    if not 0 <= observed_discordant <= 1:
        raise ValueError(f"the observed discordant rate must be in [0, 1], got {observed_discordant}")
    critical = mcnemar_critical_counts(n, alpha)

    def power_at(gain: float) -> float:
        return mcnemar_power(n, gain, design_discordant_rate(observed_discordant, gain), alpha, critical)

    if power_at(1.0) < power:
        raise NotComputable(f"On {n} paired problems the exact McNemar test at alpha = {alpha} cannot reach "
                            f"{power:.0%} power for any gain: too few problems.")
    low, high = 0.0, 1.0
    while high - low > 1e-6:
        middle = (low + high) / 2
        low, high = (low, middle) if power_at(middle) >= power else (middle, high)
    return high


def problems_needed(gain: float, observed_discordant: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """The smallest number of paired problems on which the exact McNemar test at `alpha` detects `gain` (a share)
    with probability `power`, with the discordant rate design_discordant_rate(observed, gain).

    The exact test's power zigzags as n grows (its discrete rejection region), so the search starts from half of
    Connor's (1987) normal-approximation size, steps up in 1% strides to the first n that reaches the power, then
    goes back over the last stride one problem at a time: the first n with the power, not a later crossing.
    """
    from scipy import stats

    if not 0 < gain <= 1:
        raise ValueError(f"the gain must be a share in (0, 1], got {gain}")
    discordant = design_discordant_rate(observed_discordant, gain)
    z_alpha, z_power = stats.norm.isf(alpha / 2), stats.norm.isf(1 - power)
    approx = (z_alpha * discordant**0.5 + z_power * (discordant - gain**2) ** 0.5) ** 2 / gain**2
    stride = max(1, int(approx) // 100)
    critical = mcnemar_critical_counts(int(4 * approx) + 100, alpha)
    previous, n = 0, max(1, int(approx / 2))
    while mcnemar_power(n, gain, discordant, alpha, critical) < power:
        previous, n = n, n + stride
        if n >= len(critical):
            critical = mcnemar_critical_counts(2 * n, alpha)
    return next(m for m in range(previous + 1, n + 1) if mcnemar_power(m, gain, discordant, alpha, critical) >= power)
