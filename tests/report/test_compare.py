"""report/compare.py: one Markdown row per run, re-rendering a run that has no summary.json yet, and the HTML page."""

from __future__ import annotations

import re
import shutil

import yaml

from handmade import make_run
from mathtune.report.compare import (
    COMPARE_COLUMNS, compare_runs, config_rows, default_html_path, load_runs, write_compare_html,
)
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



def two_runs(tmp_path):
    """The hand-made run, and a copy named with HTML in it whose learning rate differs."""
    first = make_run(tmp_path)
    second = tmp_path / "<b>lr&4e-4<i>"
    shutil.copytree(first, second)
    config = yaml.safe_load((second / "config.yaml").read_text())
    config["train"]["learning_rate"] = 4e-4
    (second / "config.yaml").write_text(yaml.safe_dump(config))
    return first, second


def test_compare_writes_a_self_contained_html_page_with_both_runs(tmp_path):
    first, second = two_runs(tmp_path)
    out = tmp_path / "sweep" / "compare.html"
    runs = write_compare_html([first, second], out)
    html = out.read_text()
    assert [run.name for run in runs] == ["run", "<b>lr&4e-4<i>"]
    assert "&lt;b&gt;lr&amp;4e-4&lt;i&gt;" in html and "<b>lr&" not in html
    # the differing setting is highlighted with each run's value; the same ones are listed apart
    differing = re.findall(r'<tr class="diff"><td class="key">([^<]*)</td>(.*?)</tr>', html)
    assert [key for key, _ in differing] == ["train.learning_rate"]
    assert "0.0002" in differing[0][1] and "0.0004" in differing[0][1]
    assert '<td class="key">lora.r</td>' in html.split("settings the same in every run")[1]
    # accuracy with intervals per run, and the two plots embedded
    assert html.count("25.0% <span class=\"muted\">(5/20; 11.2–46.9%)") == 2
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<script" not in html.lower() and "<link" not in html and "url(" not in html


def test_config_rows_mark_what_differs_and_leave_out_where_a_run_is():
    rows = config_rows([{"name": "a", "output_dir": "x", "train": {"epochs": 1, "report_to": []}, "lora": {"r": 8}},
                        {"name": "b", "output_dir": "y", "train": {"epochs": 2, "report_to": []}}])
    assert rows == [{"key": "train.epochs", "per_run": [1, 2], "differs": True},
                    {"key": "train.report_to", "per_run": [[], []], "differs": False},
                    {"key": "lora.r", "per_run": [8, None], "differs": True}]


def test_the_page_goes_beside_the_runs_by_default(tmp_path):
    assert default_html_path([tmp_path / "a", tmp_path / "b"]) == tmp_path.resolve() / "compare.html"
    assert default_html_path([tmp_path / "a", tmp_path / "a"]) == tmp_path.resolve() / "compare.html"


def test_two_runs_with_the_same_name_are_told_apart_by_their_path(tmp_path):
    first = make_run(tmp_path)
    (tmp_path / "other").mkdir()
    second = shutil.copytree(first, tmp_path / "other" / "run")
    assert [run.name for run in load_runs([first, second])] == [str(first), str(second)]
