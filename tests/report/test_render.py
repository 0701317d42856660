"""report/render.py: write_report on run directories built by hand in tmp_path, following docs/run-directory.md."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REQUIRED_SUMMARY_KEYS, summary_lookup
from handmade import make_run, run_metrics, write_jsonl
from mathtune.report.plots import PLOT_NAMES
from mathtune.report.render import write_report


def test_full_report_writes_every_output(tmp_path):
    run = make_run(tmp_path)
    summary = write_report(run)
    on_disk = json.loads((run / "summary.json").read_text())
    for key in REQUIRED_SUMMARY_KEYS:
        summary_lookup(on_disk, key)
    for key in ("base", "tuned"):
        assert set(on_disk["accuracy"][key]) == {"correct", "total", "value", "ci95"}
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["accuracy"]["base"]["correct"] == 5 and on_disk["accuracy"]["tuned"]["correct"] == 11
    assert on_disk["outliers"][0]["id"] == "train-3"
    for name in PLOT_NAMES:
        assert (run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    html = (run / "report.html").read_text()
    head = html.split("<h2>", 1)[0]
    assert "gemma-3-270m" in head and "synthetic problems (not GSM8K)" in head
    assert "25.0%" in head and "55.0%" in head and "McNemar p" in head
    assert "plots/" in (run / "report.md").read_text()
    assert not list(run.rglob("*.partial"))


def test_html_escapes_untrusted_text(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    html = (run / "report.html").read_text()
    assert "<script" not in html.lower() and "<b>bold" not in html and "<i>3" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    # The question appears escaped in both the outlier table and the regressions table.
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 2
    markdown = (run / "report.md").read_text()
    assert "<script>" not in markdown and "&lt;script&gt;" in markdown and "\\|" in markdown


def test_html_is_self_contained(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    html = (run / "report.html").read_text()
    sources = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert sources and all(s.startswith(("data:image/png;base64,", "#")) for s in sources)
    assert "<link" not in html and "@import" not in html and "url(" not in html


def test_report_with_only_metrics_lists_what_is_missing(tmp_path):
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", run_metrics())
    summary = write_report(run)
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
    summary = write_report(run)
    assert summary["train_loss"]["first"] is None and summary["missing"]
    assert (run / "report.html").exists() and (run / "report.md").exists()


def test_torn_last_line_is_skipped_with_a_warning(tmp_path, capsys):
    run = tmp_path / "run"
    write_jsonl(run / "metrics.jsonl", run_metrics(), torn_tail='{"kind": "train", "step": 41')
    summary = write_report(run)
    assert summary["train_loss"]["last_step"] == 400
    assert "torn last line" in capsys.readouterr().err


def test_bad_line_in_the_middle_raises(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl:2"):
        write_report(run)


def test_stale_plots_are_removed(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    for name in ("base", "tuned"):
        for path in (run / "eval" / name).iterdir():
            path.unlink()
    write_report(run)
    assert not (run / "plots" / "accuracy.png").exists() and (run / "plots" / "loss.png").exists()


def test_report_top_says_why_there_is_no_gain_on_unpaired_problems(tmp_path):
    run = make_run(tmp_path)
    tuned_path = run / "eval" / "tuned" / "predictions.jsonl"
    tuned = [json.loads(line) for line in tuned_path.read_text().splitlines()]
    write_jsonl(tuned_path, [{**p, "id": p["id"].replace("test-", "train-")} for p in tuned])
    scores = json.loads((run / "eval" / "tuned" / "scores.json").read_text())
    (run / "eval" / "tuned" / "scores.json").write_text(json.dumps({**scores, "ids_sha256": "other"}))
    summary = write_report(run)
    assert summary["accuracy"]["gain_points"] is None and summary["cost"]["usd_per_point"] is None
    reason = "base and tuned were scored on different problems: no paired gain"
    markdown_top = (run / "report.md").read_text().split("\n## ", 1)[0]
    html_top = (run / "report.html").read_text().split("<h2", 1)[0]
    assert reason in markdown_top.lower() and reason in html_top.lower()
    assert "+30.0" not in markdown_top and "+30.0" not in html_top  # 55% - 25% over different problems


def test_markdown_escapes_values_from_run_files(tmp_path):
    run = make_run(tmp_path)
    scores_path = run / "eval" / "base" / "scores.json"
    scores = json.loads(scores_path.read_text())
    scores_path.write_text(json.dumps({**scores, "shots": "8 | <b>x</b>", "n": "20 | <i>y</i>"}))
    result = json.loads((run / "train_result.json").read_text())
    (run / "train_result.json").write_text(json.dumps({**result, "best_metric_name": "eval_loss | <script>z"}))
    write_report(run)
    markdown = (run / "report.md").read_text()
    assert "<b>" not in markdown and "<i>" not in markdown and "<script>" not in markdown
    assert "8 \\| &lt;b&gt;x&lt;/b&gt;-shot" in markdown and "eval_loss \\| &lt;script&gt;z" in markdown
    html = (run / "report.html").read_text()
    assert "<b>x" not in html and "<script>z" not in html


def test_what_the_model_wrote_is_in_both_pages_collapsed_and_escaped(tmp_path):
    run = make_run(tmp_path)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config + "report:\n  examples_per_group: 10\n")
    summary = write_report(run)
    groups = summary["examples"]["groups"]
    assert [(g["kind"], g["total"], len(g["shown"])) for g in groups] == [("fixed", 10, 10), ("broken", 4, 4),
                                                                          ("both_wrong", 5, 5)]
    ids = [e["id"] for g in groups for e in g["shown"]]
    html = (run / "report.html").read_text()
    section = html.split("What the model wrote</h2>")[1].split("<h2")[0]
    assert section.count('<details class="example">') == len(ids) == 19 and "<details open" not in section
    assert re.findall(r'<span class="id">([^<]*)</span>', section) == ids
    # test-0 (its question holds HTML) was broken; its base and tuned generations and the slip are shown escaped
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in section and "<script" not in section
    assert "<mark>&lt;i&gt;3 + 2 = 6&lt;/i&gt;</mark>" in section and "<i>3" not in section
    assert section.count("Arithmetic slip: 3+2 = 6, but 3+2 = 5") == 10 + 4 + 5 * 2
    markdown = (run / "report.md").read_text()
    md_section = markdown.split("## What the model wrote")[1].split("\n## ")[0]
    assert re.findall(r"<summary>(test-\d+):", md_section) == ids
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in md_section and "<script" not in md_section
    assert "<mark>&lt;i&gt;3 + 2 = 6&lt;/i&gt;</mark>   ← arithmetic slip" in md_section
    assert all(line == "" for line in re.findall(r"^(.*)\n<pre>$", md_section, re.M))  # each <pre> its own block


def test_the_headline_says_what_the_evaluation_could_detect(tmp_path):
    run = make_run(tmp_path)
    summary = write_report(run)
    points = f"{summary['accuracy']['min_detectable_gain_points']:.1f} points"
    needed = f"{summary['accuracy']['problems_for_5_points']:,}"
    html_top = (run / "report.html").read_text().split("<h2", 1)[0]
    markdown_top = (run / "report.md").read_text().split("\n## ", 1)[0]
    for top in (html_top, markdown_top):
        assert "Could this evaluation see a gain? On 20 paired problems" in top
        assert points in top and needed in top


def test_the_evaluation_protocol_is_named_where_the_scores_give_it(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    assert "protocol" not in (run / "report.md").read_text().split("\n## ", 1)[0]  # scores.json without one
    for name in ("base", "tuned"):
        path = run / "eval" / name / "scores.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "protocol": "lm-eval"}))
    summary = write_report(run)
    assert summary["evaluation"]["tuned"]["protocol"] == "lm-eval"
    assert "tuned 0-shot, protocol lm-eval" in (run / "report.md").read_text().split("\n## ", 1)[0]
    assert "tuned 0-shot, protocol lm-eval" in (run / "report.html").read_text().split("<h2", 1)[0]


def test_an_evaluation_generated_by_vllm_says_so(tmp_path):
    run = make_run(tmp_path)
    write_report(run)
    assert "vLLM" not in (run / "report.md").read_text()  # scores.json without a backend: mathtune's
    path = run / "eval" / "tuned" / "scores.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "backend": "vllm"}))
    summary = write_report(run)
    assert summary["evaluation"]["tuned"]["backend"] == "vllm" and summary["evaluation"]["base"]["backend"] is None
    for page, cut in (("report.md", "\n## "), ("report.html", "<h2")):
        top = (run / page).read_text().split(cut, 1)[0]
        assert "tuned generated by vLLM" in top and "base generated by vLLM" not in top
