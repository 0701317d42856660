"""The report's figures, computed from a run's records: pure functions, no file I/O.

Every figure has a one-sentence definition (`definitions()`), and a figure the inputs do not
support is None with a sentence in `missing` saying why: the report never invents a number.
A function that cannot compute its figure raises NotComputable, whose message is that sentence.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter

import numpy as np

FINAL_FRACTION = 0.1  # the final phase: the last 10% of the training steps done
SMOOTHING = 5  # trailing rolling mean over this many logged training losses
ALPHA = 0.05  # significance level of the final-phase slope test
MIN_POINTS = 5  # fewest logged losses a slope test or a fit is run on
OUTLIER_Z = 3.5  # Iglewicz & Hoaglin's cut-off for the robust (modified) z-score
OVERFIT_RISES = 3  # consecutive validation-loss rises that count as overfitting
MANY_STEPS = 5  # gold solutions with at least this many lines are tagged "many steps"
LARGE_NUMBER = 1000  # a number at least this large in the question tags it "large numbers"
LOW_TRAIN_DECREASE_PCT = 5.0  # training loss falling less than this suggests a higher LR or rank

# Rough on-demand cloud prices in USD per device-hour (2025); override with cost.price_per_hour.
PRICES_USD_PER_HOUR = {
    "H200": 3.50,
    "H100": 2.50,
    "A100": 1.50,
    "L40S": 1.00,
    "A10G": 1.00,
    "L4": 0.70,
    "T4": 0.35,
    "V100": 0.80,
    "RTX 4090": 0.40,
    "RTX 3090": 0.25,
    "CPU": 0.10,  # a 2-core cloud VM
}


class NotComputable(ValueError):
    """The inputs do not support a figure; the message says why, for the report's `missing` list."""


def scipy_stats():
    """scipy.stats, imported when a statistic is computed: `mathtune train` imports this module (through
    evaluate) and would otherwise hold scipy.stats in memory for the whole run (19 MB resident)."""
    from scipy import stats

    return stats


# --- proportions and paired comparisons ---------------------------------------------------------


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
    return float(scipy_stats().binomtest(only_base, n, 0.5, alternative="two-sided").pvalue)


# --- training curves ----------------------------------------------------------------------------


def loss_decrease_pct(first: float | None, last: float | None) -> float | None:
    """Relative decrease from first to last in percent (negative: the loss rose); None without both."""
    if first is None or last is None or first == 0:
        return None
    return (first - last) / first * 100


def rolling_mean(values: list[float], window: int = SMOOTHING) -> list[float]:
    """Trailing rolling mean (the first points average what there is so far): no look-ahead, no lag tuning."""
    cumulative = np.cumsum([0.0, *values])
    return [float((cumulative[i + 1] - cumulative[max(0, i + 1 - window)]) / min(window, i + 1)) for i in range(len(values))]


def value_at_or_before(steps: list[int], values: list[float], step: int) -> float | None:
    """The last value logged at or before `step` (how a training loss is matched to an evaluation)."""
    found = None
    for s, v in zip(steps, values):
        if s > step:
            break
        found = v
    return found


def final_phase(
    steps: list[int],
    losses: list[float],
    steps_per_epoch: float | None = None,
    fraction: float = FINAL_FRACTION,
    smoothing: int = SMOOTHING,
    alpha: float = ALPHA,
) -> dict:
    """Is the training loss still falling at the end, and where would 1 and 2 more epochs take it?

    The window is the logged steps in the final `fraction` of the steps done (at least MIN_POINTS
    points). Its decrease is read on the smoothed curve; the verdict comes from a one-sided test
    that the least-squares slope of the raw losses in the window is negative.
    """
    if len(steps) < MIN_POINTS:
        raise NotComputable(
            f"Only {len(steps)} training losses were logged; the final-phase test needs at least {MIN_POINTS}."
        )
    last_step = steps[-1]
    start = next(i for i, s in enumerate(steps) if s >= last_step * (1 - fraction))
    start = min(start, len(steps) - MIN_POINTS)
    smoothed = rolling_mean(losses, smoothing)
    fit = scipy_stats().linregress(steps[start:], losses[start:], alternative="less")
    p_value = None if math.isnan(fit.pvalue) else float(fit.pvalue)  # nan: the losses in the window are constant
    still_improving = bool(p_value is not None and fit.slope < 0 and p_value < alpha)
    forecast = forecast_note = None
    if still_improving and not steps_per_epoch:
        forecast_note = "No log carries an epoch, so the loss after more epochs cannot be forecast."
    elif still_improving:
        try:
            forecast = forecast_loss(steps, losses, steps_per_epoch)
        except NotComputable as exc:
            forecast_note = str(exc)
    return {
        "window_start_step": steps[start],
        "window_end_step": last_step,
        "n_points": len(steps) - start,
        "smoothing": f"trailing rolling mean over {smoothing} logged losses",
        "loss_start": smoothed[start],
        "loss_end": smoothed[-1],
        "loss_decrease_pct": loss_decrease_pct(smoothed[start], smoothed[-1]),
        "slope_per_step": float(fit.slope),
        "slope_p": p_value,
        "still_improving": still_improving,
        "verdict": "still improving" if still_improving else "flat",
        "forecast": forecast,
        "forecast_note": forecast_note,
    }


