"""The report of one run directory: summary.json, plots/*.png, report.md and report.html.

This module is the I/O edge: it reads the files described in docs/run-directory.md (each one
optional; runfiles drops a torn last JSONL line with a warning), hands them to
`analysis.build_summary`, and renders what comes back. Every output is written to a temporary
name and renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
from pathlib import Path

import jinja2
import yaml
from matplotlib.figure import Figure

from mathtune import data, synthetic
from mathtune.report import analysis
from mathtune.answers import count_reasoning_steps
from mathtune.runfiles import read_json, read_jsonl, write_text

TEMPLATES = Path(__file__).parent / "templates"
PLOT_NAMES = ["loss", "token_accuracy", "learning_rate", "example_losses", "accuracy", "accuracy_by_steps", "exact_match"]
COLORS = {"train": "#8fb3d9", "smooth": "#1f5fa8", "val": "#d9622b", "base": "#9aa3ad", "tuned": "#1f5fa8"}


# --- reading ------------------------------------------------------------------------------------


def read_config(path: Path, notes: list[str]) -> dict:
    """The resolved config, or {} (with a note) when it is absent or not a YAML mapping."""
    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        notes.append(f"{path.name} is not a valid YAML mapping and was ignored.")
        return {}
    return config


def source_problems(data_info: dict | None, ids: set[str]) -> dict[str, dict]:
    """Question text and gold step count of problems named only by id, from where the run got them.

    example_losses.jsonl names validation problems by id alone. Generated problems are regenerated
    from their seed (generate(n, seed) is a prefix of every longer run); GSM8K problems are re-read
    from the run's local files when they exist on this machine. Hub data is not fetched: rendering
    a report must not need the network.
    """
    source = (data_info or {}).get("source")
    location = analysis.data_location(data_info)
    problems: list[dict] = []
    # Generated ids name their seed, whatever the run's source (robustness problems come from a fresh seed).
    last_index: dict[int, int] = {}
    for problem_id in ids:
        match = re.fullmatch(r"synthetic-(\d+)-(\d+)", problem_id)
        if match:
            seed, index = int(match.group(1)), int(match.group(2))
            last_index[seed] = max(index, last_index.get(seed, 0))
    for seed, index in last_index.items():
        problems += synthetic.generate(index + 1, seed)
    if source == "gsm8k-local" and location and Path(location).is_dir():
        for split in {i.rpartition("-")[0] for i in ids} & {"train", "test"}:
            path = Path(location) / f"{split}.jsonl"
            if path.exists():
                problems += data.read_problems(path, split, skip_invalid=True)[0]
    return {p["id"]: {"question": p["question"], "gold_steps": count_reasoning_steps(p["answer"])}
            for p in problems if p["id"] in ids}


def load_run(run_dir: Path) -> tuple[dict, list[str]]:
    """build_summary's arguments read from the run directory, and notes on what was ignored."""
    notes: list[str] = []
    data_info = read_json(run_dir / "data.json")
    example_losses = read_jsonl(run_dir / "example_losses.jsonl")
    names = ("base", "tuned", "robustness-base", "robustness-tuned")
    preds = {name: read_jsonl(run_dir / "eval" / name / "predictions.jsonl") or None for name in names}
    scores = {name: read_json(run_dir / "eval" / name / "scores.json") for name in names}
    # Question text and gold steps: from the data source, then from any record that carries them.
    problems = source_problems(data_info, {r["id"] for r in example_losses if isinstance(r.get("id"), str)})
    for record in example_losses + [r for name in names for r in preds[name] or []]:
        if isinstance(record.get("id"), str) and isinstance(record.get("question"), str):
            problems.setdefault(record["id"], {}).update(
                {k: record[k] for k in ("question", "gold_steps") if record.get(k) is not None})
    inputs = {
        "config": read_config(run_dir / "config.yaml", notes),
        "metrics": read_jsonl(run_dir / "metrics.jsonl"),
        "example_losses": example_losses,
        "questions": {i: p["question"] for i, p in problems.items() if "question" in p},
        "gold_steps": {i: p["gold_steps"] for i, p in problems.items() if "gold_steps" in p},
        "train_result": read_json(run_dir / "train_result.json"),
        "base_preds": preds["base"],
        "tuned_preds": preds["tuned"],
        "base_scores": scores["base"],
        "tuned_scores": scores["tuned"],
        "data_info": data_info,
        "robustness_preds": {name: preds[f"robustness-{name}"] for name in ("base", "tuned")},
        "robustness_scores": {name: scores[f"robustness-{name}"] for name in ("base", "tuned")},
    }
    return inputs, notes


