"""`mathtune compare`: several runs (a sweep) side by side, as a Markdown table of their headline figures and as
one self-contained HTML page (config differences highlighted, accuracy with intervals, loss curves overlaid).

Each run is read from its directory alone: summary.json (written first where it is missing), config.yaml and
metrics.jsonl.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path

from mathtune.report.formats import fmt_md, fmt_num, fmt_p, fmt_pct, fmt_pct_points
from mathtune.report.pages import environment
from mathtune.report.plots import accuracy_runs_plot, loss_overlay_plot, run_color
from mathtune.report.records import read_config
from mathtune.report.render import write_report
from mathtune.runfiles import read_json, read_jsonl, write_text

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


@dataclass
class ComparedRun:
    name: str  # the directory's name, or its path where two runs share a name
    run_dir: Path
    summary: dict
    config: dict  # config.yaml as read
    metrics: list[dict]  # metrics.jsonl


def load_runs(run_dirs: list[Path]) -> list[ComparedRun]:
    """Each run's summary (re-rendering a run without summary.json), config and metrics."""
    run_dirs = [Path(d) for d in run_dirs]
    names = [d.name for d in run_dirs]
    runs = []
    for run_dir, name in zip(run_dirs, names):
        if not run_dir.is_dir():
            raise FileNotFoundError(f"{run_dir} is not a run directory")
        summary = read_json(run_dir / "summary.json") or write_report(run_dir)
        runs.append(ComparedRun(name if names.count(name) == 1 else str(run_dir), run_dir, summary,
                                read_config(run_dir / "config.yaml", []), read_jsonl(run_dir / "metrics.jsonl")))
    return runs


def compare_runs(run_dirs: list[Path]) -> str:
    """A Markdown table of several runs' summaries (a sweep), re-rendering any run without summary.json."""
    return markdown_table(load_runs(run_dirs))


def markdown_table(runs: list[ComparedRun]) -> str:
    """One row per run, the columns of COMPARE_COLUMNS."""
    rows = []
    for run in runs:
        cells = [fmt_md(run.name)]
        for key, _, fmt in COMPARE_COLUMNS:
            value = _dotted(run.summary, key)
            cells.append(fmt_md("n/a" if value is None else fmt(value)))
        rows.append("| " + " | ".join(cells) + " |")
    header = ["run"] + [title for _, title, _ in COMPARE_COLUMNS]
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows])


def flatten(config: dict, prefix: str = "") -> dict[str, object]:
    """A nested config as dotted keys ("train.learning_rate") with their values; lists stay whole."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_rows(configs: list[dict]) -> list[dict]:
    """Every setting any of the configs holds, in first-seen order: {"key", "per_run" (one value per config, None where
    absent), "differs"}. `name` and `output_dir` say where a run is, not how it ran, and are left out."""
    flat = [flatten(config) for config in configs]
    keys = list(dict.fromkeys(key for f in flat for key in f if key not in ("name", "output_dir")))
    rows = []
    for key in keys:
        values = [f.get(key) for f in flat]
        rows.append({"key": key, "per_run": values, "differs": any(v != values[0] for v in values[1:])})
    return rows


def accuracy_rows(runs: list[ComparedRun]) -> list[dict]:
    """Per run: base and tuned strict accuracy (with intervals), gain, McNemar p, what the evaluation could detect."""
    keys = ("base", "tuned", "gain_points", "mcnemar_p", "min_detectable_gain_points", "problems_for_5_points")
    rows = []
    for index, run in enumerate(runs):
        acc = run.summary.get("accuracy") or {}
        rows.append({"name": run.name, "color": run_color(index), "n": _dotted(run.summary, "accuracy.paired.n"),
                     **{key: acc.get(key) for key in keys}})
    return rows


def compare_html(runs: list[ComparedRun]) -> str:
    """The comparison page: self-contained (inline CSS, plots as data URIs, no scripts), every name escaped."""
    plots = {"loss": loss_overlay_plot([(run.name, run.metrics) for run in runs]),
             "accuracy": accuracy_runs_plot([(run.name, run.summary) for run in runs])}
    uris = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in plots.items() if png}
    rows = config_rows([run.config for run in runs])
    return environment().get_template("compare.html.j2").render(
        runs=runs, colors=[run_color(i) for i in range(len(runs))], accuracy=accuracy_rows(runs),
        differing=[r for r in rows if r["differs"]], same=[r for r in rows if not r["differs"]], plots=uris,
        headline=[(title, [fmt(v) if (v := _dotted(run.summary, key)) is not None else "n/a" for run in runs])
                  for key, title, fmt in COMPARE_COLUMNS])


def default_html_path(run_dirs: list[Path]) -> Path:
    """compare.html in the folder that holds the runs (runs/ for runs/a and runs/b): their common folder, or its
    parent when that is one of the runs itself."""
    resolved = [Path(d).resolve() for d in run_dirs]
    common = Path(os.path.commonpath(resolved))
    return (common.parent if common in resolved else common) / "compare.html"


def write_compare_html(run_dirs: list[Path], path: Path) -> list[ComparedRun]:
    """Write the comparison page of the runs to `path`; returns the runs as read."""
    runs = load_runs(run_dirs)
    write_text(Path(path), compare_html(runs))
    return runs