def forecast_loss(steps: list[int], losses: list[float], steps_per_epoch: float, epochs: tuple = (1, 2)) -> dict:
    """Training loss after more epochs, from loss = a + b*ln(step) fitted to the second half of the curve.

    A log-linear fit has two parameters and no asymptote to guess, so it stays stable on short
    noisy curves where a power law's three parameters do not. It extrapolates the curve as it was,
    learning-rate schedule included, so it is a trend, not a promise. The band is the 95%
    confidence interval of the fitted mean, by hand because scipy's linregress gives no
    prediction intervals.
    """
    half = [(s, v) for s, v in zip(steps, losses) if s >= steps[-1] / 2 and s > 0]
    if len(half) < MIN_POINTS:
        raise NotComputable(f"The second half of training logged {len(half)} losses; the fit needs {MIN_POINTS}.")
    x = np.log([s for s, _ in half])
    y = np.array([v for _, v in half])
    fit = scipy_stats().linregress(x, y)
    n = len(x)
    residual_sd = math.sqrt(float(np.sum((y - (fit.intercept + fit.slope * x)) ** 2)) / (n - 2))
    sxx = float(np.sum((x - x.mean()) ** 2))
    t = scipy_stats().t.ppf(0.975, n - 2)
    points = []
    for k in epochs:
        step = steps[-1] + k * steps_per_epoch
        x0 = math.log(step)
        mean = fit.intercept + fit.slope * x0
        half_width = t * residual_sd * math.sqrt(1 / n + (x0 - x.mean()) ** 2 / sxx)
        points.append({"epochs_ahead": k, "step": round(step), "loss": float(mean), "ci95": [float(mean - half_width), float(mean + half_width)]})
    return {
        "method": "least-squares fit of loss = a + b*ln(step) over the second half of the logged training losses; "
        "band: 95% confidence interval of the fitted mean",
        "n_points": n,
        "points": points,
    }


def generalisation_gap(train_steps: list[int], train_losses: list[float], eval_steps: list[int], eval_losses: list[float]) -> dict:
    """Validation minus training loss at the first and last evaluation (training loss: last logged at or before)."""
    def at(index: int) -> dict:
        train = value_at_or_before(train_steps, train_losses, eval_steps[index])
        val = eval_losses[index]
        return {"step": eval_steps[index], "train_loss": train, "val_loss": val, "gap": None if train is None else val - train}

    if not eval_steps:
        raise NotComputable("No evaluation was logged, so the train/validation gap cannot be computed.")
    return {"first": at(0), "last": at(-1)}


def detect_overfitting(
    eval_steps: list[int],
    eval_losses: list[float],
    train_steps: list[int],
    train_losses: list[float],
    rises: int = OVERFIT_RISES,
) -> dict:
    """Overfitting: validation loss rose at `rises` consecutive evaluations while the smoothed training loss fell.

    Smoothed, because a single noisy logged loss would otherwise decide whether training "fell".
    The latest such stretch is reported.
    """
    if len(eval_steps) < rises + 1:
        raise NotComputable(
            f"{len(eval_steps)} evaluation(s) were logged; overfitting needs {rises + 1} to see {rises} rises in a row."
        )
    smoothed = rolling_mean(train_losses)
    found = None
    begin = 0
    for i in range(1, len(eval_losses) + 1):
        if i < len(eval_losses) and eval_losses[i] > eval_losses[i - 1]:
            continue
        end = i - 1  # eval_losses[begin..end] rose at every step
        if end - begin >= rises:
            train_from = value_at_or_before(train_steps, smoothed, eval_steps[begin])
            train_to = value_at_or_before(train_steps, smoothed, eval_steps[end])
            if train_from is not None and train_to is not None and train_to < train_from:
                found = {
                    "from_step": eval_steps[begin],
                    "to_step": eval_steps[end],
                    "consecutive_rises": end - begin,
                    "val_loss_rise_pct": -loss_decrease_pct(eval_losses[begin], eval_losses[end]),
                    "train_loss_change_pct": -loss_decrease_pct(train_from, train_to),
                }
        begin = i
    return {"detected": found is not None, **(found or dict.fromkeys(
        ["from_step", "to_step", "consecutive_rises", "val_loss_rise_pct", "train_loss_change_pct"]))}


def early_stopping(train_result: dict, enabled: bool | None) -> dict:
    """Whether early stopping fired and which checkpoint the adapter holds (the best one when it is on)."""
    best_step = train_result.get("best_step")
    steps_done = train_result.get("steps_done")
    planned = train_result.get("total_steps_planned")
    kept = best_step if enabled and best_step is not None else steps_done
    return {
        "enabled": enabled,
        "triggered": train_result.get("early_stopping_triggered"),
        "best_step": best_step,
        "best_metric": train_result.get("best_metric"),
        "best_metric_name": train_result.get("best_metric_name"),
        "steps_done": steps_done,
        "total_steps_planned": planned,
        "steps_not_run": planned - steps_done if planned is not None and steps_done is not None else None,
        "kept_checkpoint": None if kept is None else f"checkpoint-{kept}",
    }


# --- hard examples ------------------------------------------------------------------------------

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


# --- answers ------------------------------------------------------------------------------------


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


