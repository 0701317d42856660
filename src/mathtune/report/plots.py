"""The report's plots as PNG bytes: one function per plot, each None when the run has no data for it."""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from mathtune.report.curves import SMOOTHING, latest_per_step, rolling_mean, series
from mathtune.report.hard_examples import last_evaluation_losses

PLOT_NAMES = ["loss", "token_accuracy", "learning_rate", "example_losses", "accuracy", "accuracy_by_steps", "exact_match"]
COLORS = {"train": "#8fb3d9", "smooth": "#1f5fa8", "val": "#d9622b", "base": "#9aa3ad", "tuned": "#1f5fa8"}


def make_plots(summary: dict, metrics: list[dict], example_losses: list[dict]) -> dict[str, bytes]:
    """PNG bytes per plot name, for the plots the run has data for."""
    metrics = latest_per_step(metrics)
    loss = loss_plot(summary, metrics)
    step_axis = loss[1] if loss else None  # the loss plot's step range, shared by the exact-match plot
    plots = {
        "loss": loss[0] if loss else None,
        "token_accuracy": token_accuracy_plot(metrics),
        "learning_rate": learning_rate_plot(metrics),
        "example_losses": example_losses_plot(summary, example_losses),
        "accuracy": accuracy_plot(summary),
        "accuracy_by_steps": accuracy_by_steps_plot(summary),
        "exact_match": exact_match_plot(metrics, step_axis),
    }
    return {name: png for name, png in plots.items() if png is not None}


def loss_plot(summary: dict, metrics: list[dict]) -> tuple[bytes, tuple[float, float]] | None:
    """Training loss (logged and smoothed), validation loss, the final phase and the forecast; and its step range."""
    train_steps, train_losses, _ = series(metrics, "train", "loss")
    eval_steps, eval_losses, _ = series(metrics, "eval", "eval_loss")
    if not train_steps and not eval_steps:
        return None
    figure, axes = _figure("Loss", "step", "loss")
    if train_steps:
        axes.plot(train_steps, train_losses, color=COLORS["train"], linewidth=1, label="training (logged)")
        axes.plot(train_steps, rolling_mean(train_losses), color=COLORS["smooth"], linewidth=1.8,
                  label=f"training (rolling mean of {SMOOTHING})")
    if eval_steps:
        axes.plot(eval_steps, eval_losses, "o-", color=COLORS["val"], markersize=4, linewidth=1.5, label="validation")
    phase = summary["final_phase"]
    if phase["window_start_step"] is not None:
        axes.axvspan(phase["window_start_step"], phase["window_end_step"], color="#f2f2f2", zorder=0,
                     label=f"final phase ({phase['verdict']})")
    for point in (phase.get("forecast") or {}).get("points", []):
        low, high = point["ci95"]
        axes.errorbar(point["step"], point["loss"], yerr=[[point["loss"] - low], [high - point["loss"]]], fmt="D",
                      color=COLORS["smooth"], markerfacecolor="white", capsize=3,
                      label="forecast, +1 and +2 epochs" if point["epochs_ahead"] == 1 else None)
    axes.legend(fontsize=8, frameon=False)
    step_axis = axes.get_xlim()
    return _png(figure), step_axis


def token_accuracy_plot(metrics: list[dict]) -> bytes | None:
    train_acc = series(metrics, "train", "mean_token_accuracy")
    val_acc = series(metrics, "eval", "eval_mean_token_accuracy")
    if not train_acc[0] and not val_acc[0]:
        return None
    figure, axes = _figure("Token accuracy", "step", "share of tokens predicted")
    axes.plot(train_acc[0], train_acc[1], color=COLORS["smooth"], linewidth=1.2, label="training")
    axes.plot(val_acc[0], val_acc[1], "o-", color=COLORS["val"], markersize=4, label="validation")
    axes.legend(fontsize=8, frameon=False)
    return _png(figure)


def learning_rate_plot(metrics: list[dict]) -> bytes | None:
    lr_steps, lrs, _ = series(metrics, "train", "learning_rate")
    if not lr_steps:
        return None
    figure, axes = _figure("Learning rate", "step", "learning rate", height=2.4)
    axes.plot(lr_steps, lrs, color=COLORS["smooth"], linewidth=1.5)
    axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return _png(figure)


