"""report.py on run directories built by hand in tmp_path, following docs/run-directory.md."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from conftest import REQUIRED_SUMMARY_KEYS, summary_lookup
from mathtune.report import render as report

EVIL = 'Tom has <script>alert(1)</script> 3 <b>bold</b> apples & 2 pears | "quoted". How many?'


def _write_jsonl(path: Path, records: list[dict], torn_tail: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (torn_tail or ""))


def _metrics(n_logs: int = 40, eval_every: int = 5) -> list[dict]:
    records = []
    for i in range(1, n_logs + 1):
        step = 10 * i
        records.append({"kind": "train", "step": step, "epoch": step / 200, "elapsed_s": step * 2.0,
                        "loss": 1.2 * step**-0.25 + 0.3 + 0.01 * math.sin(i), "learning_rate": 2e-4 * (1 - step / 500),
                        "grad_norm": 1.0, "mean_token_accuracy": 0.6 + 0.1 * i / n_logs,
                        "num_tokens": step * 900, "num_loss_tokens": step * 300})
        if i % eval_every == 0:
            records.append({"kind": "eval", "step": step, "epoch": step / 200, "elapsed_s": step * 2.0 + 1,
                            "eval_loss": 1.2 * step**-0.2 + 0.35, "eval_mean_token_accuracy": 0.62 + 0.08 * i / n_logs,
                            "eval_exact_match_strict": 0.1 + 0.005 * i, "eval_exact_match_flexible": 0.12 + 0.005 * i,
                            "eval_exact_match_n": 20, "eval_generate_s": 3.0})
    return records


def _prediction(i: int, correct: bool, question: str = "Sam has 3 pens and buys 2. How many pens?") -> dict:
    return {"id": f"test-{i}", "question": question, "gold": "5", "gold_steps": 2 + i % 3,
            "generation": "3 + 2 = <<3+2=5>>5\n#### 5" if correct else "<i>3 + 2 = 6</i>\n#### 6",
            "generated_tokens": 20, "pred_strict": "5" if correct else "6", "pred_flexible": "5" if correct else "6",
            "correct_strict": correct, "correct_flexible": correct,
            "arithmetic": [{"expression": "3+2", "claimed": "5" if correct else "6", "value": "5", "ok": correct}],
            "arithmetic_slip": not correct}


def _scores(predictions: list[dict], model: str, shots: int) -> dict:
    correct = sum(p["correct_strict"] for p in predictions)
    block = {"correct": correct, "total": len(predictions), "value": correct / len(predictions), "ci95": [0, 1]}
    return {"model": model, "adapter": None, "split": "test", "n": len(predictions), "shots": shots,
            "ids_sha256": "x", "strict": block, "flexible": block, "arithmetic_slip_share": 0.5,
            "accuracy_by_steps": {}, "elapsed_s": 360.0, "problems_per_s": 0.1, "generated_tokens_per_s": 5.0,
            "max_new_tokens": 256, "hardware": "NVIDIA H100 80GB HBM3"}


def make_run(root: Path, evaluate: bool = True, source: str = "synthetic") -> Path:
    """A small complete run: 40 training logs, 8 evaluations, 40 validation losses, base and tuned evaluations."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "hand-made", "model": {"name": "gemma-3-270m"},
        "train": {"learning_rate": 2e-4, "early_stopping_patience": 5, "epochs": 2}, "lora": {"r": 8},
        "cost": {"hardware": None, "price_per_hour": None}}))
    (run / "data.json").write_text(json.dumps({"source": source, "path": None, "train_ids": ["train-0"] * 90,
                                               "validation_ids": [f"train-{i}" for i in range(40)]}))
    _write_jsonl(run / "metrics.jsonl", _metrics())
    losses = [{"step": 400, "id": f"train-{i}", "loss": 0.8 + 0.005 * i, "token_accuracy": 0.7, "n_tokens": 90,
               "question": "Ann reads 4 pages a day. How many pages in 3 days?", "gold_steps": 2} for i in range(40)]
    losses[3].update(loss=4.0, question=EVIL)
    _write_jsonl(run / "example_losses.jsonl", losses)
    (run / "train_result.json").write_text(json.dumps({
        "early_stopping_triggered": False, "best_step": 400, "best_metric": 0.7, "total_steps_planned": 400,
        "steps_done": 400, "hardware": "NVIDIA H100 80GB HBM3"}))
    if evaluate:
        base = [_prediction(i, i % 4 == 0, EVIL if i == 0 else "Sam has 3 pens and buys 2. How many pens?")
                for i in range(20)]
        tuned = [_prediction(i, i % 2 == 1 or i == 4, EVIL if i == 0 else "Sam has 3 pens and buys 2. How many pens?")
                 for i in range(20)]
        _write_jsonl(run / "eval" / "base" / "predictions.jsonl", base)
        _write_jsonl(run / "eval" / "tuned" / "predictions.jsonl", tuned)
        (run / "eval" / "base" / "scores.json").write_text(json.dumps(_scores(base, "gemma-3-270m", 8)))
        (run / "eval" / "tuned" / "scores.json").write_text(json.dumps(_scores(tuned, "gemma-3-270m", 0)))
    return run