# --- plots --------------------------------------------------------------------------------------


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
    """Grouped bars of accuracy in percent with 95% interval whiskers; an absent figure leaves a gap."""
    width = 0.8 / len(models)
    for offset, (name, accs) in enumerate(models.items()):
        xs = [i + (offset - (len(models) - 1) / 2) * width for i in range(len(groups))]
        for x, acc in zip(xs, accs):
            if not acc or acc["value"] is None:
                continue
            low, high = acc["ci95"]
            axes.bar(x, acc["value"] * 100, width * 0.9, color=COLORS[name], label=name)
            axes.errorbar(x, acc["value"] * 100, yerr=[[(acc["value"] - low) * 100], [(high - acc["value"]) * 100]],
                          color="#222", capsize=4, linewidth=1)
            axes.annotate(f"{acc['value'] * 100:.0f}%", (x, high * 100), textcoords="offset points", xytext=(0, 3),
                          ha="center", fontsize=8, color="#222")
    axes.set_xticks(range(len(groups)), groups)
    axes.set_ylim(0, 105)
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    if unique:
        axes.legend(unique.values(), unique.keys(), fontsize=8, frameon=False)


def make_plots(summary: dict, metrics: list[dict], example_losses: list[dict]) -> dict[str, bytes]:
    """PNG bytes per plot name, for the plots the run has data for."""
    metrics = analysis.latest_per_step(metrics)
    plots = {}
    step_axis = None  # the loss plot's step range, shared by the exact-match plot so the two line up
    train_steps, train_losses, _ = analysis.series(metrics, "train", "loss")
    eval_steps, eval_losses, _ = analysis.series(metrics, "eval", "eval_loss")
    if train_steps or eval_steps:
        figure, axes = _figure("Loss", "step", "loss")
        if train_steps:
            axes.plot(train_steps, train_losses, color=COLORS["train"], linewidth=1, label="training (logged)")
            axes.plot(train_steps, analysis.rolling_mean(train_losses), color=COLORS["smooth"], linewidth=1.8,
                      label=f"training (rolling mean of {analysis.SMOOTHING})")
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
        plots["loss"] = _png(figure)

    train_acc = analysis.series(metrics, "train", "mean_token_accuracy")
    val_acc = analysis.series(metrics, "eval", "eval_mean_token_accuracy")
    if train_acc[0] or val_acc[0]:
        figure, axes = _figure("Token accuracy", "step", "share of tokens predicted")
        axes.plot(train_acc[0], train_acc[1], color=COLORS["smooth"], linewidth=1.2, label="training")
        axes.plot(val_acc[0], val_acc[1], "o-", color=COLORS["val"], markersize=4, label="validation")
        axes.legend(fontsize=8, frameon=False)
        plots["token_accuracy"] = _png(figure)

    lr_steps, lrs, _ = analysis.series(metrics, "train", "learning_rate")
    if lr_steps:
        figure, axes = _figure("Learning rate", "step", "learning rate", height=2.4)
        axes.plot(lr_steps, lrs, color=COLORS["smooth"], linewidth=1.5)
        axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        plots["learning_rate"] = _png(figure)

    step, records = analysis.last_evaluation_losses(example_losses)
    if records:
        stats = summary["outlier_stats"]
        figure, axes = _figure(f"Per-example validation loss at step {step}", "loss", "examples")
        axes.hist([r["loss"] for r in records], bins=min(40, max(10, len(records) // 5)), color=COLORS["train"],
                  edgecolor="white")
        axes.axvline(stats["median"], color="#444", linewidth=1, linestyle=":", label=f"median {stats['median']:.3g}")
        if stats["mad"]:
            axes.axvline(stats["loss_cutoff"], color=COLORS["val"], linewidth=1.5, linestyle="--",
                         label=f"outlier cut-off (robust z = {stats['threshold']}): {stats['loss_cutoff']:.3g}")
        axes.legend(fontsize=8, frameon=False)
        plots["example_losses"] = _png(figure)

    acc = summary["accuracy"]
    if acc["base"]["value"] is not None or acc["tuned"]["value"] is not None:
        figure, axes = _figure("Exact match on the evaluation set (95% Wilson interval)", "", "accuracy (%)")
        _accuracy_bars(axes, ["strict", "flexible"], {
            "base": [acc["base"], acc["flexible"]["base"]], "tuned": [acc["tuned"], acc["flexible"]["tuned"]]})
        plots["accuracy"] = _png(figure)

    by_steps = {name: {b["steps"]: b for b in acc["by_steps"][name] or []} for name in ("base", "tuned")}
    steps = sorted(by_steps["base"].keys() | by_steps["tuned"].keys())
    if steps:
        figure, axes = _figure("Exact match by number of reasoning steps (95% Wilson interval)",
                               "lines in the gold solution", "accuracy (%)")
        _accuracy_bars(axes, [str(s) for s in steps],
                       {name: [by_steps[name].get(s) for s in steps] for name in ("base", "tuned") if by_steps[name]})
        plots["accuracy_by_steps"] = _png(figure)

    em_steps, em, _ = analysis.series(metrics, "eval", "eval_exact_match_strict")
    if em_steps:
        figure, axes = _figure("Exact match on validation problems during training", "step", "exact match (%)")
        axes.plot(em_steps, [v * 100 for v in em], "o-", color=COLORS["tuned"], markersize=4, label="strict")
        flex_steps, flex, _ = analysis.series(metrics, "eval", "eval_exact_match_flexible")
        if flex_steps:
            axes.plot(flex_steps, [v * 100 for v in flex], "s--", color=COLORS["base"], markersize=3, label="flexible")
        if step_axis:
            axes.set_xlim(step_axis)
        axes.set_ylim(0, max([10.0, *(v * 115 for v in em + flex)]))  # shares: never below 0%, zeros stay readable
        axes.legend(fontsize=8, frameon=False)
        plots["exact_match"] = _png(figure)
    return plots


# --- rendering ----------------------------------------------------------------------------------


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def fmt_pct(value, digits: int = 1) -> str:
    """A share (0.24) as a percentage ("24.0%")."""
    return "n/a" if _missing(value) else f"{value * 100:.{digits}f}%"


def fmt_pct_points(value, digits: int = 1) -> str:
    """A figure already in percent (12.5) with its sign kept when negative."""
    return "n/a" if _missing(value) else f"{value:.{digits}f}%"


def fmt_num(value, digits: int = 3) -> str:
    if _missing(value):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}g}" if value and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.{digits}f}"


