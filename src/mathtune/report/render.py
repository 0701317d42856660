"""`mathtune report`: read a run directory, write summary.json, plots/*.png, report.md and report.html.

This module is the writing edge: records.load_run reads the run, summary.build_summary computes
every figure, plots and pages draw them. Every output is written to a temporary name and
renamed, so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from mathtune.report.pages import render
from mathtune.report.plots import PLOT_NAMES, make_plots
from mathtune.report.publish import PublishError, copy_records, without_text
from mathtune.report.records import RunRecords, load_run
from mathtune.report.summary import build_summary
from mathtune.runfiles import write_bytes, write_text


def write_report(run_dir: Path) -> dict:
    """Read the run directory, write summary.json, plots/*.png, report.md and report.html; return the summary."""
    run_dir = Path(run_dir)
    summary, records = _summarise(run_dir)
    _write_outputs(run_dir, summary, records, records.config.get("name") or run_dir.name)
    return summary


def publish_report(run_dir: Path, dest: Path) -> tuple[dict, list[str]]:
    """The run's report without data-set text or generations, and its small records, written to dest
    (mathtune.report.publish); returns the summary and the records copied. The run directory is not changed."""
    run_dir, dest = Path(run_dir), Path(dest)
    if dest.resolve() == run_dir.resolve() or run_dir.resolve() in dest.resolve().parents:
        raise PublishError(f"--publish {dest}: choose a directory outside the run directory {run_dir}")
    summary, records = _summarise(run_dir)
    summary = without_text(summary)
    dest.mkdir(parents=True, exist_ok=True)
    copied = copy_records(run_dir, dest)
    _write_outputs(dest, summary, records, records.config.get("name") or run_dir.name)
    return summary, copied


def _summarise(run_dir: Path) -> tuple[dict, RunRecords]:
    records, notes = load_run(run_dir)
    summary = build_summary(records)
    summary["notes"].extend(notes)
    return summary, records


def _write_outputs(out_dir: Path, summary: dict, records: RunRecords, run_name: str) -> None:
    """summary.json, plots/*.png, report.md and report.html in out_dir."""
    plots = make_plots(summary, records.metrics, records.example_losses)
    write_text(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=False) + "\n")
    for name in PLOT_NAMES:  # a plot this run no longer has data for must not linger from an older report
        if name in plots:
            write_bytes(out_dir / "plots" / f"{name}.png", plots[name])
        else:
            (out_dir / "plots" / f"{name}.png").unlink(missing_ok=True)
    links = {name: f"plots/{name}.png" for name in plots}
    write_text(out_dir / "report.md", re.sub(r"\n{3,}", "\n\n", render("md", summary, links, run_name)))
    uris = {name: "data:image/png;base64," + base64.b64encode(png).decode() for name, png in plots.items()}
    write_text(out_dir / "report.html", render("html", summary, uris, run_name))