def regressions(base_predictions: list[dict], tuned_predictions: list[dict]) -> list[dict]:
    """Problems the base model solved and the tuned model got wrong (strict), in the tuned file's order."""
    base = {p["id"]: p for p in base_predictions}
    return [
        {"id": t["id"], "question": t.get("question"), "gold": t.get("gold"),
         "base_pred": base[t["id"]].get("pred_strict"), "tuned_pred": t.get("pred_strict")}
        for t in tuned_predictions
        if t["id"] in base and base[t["id"]].get("correct_strict") and not t.get("correct_strict")
    ]


def loss_vs_exact_match(steps: list[int], losses: list[float], exact: list[float], last: int = 3) -> dict:
    """Do validation loss and exact match agree? Spearman rank correlation, and a sentence when not.

    They agree when rho < 0 (lower loss, more right answers). The sentence also flags the last
    `last` evaluations when the loss moved by 1% or more but exact match did not move with it.
    """
    if len(steps) < 3:
        raise NotComputable(
            f"{len(steps)} evaluation(s) have both validation loss and exact match; a rank correlation needs 3."
        )
    rho = p = None
    if len(set(losses)) > 1 and len(set(exact)) > 1:  # spearmanr is undefined (nan) on a constant series
        result = scipy_stats().spearmanr(losses, exact)
        rho, p = float(result.statistic), float(result.pvalue)
    sentences = []
    if rho is not None and rho > 0:
        sentences.append(
            f"Over {len(steps)} evaluations lower validation loss went with lower exact match "
            f"(Spearman rho = {rho:+.2f}): the loss is not tracking answer accuracy."
        )
    k = min(last, len(steps))
    change = loss_decrease_pct(losses[-k], losses[-1])
    em_from, em_to = exact[-k] * 100, exact[-1] * 100
    if change is not None and abs(change) >= 1:
        loss_fell = change > 0
        if (em_to <= em_from) if loss_fell else (em_to > em_from):
            moved = "did not move" if em_to == em_from else ("fell" if em_to < em_from else "rose")
            sentences.append(
                f"Validation loss {'fell' if loss_fell else 'rose'} {abs(change):.1f}% over the last {k} evaluations "
                f"while exact match {moved} ({em_from:.1f}% to {em_to:.1f}%)."
            )
    return {"n": len(steps), "spearman_rho": rho, "p_value": p, "agree": None if rho is None else rho < 0,
            "sentence": " ".join(sentences) or None}


# --- cost ---------------------------------------------------------------------------------------


def price_key(hardware: str) -> str | None:
    """The price table's entry named in a hardware string ("NVIDIA H100 80GB HBM3" -> "H100"), longest first."""
    for key in sorted(PRICES_USD_PER_HOUR, key=len, reverse=True):
        if re.search(rf"(?<![A-Z0-9]){re.escape(key)}(?![A-Z0-9])", hardware.upper()):
            return key
    return None


def cost(hours: float, hardware: str | None, price_per_hour: float | None = None) -> dict:
    """USD for `hours` on `hardware`, at the given price or the table's default for that hardware.

    A leading device count ("2x NVIDIA H100 ...", as models.hardware_name writes it) multiplies the
    default price; a given price is taken as the price of the whole machine.
    """
    key = price_key(hardware) if hardware else None
    count = re.match(r"\s*(\d+)\s*x\s", hardware or "")
    if price_per_hour is not None:
        price, source = price_per_hour, "given"
    elif key is not None:
        devices = int(count.group(1)) if count else 1
        price = PRICES_USD_PER_HOUR[key] * devices
        source = f"default table ({devices} x {key})" if devices > 1 else f"default table ({key})"
    else:
        price, source = None, None
    return {"hours": hours, "hardware": hardware, "price_per_hour": price, "price_source": source,
            "usd": None if price is None else hours * price}


def throughput(metrics: list[dict]) -> dict:
    """Tokens seen in training (all and loss-bearing) and tokens per wall-clock second, at the last training log."""
    logged = [m for m in metrics if m.get("kind") == "train" and m.get("num_tokens") is not None]
    if not logged:
        raise NotComputable("No training record carries num_tokens, so tokens processed and throughput are unknown.")
    last = logged[-1]
    elapsed = last.get("elapsed_s")
    return {"tokens": last["num_tokens"], "loss_tokens": last.get("num_loss_tokens"),
            "tokens_per_s": last["num_tokens"] / elapsed if elapsed else None}


# --- recommendations ----------------------------------------------------------------------------


