"""report/compare.py: one Markdown row per run, re-rendering a run that has no summary.json yet."""

from __future__ import annotations

import shutil

from handmade import make_run
from mathtune.report.compare import COMPARE_COLUMNS, compare_runs
from mathtune.report.render import write_report


def test_compare_runs_one_row_per_run(tmp_path):
    first = make_run(tmp_path)
    write_report(first)
    second = tmp_path / "second"
    shutil.copytree(first, second)
    (second / "summary.json").unlink()
    lines = compare_runs([first, second]).splitlines()
    assert lines[0] == "| run | " + " | ".join(title for _, title, _ in COMPARE_COLUMNS) + " |"
    assert lines[1] == "|" + "---|" * (len(COMPARE_COLUMNS) + 1)
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| run", "| second"]
    assert lines[2].split(" | ")[1:] == lines[3].split(" | ")[1:]
    assert "| gemma-3-270m | 0.0002 | 8 | 2 |" in lines[2] and "| 25.0% | 55.0% |" in lines[2]
    assert (second / "summary.json").exists()

