"""Hard validation examples: per-example losses far above the rest (robust z-scores), the reasons
a problem may be hard (keyword tags on its text), and tags over-represented among the outliers.

Pure functions; a figure the inputs do not support raises NotComputable with the reason.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

from mathtune.report.stats import NotComputable

OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the robust (modified) z-score
MANY_STEPS = 5  # gold solutions with at least this many lines are tagged "many steps"
LARGE_NUMBER = 1000  # a number at least this large in the question tags it "large numbers"

_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_PERCENT = re.compile(r"\d\s*%|\bper\s?cent", re.I)
_GROWTH = re.compile(
    r"\b(rate|interest|compound\w*|grow(s|th|ing)?|doubl\w*|tripl\w*|quadrupl\w*|"
    r"(increas|decreas|ris|rose|fall|fell|drop|rais|reduc|grew)\w* by|per (second|minute|hour|day|week|month|year)|mph|km/h)\b",
    re.I,
)
_MONEY = re.compile(r"\$\s?\d[\d,]*(?:\.\d+)?|\b\d[\d,]*(?:\.\d+)?\s*(dollars?|cents?)\b", re.I)
_UNIT_FAMILIES = {
    "time": r"seconds|minutes?|hours?|days?|weeks?|months?|years?",
    "length": r"inch(es)?|feet|foot|yards?|miles?|centimet(er|re)s?|met(er|re)s?|kilomet(er|re)s?|cm|km",
    "mass": r"ounces?|pounds?|grams?|kilograms?|kg|tons?",
    "volume": r"milliliters?|ml|liters?|litres?|gallons?|quarts?|pints?|cups?",
    "money": r"dollars?|cents?",
}


def _unit_word(word: str) -> str:
    return word.lower().rstrip("s").replace("feet", "foot").replace("inche", "inch")


def reason_tags(question: str, gold_steps: int | None = None) -> list[str]:
    """Why a problem may be hard, from its text: keyword and regex rules, each listed below.

    percentage: a number followed by % or the word "percent". growth/rate: rate, interest,
    growth, doubling, "increased by", "per hour" and the like. price tiers: three or more money
    amounts ($5, 20 cents). unit/time conversion: two different units of one kind (hours and
    minutes, feet and inches) or "dozen". many steps: a gold solution of MANY_STEPS or more lines.
    large numbers: a number of LARGE_NUMBER or more.
    """
    tags = []
    if _PERCENT.search(question):
        tags.append("percentage")
    if _GROWTH.search(question):
        tags.append("growth/rate")
    if len(_MONEY.findall(question)) >= 3:
        tags.append("price tiers")
    units = [
        {_unit_word(m.group(0)) for m in re.finditer(rf"\b({pattern})\b", question, re.I)}
        for pattern in _UNIT_FAMILIES.values()
    ]
    if re.search(r"\bdozens?\b", question, re.I) or any(len(found) >= 2 for found in units):
        tags.append("unit/time conversion")
    if gold_steps is not None and gold_steps >= MANY_STEPS:
        tags.append("many steps")
    if any(float(n.replace(",", "")) >= LARGE_NUMBER for n in _NUMBER.findall(question)):
        tags.append("large numbers")
    return tags


def last_evaluation_losses(example_losses: list[dict]) -> tuple[int | None, list[dict]]:
    """The step of the last evaluation and its per-example records (the last one per id, as a resumed run re-logs)."""
    steps = [r["step"] for r in example_losses if isinstance(r.get("step"), int)]
    if not steps:
        return None, []
    last = max(steps)
    latest = {r["id"]: r for r in example_losses
              if r.get("step") == last and isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])}
    return last, list(latest.values())


def robust_z_scores(values: list[float]) -> list[float]:
    """Modified z-scores 0.6745*(x - median)/MAD: median and MAD are not pulled by the outliers themselves."""
    if len(values) < 3:
        raise NotComputable(f"{len(values)} per-example loss(es); robust z-scores need at least 3.")
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    if mad == 0:
        raise NotComputable("Over half the per-example losses are identical (MAD = 0), so robust z-scores are undefined.")
    return [0.6745 * (v - median) / mad for v in values]


def robust_outliers(example_losses: list[dict], threshold: float = OUTLIER_Z) -> list[dict]:
    """Examples of one evaluation whose |robust z| of loss exceeds `threshold`, highest loss first.

    Records carry `id` and `loss`, and optionally `question` and `gold_steps` for the tags.
    """
    scores = robust_z_scores([r["loss"] for r in example_losses])
    found = [
        {
            "id": r["id"],
            "question": r.get("question"),
            "loss": r["loss"],
            "robust_z": z,
            "tags": reason_tags(r["question"], r.get("gold_steps")) if r.get("question") else [],
        }
        for r, z in zip(example_losses, scores)
        if abs(z) > threshold
    ]
    return sorted(found, key=lambda o: -o["loss"])


def outlier_loss_cutoff(values: list[float], threshold: float = OUTLIER_Z) -> dict:
    """Median, MAD and the loss above which an example is a high outlier (for the histogram)."""
    median = statistics.median(values)
    mad = statistics.median(abs(v - median) for v in values)
    return {"n": len(values), "median": median, "mad": mad, "threshold": threshold, "loss_cutoff": median + threshold * mad / 0.6745}


def tag_clusters(outliers: list[dict], examples: list[dict]) -> list[dict]:
    """Tags over-represented among high-loss outliers: at least 2 of them, half the outliers, 1.5x the base rate."""
    high = [o for o in outliers if o["robust_z"] > 0 and o["question"]]
    tagged = [reason_tags(e["question"], e.get("gold_steps")) for e in examples if e.get("question")]
    clusters = []
    for tag, count in Counter(t for o in high for t in o["tags"]).most_common():
        base_rate = sum(tag in t for t in tagged) / len(tagged)
        share = count / len(high)
        if count >= 2 and share >= 0.5 and share >= 1.5 * base_rate:
            clusters.append({"tag": tag, "outliers": count, "outlier_share": share, "validation_share": base_rate})
    return clusters