def recommendations(summary: dict) -> list[dict]:
    """Advice, each item with the figures (dotted summary keys) that triggered it."""
    items = []
    phase = summary["final_phase"]
    if phase["still_improving"]:
        evidence = {"final_phase.loss_decrease_pct": phase["loss_decrease_pct"], "final_phase.slope_p": phase["slope_p"]}
        forecast = (phase.get("forecast") or {}).get("points") or []
        for point in forecast:
            evidence[f"final_phase.forecast.{point['epochs_ahead']}_epoch"] = point["loss"]
        items.append({"text": "Train for more epochs: the training loss was still falling significantly at the end.",
                      "evidence": evidence})
    overfit = summary["generalisation"]["overfitting"]
    if overfit and overfit["detected"]:
        items.append({
            "text": "Regularise more (raise lora.dropout or train.weight_decay) or train fewer epochs: validation loss "
            f"rose at {overfit['consecutive_rises']} evaluations in a row while training loss fell.",
            "evidence": {"generalisation.overfitting.val_loss_rise_pct": overfit["val_loss_rise_pct"],
                         "generalisation.overfitting.train_loss_change_pct": overfit["train_loss_change_pct"],
                         "generalisation.overfitting.from_step": overfit["from_step"],
                         "generalisation.overfitting.to_step": overfit["to_step"]},
        })
    for cluster in summary["outlier_stats"]["tag_clusters"]:
        items.append({
            "text": f"Add training problems of the kind \"{cluster['tag']}\": they dominate the high-loss validation outliers.",
            "evidence": {"outlier_stats.tag_clusters.outliers": cluster["outliers"],
                         "outlier_stats.tag_clusters.outlier_share": cluster["outlier_share"],
                         "outlier_stats.tag_clusters.validation_share": cluster["validation_share"]},
        })
    decrease = summary["train_loss"]["decrease_pct"]
    if decrease is not None and decrease < LOW_TRAIN_DECREASE_PCT:
        items.append({
            "text": f"Raise the learning rate or the LoRA rank: training loss fell less than {LOW_TRAIN_DECREASE_PCT:.0f}%.",
            "evidence": {"train_loss.decrease_pct": decrease, "config.train.learning_rate": summary["config"]["learning_rate"],
                         "config.lora.r": summary["config"]["lora_r"]},
        })
    acc = summary["accuracy"]
    if acc["mcnemar_p"] is not None and acc["mcnemar_p"] >= ALPHA:
        items.append({
            "text": "Evaluate on more problems (eval.limit): the accuracy difference is within what chance "
            "produces on this many paired problems.",
            "evidence": {"accuracy.gain_points": acc["gain_points"], "accuracy.mcnemar_p": acc["mcnemar_p"],
                         "accuracy.paired.n": acc["paired"]["n"]},
        })
    return items


# --- definitions --------------------------------------------------------------------------------


def definitions() -> dict[str, str]:
    """One sentence per figure saying how it is computed, keyed by its dotted path in the summary."""
    return {
        "train_loss.first": "Training loss (mean over the loss-bearing tokens of one logging interval) at the first log.",
        "train_loss.last": "Training loss at the last log.",
        "train_loss.decrease_pct": "(first - last) / first x 100 of the logged training loss; negative means it rose.",
        "val_loss.first": "Validation loss (token-weighted mean over the validation set) at the first evaluation.",
        "val_loss.best": "Lowest validation loss over all evaluations.",
        "val_loss.last": "Validation loss at the last evaluation.",
        "val_loss.decrease_pct": "(first - best) / first x 100 of the validation loss.",
        "val_loss.decrease_pct_last": "(first - last) / first x 100 of the validation loss.",
        "steps_per_epoch": "Optimizer steps per epoch, from train_result.json, else step / epoch at the log with the "
        "largest epoch.",
        "final_phase.loss_decrease_pct": f"Relative decrease of the training loss, smoothed by a trailing rolling mean over "
        f"{SMOOTHING} logs, from the start to the end of the final {FINAL_FRACTION:.0%} of the steps done "
        f"(at least {MIN_POINTS} logs).",
        "final_phase.slope_p": "One-sided p-value that the least-squares slope of the raw training loss over the final "
        "phase is negative (scipy linregress, alternative='less').",
        "final_phase.still_improving": f"'still improving' when the slope is negative with p < {ALPHA}, else 'flat'.",
        "final_phase.forecast": "Training loss after 1 and 2 more epochs from loss = a + b*ln(step) fitted to the second "
        "half of the curve, with the 95% confidence band of the fit; it extends the curve as it was, schedule included.",
        "token_accuracy.train.first": "Share of loss-bearing tokens whose greedy prediction equals the reference, "
        "pooled over the first logging interval.",
        "token_accuracy.train.last": "The same at the last training log.",
        "token_accuracy.val.first": "Share of the validation set's loss-bearing tokens predicted exactly, at the first evaluation.",
        "token_accuracy.val.last": "The same at the last evaluation.",
        "generalisation.first.gap": "Validation loss minus the last training loss logged at or before the first evaluation.",
        "generalisation.last.gap": "Validation loss minus the last training loss logged at or before the last evaluation.",
        "generalisation.overfitting": f"Detected when validation loss rose at {OVERFIT_RISES} consecutive evaluations "
        f"while the smoothed training loss fell over the same steps.",
        "early_stopping.triggered": "Whether the early-stopping callback ended training before the planned steps (train_result.json).",
        "early_stopping.kept_checkpoint": "The checkpoint saved as the adapter: when early stopping is on, the best one by "
        "the named metric (the Trainer's metric_for_best_model), else the last.",
        "outliers": f"Validation examples of the last evaluation whose robust z = 0.6745 x (loss - median) / MAD "
        f"exceeds {OUTLIER_Z} in absolute value (Iglewicz & Hoaglin); tags come from keyword rules on the question.",
        "outlier_stats.tag_clusters": "Tags carried by at least 2 high-loss outliers, by half of them, and 1.5 times "
        "as often as among all validation examples with text.",
        "outlier_stats.loss_cutoff": f"median + {OUTLIER_Z} x MAD / 0.6745: the loss above which an example is a high outlier.",
        "accuracy.base": "Strict exact match of the base model: correct / scored, with a 95% Wilson score interval.",
        "accuracy.tuned": "Strict exact match of the tuned model: correct / scored, with a 95% Wilson score interval.",
        "accuracy.flexible": "Exact match when the last number in the generation is taken as the answer, 95% Wilson interval.",
        "accuracy.gain_points": "Tuned minus base strict accuracy, in percentage points.",
        "accuracy.paired": "Counts of problems scored for both models by which of them answered correctly (strict).",
        "accuracy.mcnemar_p": "Two-sided exact McNemar test: binomial test of only-base vs only-tuned problems against 50/50.",
        "accuracy.by_steps": "Strict exact match grouped by the number of lines of the gold solution before ####.",
        "accuracy.arithmetic_slip_share": "Among wrong answers, the share whose generation states a calculation with a wrong result.",
        "accuracy.regressions": "Problems the base model answered correctly and the tuned model did not (strict).",
        "loss_vs_exact_match.spearman_rho": "Spearman rank correlation of validation loss and exact match over the "
        "evaluations that logged both; negative means they agree.",
        "robustness": "Strict exact match on fresh generated problems (mathtune.synthetic, the same templates, "
        "seed data.synthetic_seed + 1000, which neither training nor the test set uses), base few-shot and tuned "
        "zero-shot as on the evaluation set; 95% Wilson interval. Names and numbers are new, so a model that "
        "memorised look-alikes drops here.",
        "robustness.gap_points": "Tuned strict accuracy on the evaluation set minus tuned accuracy on the fresh "
        "generated problems, in percentage points; positive means the evaluation set flatters the model.",
        "robustness.seed": "The seed of the fresh generated problems (their ids are synthetic-<seed>-<index>).",
        "cost.hours": "Wall-clock hours of training (train_result.json's wall_clock_s, else elapsed_s at the last log) "
        "plus base and tuned evaluation (scores.json's elapsed_s).",
        "cost.usd": "Sum over training and evaluations of hours x price per hour; the price is cost.price_per_hour "
        "or a rough 2025 on-demand default for the hardware.",
        "cost.usd_per_point": "Training cost in USD divided by the accuracy gain in percentage points; none without a gain.",
        "cost.generate_s": "Seconds of training spent generating answers for exact match at evaluations "
        "(train_result.json's generate_s, else the sum of eval_generate_s); already part of the training time.",
        "cost.tokens": "Tokens processed in training, all of them, at the last training log (num_tokens).",
        "cost.tokens_per_s": "Training tokens divided by the wall-clock seconds elapsed at that log.",
        "recommendations": "Rules on the figures above; each lists the figures that triggered it.",
    }


