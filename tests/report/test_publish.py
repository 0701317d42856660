"""report/publish.py and render.publish_report: a copy of a run's report to share, without the data set's text."""

from __future__ import annotations

import copy
import json

import pytest

from handmade import make_run
from mathtune.cli import main
from mathtune.report.publish import NOTE, PUBLISHED_FILES, PublishError, without_text
from mathtune.report.render import publish_report, write_report

QUOTED = ("Sam has 3 pens", "Ann reads 4 pages", "alert(1)", "&lt;script&gt;", "&lt;i&gt;3 + 2", "3 + 2 = 6",
          "&lt;&lt;3+2=5&gt;&gt;", "<<3+2=5>>")


def test_without_text_drops_questions_solutions_and_generations_and_keeps_the_figures():
    summary = {
        "outliers": [{"id": "train-3", "question": "Q1", "loss": 4.0, "robust_z": 9.0, "tags": ["money"]}],
        "accuracy": {"base": {"correct": 1}, "regressions": [{"id": "test-0", "question": "Q2", "gold": "5",
                                                                "base_pred": "5", "tuned_pred": "6"}]},
        "examples": {"per_group": 1, "groups": [{"kind": "fixed", "shown": [{
            "id": "test-1", "question": "Q3", "gold": "5", "gold_solution": "S3",
            "base": {"lines": [{"text": "G1", "slip": False}], "pred_strict": "6", "slips": []},
            "tuned": {"lines": [{"text": "G2", "slip": True}], "pred_strict": "5",
                      "slips": [{"expression": "3+2", "claimed": "6", "value": "5"}]}}]}]},
        "notes": ["an earlier note"],
    }
    before = copy.deepcopy(summary)
    out = without_text(summary)
    assert summary == before  # the input is not changed
    assert "Q1" not in json.dumps(out) and "Q2" not in json.dumps(out) and "Q3" not in json.dumps(out)
    assert "S3" not in json.dumps(out) and "G1" not in json.dumps(out) and "G2" not in json.dumps(out)
    assert out["outliers"][0] == {"id": "train-3", "question": None, "loss": 4.0, "robust_z": 9.0, "tags": ["money"]}
    assert out["accuracy"]["regressions"][0]["tuned_pred"] == "6" and out["accuracy"]["base"] == {"correct": 1}
    shown = out["examples"]["groups"][0]["shown"][0]
    assert shown["tuned"]["slips"] == [{"expression": "3+2", "claimed": "6", "value": "5"}]
    assert shown["tuned"]["pred_strict"] == "5" and shown["base"]["lines"] is None
    assert out["text_left_out"] is True and out["notes"] == ["an earlier note", NOTE]


def test_published_copy_quotes_no_text_and_copies_only_the_named_records(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    dest = tmp_path / "published"
    summary, copied = publish_report(run, dest)

    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # the run directory is untouched
    assert set(copied) == {"config.yaml", "metrics.jsonl", "train_result.json",
                           "eval/base/scores.json", "eval/tuned/scores.json"}
    assert set(copied) <= set(PUBLISHED_FILES)
    written = {str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()}
    assert written == set(copied) | {"summary.json", "report.md", "report.html"} | {
        str(p.relative_to(run)) for p in (run / "plots").glob("*.png")}
    for name in ("summary.json", "report.md", "report.html"):
        text = (dest / name).read_text()
        for quoted in QUOTED:
            assert quoted not in text, (name, quoted)
    # The full report quotes them; the published one keeps the same figures and says what it left out.
    full = json.loads((run / "summary.json").read_text())
    assert "Sam has 3 pens" in (run / "report.md").read_text()
    assert summary["accuracy"]["base"] == full["accuracy"]["base"] and summary["accuracy"]["mcnemar_p"] == full[
        "accuracy"]["mcnemar_p"]
    assert [o["id"] for o in summary["outliers"]] == [o["id"] for o in full["outliers"]]
    html = (dest / "report.html").read_text()
    assert "left out of this published copy" in html and NOTE.split(":")[0] in html
    assert "left out of this published copy" in (dest / "report.md").read_text()


def test_a_destination_inside_the_run_directory_is_refused(tmp_path, capsys):
    run = make_run(tmp_path)
    with pytest.raises(PublishError, match="outside the run directory"):
        publish_report(run, run / "share")
    assert main(["report", str(run), "--publish", str(run)]) != 0
    assert "outside the run directory" in capsys.readouterr().err
    assert not (run / "share").exists() and not (run / "summary.json").exists()


def test_the_command_line_writes_the_copy(tmp_path, capsys):
    run = make_run(tmp_path)
    assert main(["report", str(run), "--publish", str(tmp_path / "out")]) == 0
    assert "data-set text and generations left out" in capsys.readouterr().out
    assert (tmp_path / "out" / "report.html").exists() and not (run / "report.html").exists()