def example_losses_plot(summary: dict, example_losses: list[dict]) -> bytes | None:
    """Histogram of the last evaluation's per-example losses, with the median and the outlier cut-off."""
    step, records = last_evaluation_losses(example_losses)
    if not records:
        return None
    stats = summary["outlier_stats"]
    figure, axes = _figure(f"Per-example validation loss at step {step}", "loss", "examples")
    axes.hist([r["loss"] for r in records], bins=min(40, max(10, len(records) // 5)), color=COLORS["train"],
              edgecolor="white")
    axes.axvline(stats["median"], color="#444", linewidth=1, linestyle=":", label=f"median {stats['median']:.3g}")
    if stats["mad"]:
        axes.axvline(stats["loss_cutoff"], color=COLORS["val"], linewidth=1.5, linestyle="--",
                     label=f"outlier cut-off (robust z = {stats['threshold']}): {stats['loss_cutoff']:.3g}")
    axes.legend(fontsize=8, frameon=False)
    return _png(figure)


SCALED = "axis scaled to the data"  # said on every accuracy axis that does not run from 0 to 100%


def accuracy_plot(summary: dict) -> bytes | None:
    figure = accuracy_figure(summary)
    return _png(figure) if figure else None


def accuracy_figure(summary: dict) -> Figure | None:
    """Strict and flexible exact match of both models, with their intervals, on an axis that fits them."""
    acc = summary["accuracy"]
    if acc["base"]["value"] is None and acc["tuned"]["value"] is None:
        return None
    figure, axes = _figure("Exact match on the evaluation set (95% Wilson interval)", "", f"accuracy (%), {SCALED}")
    _accuracy_bars(axes, ["strict", "flexible"], {
        "base": [acc["base"], acc["flexible"]["base"]], "tuned": [acc["tuned"], acc["flexible"]["tuned"]]})
    return figure


def accuracy_by_steps_plot(summary: dict) -> bytes | None:
    figure = accuracy_by_steps_figure(summary)
    return _png(figure) if figure else None


def accuracy_by_steps_figure(summary: dict) -> Figure | None:
    by_steps = {name: {b["steps"]: b for b in summary["accuracy"]["by_steps"][name] or []} for name in ("base", "tuned")}
    steps = sorted(by_steps["base"].keys() | by_steps["tuned"].keys())
    if not steps:
        return None
    figure, axes = _figure("Exact match by number of reasoning steps (95% Wilson interval)",
                           "lines in the gold solution", f"accuracy (%), {SCALED}")
    _accuracy_bars(axes, [str(s) for s in steps],
                   {name: [by_steps[name].get(s) for s in steps] for name in ("base", "tuned") if by_steps[name]})
    return figure


def share_axis_top(highest_pct: float) -> float:
    """The top of an accuracy axis (percent) for values up to `highest_pct` (interval tops included): 15% above
    it, room for the value labels; at least 1 point, so an all-zero plot still has an axis; at most 105."""
    return min(105.0, max(1.0, highest_pct * 1.15))


def exact_match_plot(metrics: list[dict], step_axis: tuple[float, float] | None) -> bytes | None:
    """Exact match at the evaluations during training, on the loss plot's step axis so the two line up."""
    em_steps, em, _ = series(metrics, "eval", "eval_exact_match_strict")
    if not em_steps:
        return None
    figure, axes = _figure("Exact match on validation problems during training", "step", f"exact match (%), {SCALED}")
    axes.plot(em_steps, [v * 100 for v in em], "o-", color=COLORS["tuned"], markersize=4, label="strict")
    flex_steps, flex, _ = series(metrics, "eval", "eval_exact_match_flexible")
    if flex_steps:
        axes.plot(flex_steps, [v * 100 for v in flex], "s--", color=COLORS["base"], markersize=3, label="flexible")
    if step_axis:
        axes.set_xlim(step_axis)
    axes.set_ylim(0, share_axis_top(max(v * 100 for v in em + flex)))
    axes.legend(fontsize=8, frameon=False)
    return _png(figure)


# --- several runs (mathtune compare) ----------------------------------------------------------------------------------

RUN_COLORS = ["#1f5fa8", "#d9622b", "#2e8b57", "#8e44ad", "#b8860b", "#c0392b", "#16a085", "#7f8c8d"]


def run_color(index: int) -> str:
    """The colour of the index-th run in every comparison plot."""
    return RUN_COLORS[index % len(RUN_COLORS)]


def loss_overlay_plot(runs: list[tuple[str, list[dict]]]) -> bytes | None:
    """Training loss (rolling mean, solid) and validation loss (dashed, dots) of several runs on one pair of axes;
    `runs`: (name, metrics.jsonl records) per run. None when no run logged a loss."""
    figure, axes = _figure("Loss of each run", "step", "loss")
    drawn = False
    for index, (name, metrics) in enumerate(runs):
        metrics = latest_per_step(metrics)
        train_steps, train_losses, _ = series(metrics, "train", "loss")
        eval_steps, eval_losses, _ = series(metrics, "eval", "eval_loss")
        if train_steps:
            axes.plot(train_steps, rolling_mean(train_losses), color=run_color(index), linewidth=1.6,
                      label=f"{name}: training (rolling mean of {SMOOTHING})")
        if eval_steps:
            axes.plot(eval_steps, eval_losses, "o--", color=run_color(index), markersize=3.5, linewidth=1.2,
                      label=f"{name}: validation")
        drawn = drawn or bool(train_steps or eval_steps)
    if not drawn:
        return None
    axes.legend(fontsize=8, frameon=False)
    return _png(figure)


def accuracy_runs_plot(runs: list[tuple[str, dict]]) -> bytes | None:
    """Base and tuned strict exact match of several runs with their intervals; `runs`: (name, summary) per run."""
    accs = [(name, summary.get("accuracy") or {}) for name, summary in runs]
    if not any((acc.get(model) or {}).get("value") is not None for _, acc in accs for model in ("base", "tuned")):
        return None
    figure, axes = _figure("Exact match (strict) of each run (95% Wilson interval)", "", f"accuracy (%), {SCALED}")
    _accuracy_bars(axes, [name for name, _ in accs],
                   {model: [acc.get(model) for _, acc in accs] for model in ("base", "tuned")})
    return _png(figure)


def _figure(title: str, xlabel: str, ylabel: str, height: float = 3.2) -> tuple[Figure, object]:
    figure = Figure(figsize=(8.2, height), dpi=120, layout="constrained")
    axes = figure.subplots()
    axes.set_title(title, loc="left", fontsize=11, fontweight="bold", color="#222")
    axes.set_xlabel(xlabel, fontsize=9, color="#444")
    axes.set_ylabel(ylabel, fontsize=9, color="#444")
    axes.grid(True, color="#e5e5e5", linewidth=0.8)
    axes.set_axisbelow(True)
    axes.tick_params(labelsize=8, colors="#444")
    for side in ("top", "right"):
        axes.spines[side].set_visible(False)
    return figure, axes


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _accuracy_bars(axes, groups: list[str], models: dict[str, list[dict | None]]) -> None:
    """Grouped bars of accuracy in percent with 95% interval whiskers; an absent figure leaves a gap. The axis runs
    from 0 to just above the highest interval, so 0.8% against 3.2% is not two slivers under an empty 100%."""
    width = 0.8 / len(models)
    highest = 0.0
    for offset, (name, accs) in enumerate(models.items()):
        xs = [i + (offset - (len(models) - 1) / 2) * width for i in range(len(groups))]
        for x, acc in zip(xs, accs):
            if not acc or acc["value"] is None:
                continue
            low, high = acc["ci95"]
            axes.bar(x, acc["value"] * 100, width * 0.9, color=COLORS[name], label=name)
            axes.errorbar(x, acc["value"] * 100, yerr=[[(acc["value"] - low) * 100], [(high - acc["value"]) * 100]],
                          color="#222", capsize=4, linewidth=1)
            highest = max(highest, high * 100)
            value = acc["value"] * 100
            axes.annotate(f"{value:.{1 if 0 < value < 10 else 0}f}%", (x, high * 100), textcoords="offset points",
                          xytext=(0, 3), ha="center", fontsize=8, color="#222")
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylim(0, share_axis_top(highest))
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes.legend(unique.values(), unique.keys(), fontsize=8, frameon=False)