# --- the summary --------------------------------------------------------------------------------


def latest_per_step(records: list[dict]) -> list[dict]:
    """The last record per (kind, step), in step order: a resumed run re-logs the steps after its checkpoint."""
    latest = {(r.get("kind"), r.get("step")): r for r in records if isinstance(r.get("step"), int)}
    return sorted(latest.values(), key=lambda r: r["step"])


def series(metrics: list[dict], kind: str, key: str) -> tuple[list[int], list[float], int]:
    """Steps and finite values of one metric, and how many values were not finite (NaN or inf)."""
    pairs = [(m["step"], m[key]) for m in metrics if m.get("kind") == kind and isinstance(m.get(key), (int, float))]
    finite = [(s, float(v)) for s, v in pairs if math.isfinite(v)]
    return [s for s, _ in finite], [v for _, v in finite], len(pairs) - len(finite)


def data_location(data_info: dict | None) -> str | None:
    """Where the problems came from: a directory, a Hub id or the generator's seeds."""
    return (data_info or {}).get("path") or (data_info or {}).get("location")


def data_description(data_info: dict | None) -> str:
    """The data line of the report's header; says plainly when the problems are not GSM8K."""
    source = (data_info or {}).get("source")
    where = data_location(data_info)
    described = {
        "synthetic": "synthetic problems (not GSM8K)",
        "gsm8k-local": "GSM8K, local files",
        "gsm8k-hub": "GSM8K from the Hugging Face Hub",
    }.get(source, f"source {source!r}" if source else "unknown (no data.json)")
    return f"{described} — {where}" if where else described


def _first_last(values: list[float]) -> dict:
    return {"first": values[0] if values else None, "last": values[-1] if values else None}


def _attempt(missing: list[str], function, *args, **kwargs):
    """The function's result, or None with its reason added to `missing`."""
    try:
        return function(*args, **kwargs)
    except NotComputable as exc:
        missing.append(str(exc))
        return None


def _model_accuracy(predictions: list[dict] | None, scores: dict | None, kind: str) -> dict:
    """Accuracy from the predictions (the source of truth) when present, else from scores.json."""
    if predictions:
        return accuracy(sum(bool(p.get(f"correct_{kind}")) for p in predictions), len(predictions))
    block = (scores or {}).get(kind)
    if block and block.get("total") is not None:
        return accuracy(block["correct"], block["total"])
    return dict.fromkeys(["correct", "total", "value", "ci95"])