def fmt_p(value) -> str:
    if _missing(value):
        return "n/a"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def fmt_ci(ci95) -> str:
    """A 95% interval of a share as "14.3–37.4%"."""
    return "n/a" if not ci95 else f"{ci95[0] * 100:.1f}–{ci95[1] * 100:.1f}%"


def fmt_md(value) -> str:
    """Untrusted text for a Markdown table cell: HTML-escaped, pipes escaped, on one line."""
    text = "" if value is None else str(value)
    for raw, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("`", "\\`")):
        text = text.replace(raw, escaped)
    return " ".join(text.split())


def environment() -> jinja2.Environment:
    """Jinja with autoescape on for HTML: questions and generations are untrusted text."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "html.j2"), default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(pct=fmt_pct, pctp=fmt_pct_points, num=fmt_num, p=fmt_p, ci=fmt_ci, md=fmt_md)
    return env


def render(template: str, summary: dict, plots: dict[str, str], run_name: str) -> str:
    """`plots` maps a plot name to what the page links: a data URI for HTML, a relative path for Markdown."""
    return environment().get_template(template).render(s=summary, d=summary["definitions"], plots=plots, run=run_name)


# --- writing ------------------------------------------------------------------------------------


def write_bytes(path: Path, content: bytes) -> None:
    """runfiles.write_text for bytes (the plots): a temporary name in the same directory, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(content)
    os.replace(partial, path)


def write_report(run_dir: Path) -> dict:
    """Read the run directory, write summary.json, plots/*.png, report.md and report.html; return the summary."""
    run_dir = Path(run_dir)
    inputs, notes = load_run(run_dir)
    summary = analysis.build_summary(**inputs)
    summary["notes"].extend(notes)
    plots = make_plots(summary, inputs["metrics"], inputs["example_losses"])

    write_text(run_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    for name in PLOT_NAMES:  # a plot this run no longer has data for must not linger from an older report
        if name in plots:
            write_bytes(run_dir / "plots" / f"{name}.png", plots[name])
        else:
            (run_dir / "plots" / f"{name}.png").unlink(missing_ok=True)
    run_name = inputs["config"].get("name") or run_dir.name
    links = {name: f"plots/{name}.png" for name in plots}
    write_text(run_dir / "report.md", re.sub(r"\n{3,}", "\n\n", render("report.md.j2", summary, links, run_name)))
    uris = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in plots.items()}
    write_text(run_dir / "report.html", render("report.html.j2", summary, uris, run_name))
    return summary


# --- comparing runs -----------------------------------------------------------------------------

COMPARE_COLUMNS = [
    ("model", "model", str),
    ("config.learning_rate", "lr", fmt_num),
    ("config.lora_r", "r", fmt_num),
    ("config.epochs", "epochs", fmt_num),
    ("train_loss.decrease_pct", "train loss ↓", fmt_pct_points),
    ("val_loss.best", "best val loss", fmt_num),
    ("final_phase.verdict", "curve end", str),
    ("accuracy.base.value", "base acc", fmt_pct),
    ("accuracy.tuned.value", "tuned acc", fmt_pct),
    ("accuracy.gain_points", "gain (pts)", fmt_num),
    ("accuracy.mcnemar_p", "McNemar p", fmt_p),
    ("cost.hours", "hours", fmt_num),
    ("cost.usd", "USD", fmt_num),
]


def _dotted(summary: dict, key: str):
    node = summary
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def compare_runs(run_dirs: list[Path]) -> str:
    """A Markdown table of several runs' summaries (a sweep), re-rendering any run without summary.json."""
    rows = []
    for run_dir in run_dirs:
        summary = read_json(run_dir / "summary.json") or write_report(run_dir)
        cells = [fmt_md(run_dir.name)]
        for key, _, fmt in COMPARE_COLUMNS:
            value = _dotted(summary, key)
            cells.append(fmt_md("n/a" if value is None else fmt(value)))
        rows.append("| " + " | ".join(cells) + " |")
    header = ["run"] + [title for _, title, _ in COMPARE_COLUMNS]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])
