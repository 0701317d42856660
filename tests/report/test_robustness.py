"""Robustness evaluation: accuracy on fresh generated problems (a seed never trained on) beside GSM8K accuracy."""

import json
import shutil

import pytest

from mathtune import synthetic
from mathtune.report.pages import render
from mathtune.report.records import load_run, source_problems
from mathtune.report.summary import build_summary
from mathtune.cli import main
from mathtune.runfiles import read_jsonl

FAST = ["--preset", "tiny", "--data", "synthetic", "--set", "data.synthetic_size=60", "--set", "eval.limit=2",
        "--set", "eval.max_new_tokens=8"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", *FAST, "--output-dir", str(out), "--set", "eval.robustness_size=4"]) == 0
    return out / "tiny"


def test_run_reports_robustness_beside_accuracy(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    rob = summary["robustness"]
    assert rob["base"]["total"] == 4 and rob["tuned"]["total"] == 4 and rob["seed"] == 1234 + 1000
    assert rob["gap_points"] == pytest.approx((summary["accuracy"]["tuned"]["value"] - rob["tuned"]["value"]) * 100)
    assert not any("robustness" in m.lower() for m in summary["missing"])
    assert "<h2>Robustness</h2>" in (run_dir / "report.html").read_text()
    assert "## Robustness" in (run_dir / "report.md").read_text()


def test_eval_robustness_uses_a_fresh_seed_never_trained_on(run_dir):
    out = run_dir / "eval" / "robustness-tuned"
    shutil.rmtree(out)  # written by the run; the eval command must write it again on its own
    assert main(["eval", *FAST, "--model", str(run_dir), "--robustness", "4"]) == 0
    preds = read_jsonl(out / "predictions.jsonl")
    assert sorted(p["id"] for p in preds) == [f"synthetic-2234-{i}" for i in range(4)]
    assert json.loads((out / "scores.json").read_text())["shots"] == 0
    data = json.loads((run_dir / "data.json").read_text())
    trained = set(data["train_ids"]) | set(data["validation_ids"])
    train_questions = {p["question"] for p in synthetic.generate(60, 1234)}
    assert not any(p["id"] in trained or p["question"] in train_questions for p in preds)
    # The report finds the question text of the fresh seed's ids.
    assert source_problems(data, {p["id"] for p in preds}).keys() == {p["id"] for p in preds}


def test_without_a_robustness_evaluation_the_summary_says_it_is_missing(run_dir):
    records, _ = load_run(run_dir)
    for name in ("robustness-base", "robustness-tuned"):
        records.predictions[name] = records.scores[name] = None
    summary = build_summary(records)
    assert summary["robustness"]["tuned"]["total"] is None and summary["robustness"]["gap_points"] is None
    assert any("No robustness evaluation" in m for m in summary["missing"])
    assert "No robustness evaluation" in render("html", summary, {}, "x")


def test_robustness_size_is_validated(capsys):
    assert main(["eval", "--preset", "tiny", "--model", "tiny-random", "--robustness", "-1"]) == 2
    assert "eval.robustness_size must be >= 0" in capsys.readouterr().err