def _config_value(config: dict, section: str, key: str):
    return (config.get(section) or {}).get(key)


def _training(metrics: list[dict], steps_per_epoch: float | None, missing: list[str], notes: list[str]) -> dict:
    """Loss, final phase, token accuracy and generalisation from metrics.jsonl."""
    train_steps, train_losses, bad_train = series(metrics, "train", "loss")
    eval_steps, eval_losses, bad_eval = series(metrics, "eval", "eval_loss")
    if bad_train or bad_eval:
        notes.append(f"{bad_train} training and {bad_eval} validation losses were not finite (NaN or inf) and were "
                     "left out: the run may have diverged.")
    if not train_steps:
        missing.append("metrics.jsonl holds no training losses, so training loss, the final phase and token accuracy "
                       "in training cannot be computed.")
    if not eval_steps:
        missing.append("metrics.jsonl holds no evaluations, so validation loss, the generalisation gap and overfitting "
                       "cannot be computed.")
    elif len(eval_steps) == 1:
        missing.append(f"Only one evaluation was logged (step {eval_steps[0]}), so the change in validation loss "
                       "cannot be computed.")
    epochs = [m for m in metrics if isinstance(m.get("epoch"), (int, float)) and m["epoch"] > 0]
    if steps_per_epoch is None and epochs:
        widest = max(epochs, key=lambda m: m["epoch"])
        steps_per_epoch = widest["step"] / widest["epoch"]

    train_loss = {**_first_last(train_losses), "first_step": train_steps[0] if train_steps else None,
                  "last_step": train_steps[-1] if train_steps else None, "decrease_pct": None}
    if len(train_steps) > 1:
        train_loss["decrease_pct"] = loss_decrease_pct(train_loss["first"], train_loss["last"])
    val_loss = {**_first_last(eval_losses), "best": min(eval_losses) if eval_losses else None,
                "best_step": eval_steps[eval_losses.index(min(eval_losses))] if eval_losses else None,
                "n_evals": len(eval_steps), "decrease_pct": None, "decrease_pct_last": None}
    if len(eval_steps) > 1:
        val_loss["decrease_pct"] = loss_decrease_pct(val_loss["first"], val_loss["best"])
        val_loss["decrease_pct_last"] = loss_decrease_pct(val_loss["first"], val_loss["last"])

    phase = dict.fromkeys(["window_start_step", "window_end_step", "n_points", "smoothing", "loss_start", "loss_end",
                           "loss_decrease_pct", "slope_per_step", "slope_p", "still_improving", "verdict",
                           "forecast", "forecast_note"])
    if train_steps:
        phase = _attempt(missing, final_phase, train_steps, train_losses, steps_per_epoch) or phase
    if phase["forecast_note"]:
        missing.append(phase["forecast_note"])

    token_accuracy = {}
    for name, kind, key in (("train", "train", "mean_token_accuracy"), ("val", "eval", "eval_mean_token_accuracy")):
        token_accuracy[name] = _first_last(series(metrics, kind, key)[1])
        logged = train_steps if kind == "train" else eval_steps
        if logged and token_accuracy[name]["first"] is None:
            missing.append(f"No {kind} record carries {key}, so {name} token accuracy cannot be reported.")

    generalisation = {"first": None, "last": None, "overfitting": None}
    if eval_steps:
        generalisation.update(generalisation_gap(train_steps, train_losses, eval_steps, eval_losses))
        generalisation["overfitting"] = _attempt(
            missing, detect_overfitting, eval_steps, eval_losses, train_steps, train_losses)

    exact = dict(zip(*series(metrics, "eval", "eval_exact_match_strict")[:2]))  # only some evaluations generate
    em = [(step, loss, exact[step]) for step, loss in zip(eval_steps, eval_losses) if step in exact]
    agreement = dict.fromkeys(["n", "spearman_rho", "p_value", "agree", "sentence"])
    if not em:
        missing.append("No evaluation logged exact match during training, so loss and exact match cannot be compared.")
    else:
        agreement = _attempt(missing, loss_vs_exact_match, *map(list, zip(*em))) or agreement
        if agreement["n"] and agreement["spearman_rho"] is None:
            missing.append(f"Validation loss or exact match was constant over the {agreement['n']} evaluations that "
                           "logged both, so their rank correlation is undefined.")

    return {
        "steps_per_epoch": steps_per_epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "final_phase": phase,
        "token_accuracy": token_accuracy,
        "generalisation": generalisation,
        "loss_vs_exact_match": agreement,
    }


def _early_stopping(train_result: dict | None, config: dict, missing: list[str]) -> dict:
    """Early stopping as train_result.json records it; whether it was on, from there or else from the config."""
    train_config = config.get("train") or {}
    enabled = train_config["early_stopping_patience"] is not None if "early_stopping_patience" in train_config else None
    if train_result is None:
        missing.append("train_result.json is missing (the run may still be training, or it crashed), so early stopping "
                       "and the kept checkpoint cannot be reported.")
        return dict.fromkeys(["enabled", "triggered", "best_step", "best_metric", "best_metric_name", "steps_done",
                              "total_steps_planned", "steps_not_run", "kept_checkpoint"])
    stopping = early_stopping(train_result, train_result.get("early_stopping_enabled", enabled))
    if (stopping["steps_not_run"] or 0) > 0:
        why = "by early stopping" if stopping["triggered"] else "without early stopping firing (interrupted or crashed)"
        missing.append(f"The run stopped at step {stopping['steps_done']} of {stopping['total_steps_planned']} planned "
                       f"{why}; no figure describes the steps not run.")
    return stopping


