"""`mathtune compare`: one Markdown table of several runs' headline figures (a sweep)."""

from __future__ import annotations

from pathlib import Path

from mathtune.report.formats import fmt_md, fmt_num, fmt_p, fmt_pct, fmt_pct_points
from mathtune.report.render import write_report
from mathtune.runfiles import read_json

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
