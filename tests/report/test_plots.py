"""report/plots.py: one PNG per plot the run has data for, none for the rest."""

from __future__ import annotations

from handmade import run_metrics
from mathtune.report import plots
from mathtune.report.records import RunRecords
from mathtune.report.summary import build_summary

PNG = b"\x89PNG\r\n\x1a\n"


def test_a_run_without_records_has_no_plots():
    summary = build_summary(RunRecords())
    assert plots.make_plots(summary, [], []) == {}
    assert plots.loss_plot(summary, []) is None and plots.accuracy_plot(summary) is None


def test_metrics_alone_give_the_training_plots():
    metrics = run_metrics()
    summary = build_summary(RunRecords(metrics=metrics))
    made = plots.make_plots(summary, metrics, [])
    assert list(made) == ["loss", "token_accuracy", "learning_rate", "exact_match"]
    assert all(png.startswith(PNG) for png in made.values())
    png, step_axis = plots.loss_plot(summary, metrics)
    assert png.startswith(PNG) and step_axis[0] < 10 and step_axis[1] > 400