def _outliers(example_losses: list[dict], questions: dict, gold_steps: dict, missing: list[str]) -> tuple[list, dict]:
    """High- and low-loss validation examples at the last evaluation, and the statistics behind them."""
    outlier_stats = {"step": None, "n": None, "median": None, "mad": None, "threshold": OUTLIER_Z,
              "loss_cutoff": None, "tag_clusters": []}
    last, latest = last_evaluation_losses(example_losses)
    if last is None:
        missing.append("example_losses.jsonl is missing or empty, so per-example outliers cannot be found.")
        return [], outlier_stats
    records = [{**r, "question": questions.get(r["id"]), "gold_steps": gold_steps.get(r["id"])} for r in latest]
    outliers = _attempt(missing, robust_outliers, records) or []
    if records:
        outlier_stats.update(outlier_loss_cutoff([r["loss"] for r in records]), step=last)
    if outliers:
        outlier_stats["tag_clusters"] = tag_clusters(outliers, records)
    unnamed = sum(o["question"] is None for o in outliers)
    if unnamed:
        missing.append(f"{unnamed} outlier(s) have no question text in the run directory, so they carry no tags.")
    return outliers, outlier_stats


def _answers(preds: dict, scores: dict, missing: list[str], notes: list[str]) -> dict:
    """Base and tuned accuracy, their paired comparison, and where the answers go wrong."""
    acc = {
        "base": _model_accuracy(preds["base"], scores["base"], "strict"),
        "tuned": _model_accuracy(preds["tuned"], scores["tuned"], "strict"),
        "flexible": {name: _model_accuracy(preds[name], scores[name], "flexible") for name in ("base", "tuned")},
        "gain_points": None, "paired": None, "mcnemar_p": None,
        "by_steps": {"base": None, "tuned": None},
        "arithmetic_slip_share": {"base": None, "tuned": None},
        "regressions": None,
    }
    for name in ("base", "tuned"):
        if not preds[name] and not scores[name]:
            missing.append(f"No {name}-model evaluation (eval/{name}/) was found, so its accuracy, the gain and the "
                           "paired test cannot be computed.")
            continue
        if not preds[name]:
            missing.append(f"eval/{name}/predictions.jsonl is missing, so the {name} model's accuracy by steps, "
                           "arithmetic slips and the paired comparison cannot be computed.")
            continue
        acc["by_steps"][name] = _attempt(missing, accuracy_by_steps, preds[name])
        acc["arithmetic_slip_share"][name] = _attempt(missing, arithmetic_slip_share, preds[name])
        expected = (scores[name] or {}).get("n")
        if isinstance(expected, int) and len(preds[name]) != expected:
            notes.append(f"eval/{name}/predictions.jsonl holds {len(preds[name])} problems but scores.json says "
                         f"{expected}: the evaluation may be unfinished; figures use the predictions.")
    if acc["base"]["value"] is not None and acc["tuned"]["value"] is not None:
        acc["gain_points"] = (acc["tuned"]["value"] - acc["base"]["value"]) * 100
    if preds["base"] and preds["tuned"]:
        correct = {name: {p["id"]: bool(p.get("correct_strict")) for p in preds[name]} for name in ("base", "tuned")}
        acc["paired"] = _attempt(missing, paired_table, correct["base"], correct["tuned"])
        if acc["paired"]:
            acc["mcnemar_p"] = mcnemar_exact_p(acc["paired"]["only_base"], acc["paired"]["only_tuned"])
            acc["regressions"] = regressions(preds["base"], preds["tuned"])
            if acc["paired"]["n"] < max(len(correct["base"]), len(correct["tuned"])):
                notes.append(f"The base and tuned evaluations cover different problems; the paired comparison uses "
                             f"the {acc['paired']['n']} they share.")
    return acc


def _robustness(preds: dict, scores: dict, tuned: dict, missing: list[str]) -> dict:
    """Base and tuned accuracy on fresh generated problems, and how far the tuned model drops there."""
    rob = {name: _model_accuracy(preds[name], scores[name], "strict") for name in ("base", "tuned")}
    rob["gap_points"] = None
    seeds = {int(m.group(1)) for name in ("base", "tuned")
             for text in [p.get("id") for p in preds[name] or []] + [(scores[name] or {}).get("split")]
             if isinstance(text, str) and (m := re.fullmatch(r"synthetic-(\d+)(?:-\d+)?", text))}
    rob["seed"] = seeds.pop() if len(seeds) == 1 else None
    if rob["base"]["total"] is None and rob["tuned"]["total"] is None:
        missing.append("No robustness evaluation (set eval.robustness_size or run mathtune eval --robustness), so "
                       "accuracy on fresh generated problems cannot be reported.")
    elif tuned["value"] is not None and rob["tuned"]["value"] is not None:
        rob["gap_points"] = (tuned["value"] - rob["tuned"]["value"]) * 100
    return rob


