"""report/plots.py: one PNG per plot the run has data for, none for the rest."""

from __future__ import annotations

import pytest

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


def _summary_with(base: tuple[int, int], tuned: tuple[int, int]) -> dict:
    from mathtune.report.stats import accuracy

    summary = build_summary(RunRecords())
    acc = summary["accuracy"]
    acc["base"], acc["tuned"] = accuracy(*base), accuracy(*tuned)
    acc["flexible"] = {"base": accuracy(*base), "tuned": accuracy(*tuned)}
    acc["by_steps"] = {"base": [{"steps": 2, **accuracy(*base)}], "tuned": [{"steps": 2, **accuracy(*tuned)}]}
    return summary


def test_accuracy_axes_follow_the_data_and_say_so():
    # 0.8% -> 3.2% on 250 problems: the intervals reach about 7.2%, so the axis ends near 8%, not at 100%.
    summary = _summary_with((2, 250), (8, 250))
    highest = summary["accuracy"]["tuned"]["ci95"][1] * 100
    for figure in (plots.accuracy_figure(summary), plots.accuracy_by_steps_figure(summary)):
        axes = figure.axes[0]
        low, high = axes.get_ylim()
        assert low == 0 and highest < high < 1.2 * highest
        assert "scaled to the data" in axes.get_ylabel()
    high_summary = _summary_with((40, 50), (48, 50))
    assert plots.accuracy_figure(high_summary).axes[0].get_ylim()[1] == 105  # near 100%: the full axis


def test_axis_top_has_room_above_the_highest_value_and_a_floor():
    assert plots.share_axis_top(10.0) == pytest.approx(11.5)
    assert plots.share_axis_top(0.0) == 1.0 and plots.share_axis_top(99.0) == 105.0
