"""Training curves from metrics.jsonl: loss decrease, the final phase and its forecast, the
train/validation gap, overfitting, early stopping, and whether loss and exact match agree.

Pure functions on lists of steps and values; a figure the inputs do not support raises
NotComputable with the reason.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from mathtune.report.stats import NotComputable

FINAL_FRACTION = 0.1  # the final phase: the last 10% of the training steps done
SMOOTHING = 5  # trailing rolling mean over this many logged training losses
ALPHA = 0.05  # significance level of the final-phase slope test
MIN_POINTS = 5  # fewest logged losses a slope test or a fit is run on
OVERFIT_RISES = 3  # consecutive validation-loss rises that count as overfitting
END_TRIM = 0.2  # share cut from each side of a window of logs before averaging (loss_ends)


def latest_per_step(records: list[dict]) -> list[dict]:
    """The last record per (kind, step), in step order: a resumed run re-logs the steps after its checkpoint."""
    latest = {(r.get("kind"), r.get("step")): r for r in records if isinstance(r.get("step"), int)}
    return sorted(latest.values(), key=lambda r: r["step"])


def series(metrics: list[dict], kind: str, key: str) -> tuple[list[int], list[float], int]:
    """Steps and finite values of one metric, and how many values were not finite (NaN or inf)."""
    pairs = [(m["step"], m[key]) for m in metrics if m.get("kind") == kind and isinstance(m.get(key), (int, float))]
    finite = [(s, float(v)) for s, v in pairs if math.isfinite(v)]
    return [s for s, _ in finite], [v for _, v in finite], len(pairs) - len(finite)


def loss_decrease_pct(first: float | None, last: float | None) -> float | None:
    """Relative decrease from first to last in percent (negative: the loss rose); None without both."""
    if first is None or last is None or first == 0:
        return None
    return (first - last) / first * 100


def loss_ends(values: list[float], fraction: float = FINAL_FRACTION, window: int = SMOOTHING,
              trim: float = END_TRIM) -> dict:
    """The loss level at the start and at the end of training: trimmed means of the first and last logs.

    Each log is one batch (or one logging interval), so a single first or last log carries the
    batch-to-batch noise; comparing two of them reads a true fall as a rise in a sizeable share of
    runs. Each end is instead the mean of its `window` logs, as the final phase smooths (or the
    first and last `fraction` of the logs on a long run; at most half the logs each, at least
    one), after cutting the `trim` share of the highest and lowest values on each side, so that
    one spike does not decide the figure.
    """
    if not values:
        return {"first": None, "last": None, "window": None}
    k = max(1, min(len(values) // 2, max(window, math.ceil(fraction * len(values)))))
    return {"first": float(stats.trim_mean(values[:k], trim)), "last": float(stats.trim_mean(values[-k:], trim)),
            "window": k}


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
    fit = stats.linregress(steps[start:], losses[start:], alternative="less")
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
    fit = stats.linregress(x, y)
    n = len(x)
    residual_sd = math.sqrt(float(np.sum((y - (fit.intercept + fit.slope * x)) ** 2)) / (n - 2))
    sxx = float(np.sum((x - x.mean()) ** 2))
    t = stats.t.ppf(0.975, n - 2)
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
        result = stats.spearmanr(losses, exact)
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