def test_full_report_writes_every_output(tmp_path):
    run = make_run(tmp_path)
    summary = report.write_report(run)
    on_disk = json.loads((run / "summary.json").read_text())
    for key in REQUIRED_SUMMARY_KEYS:
        summary_lookup(on_disk, key)
    for key in ("base", "tuned"):
        assert set(on_disk["accuracy"][key]) == {"correct", "total", "value", "ci95"}
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["accuracy"]["base"]["correct"] == 5 and on_disk["accuracy"]["tuned"]["correct"] == 11
    assert on_disk["outliers"][0]["id"] == "train-3"
    for name in report.PLOT_NAMES:
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (run / "report.html").read_text()
    head = html.split("<h2>", 1)[0]
    assert "gemma-3-270m" in head and "synthetic problems (not GSM8K)" in head
    assert "25.0%" in head and "55.0%" in head and "McNemar p" in head
    assert "plots/" in (run / "report.md").read_text()
    assert not list(run.rglob("*.partial"))


def test_html_escapes_untrusted_text(tmp_path):
    run = make_run(tmp_path)
    report.write_report(run)
    html = (run / "report.html").read_text()
    assert "<script" not in html.lower() and "<b>bold" not in html and "<i>3" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    # The question appears escaped in both the outlier table and the regressions table.
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 2
    markdown = (run / "report.md").read_text()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown and "\\|" in markdown


def test_html_is_self_contained(tmp_path):
    run = make_run(tmp_path)
    report.write_report(run)
    html = (run / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_report_with_only_metrics_lists_what_is_missing(tmp_path):
    run = tmp_path / "run"
    _write_jsonl(run / "metrics.jsonl", _metrics())
    summary = report.write_report(run)
    assert summary["accuracy"]["base"]["value"] is None and summary["accuracy"]["mcnemar_p"] is None
    assert summary["train_loss"]["decrease_pct"] is not None
    missing = " ".join(summary["missing"])
    for fragment in ("No base-model evaluation", "No tuned-model evaluation", "train_result.json is missing",
                     "example_losses.jsonl is missing", "data.json is missing"):
        assert fragment in missing
    html = (run / "report.html").read_text()
    assert "No base-model evaluation" in html and "this report covers training only" in html
    assert {p.stem for p in (run / "plots").glob("*.png")} == {"loss", "token_accuracy", "learning_rate", "exact_match"}


def test_empty_run_dir_does_not_fail(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    summary = report.write_report(run)
    assert summary["train_loss"]["first"] is None and summary["missing"]
    assert (run / "report.html").exists() and (run / "report.md").exists()


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    _write_jsonl(run / "metrics.jsonl", _metrics(), torn_tail='{"kind": "train", "step": 41')
    summary = report.write_report(run)
    assert summary["train_loss"]["last_step"] == 400
    assert "torn last line" in capsys.readouterr().err


def test_bad_line_in_the_middle_raises(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        report.write_report(run)


def test_gsm8k_questions_come_from_the_local_files(tmp_path):
    data = tmp_path / "gsm8k"
    data.mkdir()
    lines = [{"question": f"Question {i}?", "answer": "Step one.\nStep two.\n#### 4"} for i in range(5)]
    (data / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    found = report.source_problems({"source": "gsm8k-local", "location": str(data)}, {"train-1", "train-4", "train-9"})
    assert found == {"train-1": {"question": "Question 1?", "gold_steps": 2},
                     "train-4": {"question": "Question 4?", "gold_steps": 2}}


def test_synthetic_questions_are_regenerated_from_their_seed():
    from mathtune import synthetic

    expected = synthetic.generate(8, 77)
    found = report.source_problems({"source": "synthetic"}, {"synthetic-77-2", "synthetic-77-7"})
    assert set(found) == {"synthetic-77-2", "synthetic-77-7"}
    assert found["synthetic-77-7"]["question"] == expected[7]["question"]
    assert found["synthetic-77-7"]["gold_steps"] == expected[7]["steps"]


def test_stale_plots_are_removed(tmp_path):
    run = make_run(tmp_path)
    report.write_report(run)
    for name in ("base", "tuned"):
        for path in (run / "eval" / name).iterdir():
            path.unlink()
    report.write_report(run)
    assert not (run / "plots" / "accuracy.png").exists() and (run / "plots" / "loss.png").exists()
