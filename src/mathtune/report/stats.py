"""Statistics of answers: accuracy with its Wilson interval, paired comparison, exact McNemar.

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