def _cost(metrics: list[dict], config: dict, train_result: dict | None, scores: dict, gain: float | None,
          missing: list[str]) -> dict:
    """Hours and USD of training and of each evaluation, cost per point gained, tokens and throughput."""
    cost_config = config.get("cost") or {}
    price = cost_config.get("price_per_hour")
    phases = []
    elapsed = [m["elapsed_s"] for m in metrics if isinstance(m.get("elapsed_s"), (int, float))]
    train_seconds = (train_result or {}).get("wall_clock_s") or (max(elapsed) if elapsed else None)
    if train_seconds:
        hardware = cost_config.get("hardware") or (train_result or {}).get("hardware")
        phases.append({"phase": "training", **cost(train_seconds / 3600, hardware, price)})
    for name in ("base", "tuned"):
        if scores[name] and isinstance(scores[name].get("elapsed_s"), (int, float)):
            phases.append({"phase": f"{name} evaluation",
                           **cost(scores[name]["elapsed_s"] / 3600, scores[name].get("hardware"), price)})
    unpriced = [p["phase"] for p in phases if p["usd"] is None]
    if not phases:
        missing.append("No wall-clock time was logged, so cost cannot be computed.")
    elif unpriced:
        missing.append(f"No price is known for the hardware of {', '.join(unpriced)}; set cost.price_per_hour "
                       "in the config to price it.")
    if gain is not None and gain <= 0:
        missing.append("The tuned model gained no accuracy over the base model, so there is no cost per point gained.")
    generated = [m["eval_generate_s"] for m in metrics if isinstance(m.get("eval_generate_s"), (int, float))]
    generate_s = (train_result or {}).get("generate_s")
    if generate_s is None and generated:
        generate_s = sum(generated)
    train_usd = next((p["usd"] for p in phases if p["phase"] == "training"), None)
    has_tokens = any(m.get("kind") == "train" for m in metrics)
    tokens = (_attempt(missing, throughput, metrics) if has_tokens else None) or {}
    return {
        "hours": sum(p["hours"] for p in phases) if phases else None,
        "usd": sum(p["usd"] for p in phases) if phases and not unpriced else None,
        "phases": phases,
        "usd_per_point": train_usd / gain if train_usd is not None and gain is not None and gain > 0 else None,
        "generate_s": generate_s,
        "generate_share": generate_s / train_seconds if generate_s is not None and train_seconds else None,
        "tokens": tokens.get("tokens"),
        "loss_tokens": tokens.get("loss_tokens"),
        "tokens_per_s": tokens.get("tokens_per_s"),
    }


def build_summary(
    config: dict,
    metrics: list[dict],
    example_losses: list[dict],
    questions: dict,
    gold_steps: dict,
    train_result: dict | None,
    base_preds: list[dict] | None,
    tuned_preds: list[dict] | None,
    base_scores: dict | None,
    tuned_scores: dict | None,
    data_info: dict | None,
    robustness_preds: dict | None = None,
    robustness_scores: dict | None = None,
) -> dict:
    """Every figure of the report, with its definition, and the list of what could not be computed and why."""
    config = config or {}
    missing: list[str] = []
    notes: list[str] = []
    metrics = latest_per_step(metrics or [])
    preds = {"base": base_preds, "tuned": tuned_preds}
    scores = {"base": base_scores, "tuned": tuned_scores}

    training = _training(metrics, (train_result or {}).get("steps_per_epoch"), missing, notes)
    stopping = _early_stopping(train_result, config, missing)
    outliers, outlier_stats = _outliers(example_losses or [], questions or {}, gold_steps or {}, missing)
    acc = _answers(preds, scores, missing, notes)
    cost_summary = _cost(metrics, config, train_result, scores, acc["gain_points"], missing)
    if data_info is None:
        missing.append("data.json is missing, so the data source is unknown.")
    data = data_info or {}
    summary = {
        "model": _config_value(config, "model", "name") or (base_scores or {}).get("model")
        or (tuned_scores or {}).get("model"),
        "data": {"source": data.get("source"), "synthetic": data.get("source") == "synthetic",
                 "description": data_description(data_info), "location": data_location(data_info),
                 "n_train": len(data["train_ids"]) if isinstance(data.get("train_ids"), list) else None,
                 "n_validation": len(data["validation_ids"]) if isinstance(data.get("validation_ids"), list) else None},
        "config": {"learning_rate": _config_value(config, "train", "learning_rate"),
                   "lora_r": _config_value(config, "lora", "r"), "epochs": _config_value(config, "train", "epochs")},
        **training,
        "early_stopping": stopping,
        "outliers": outliers,
        "outlier_stats": outlier_stats,
        "accuracy": acc,
        "robustness": _robustness({"base": None, "tuned": None} | (robustness_preds or {}),
                                  {"base": None, "tuned": None} | (robustness_scores or {}), acc["tuned"], missing),
        "evaluation": {name: {k: (scores[name] or {}).get(k) for k in ("split", "n", "shots", "max_new_tokens", "hardware")}
                       for name in ("base", "tuned")},
        "cost": cost_summary,
        "definitions": definitions(),
        "missing": missing,
        "notes": notes,
    }
    summary["recommendations"] = recommendations(summary)
    return summary
