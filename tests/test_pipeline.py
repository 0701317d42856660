"""`mathtune run`, `eval`, `report` and `compare` end to end on the tiny model."""

import json
import random

import pytest

from conftest import REQUIRED_SUMMARY_KEYS, summary_lookup
from mathtune.cli import main
from mathtune.runfiles import read_jsonl


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory, gsm8k_dir):
    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "--preset", "tiny", "--output-dir", str(out), "--data", str(gsm8k_dir)]) == 0
    return out / "tiny"


def test_run_writes_base_and_tuned_evaluations_on_the_same_problems(tiny_run_dir):
    base = read_jsonl(tiny_run_dir / "eval/base/predictions.jsonl")
    tuned = read_jsonl(tiny_run_dir / "eval/tuned/predictions.jsonl")
    assert sorted(r["id"] for r in base) == sorted(r["id"] for r in tuned)
    assert len(base) == 6
    base_scores = json.loads((tiny_run_dir / "eval/base/scores.json").read_text())
    tuned_scores = json.loads((tiny_run_dir / "eval/tuned/scores.json").read_text())
    assert (base_scores["shots"], tuned_scores["shots"]) == (1, 0)
    assert base_scores["ids_sha256"] == tuned_scores["ids_sha256"]


def test_run_writes_the_report_with_the_required_summary_keys(tiny_run_dir):
    summary = json.loads((tiny_run_dir / "summary.json").read_text())
    for key in REQUIRED_SUMMARY_KEYS:
        summary_lookup(summary, key)
    assert summary["accuracy"]["base"]["total"] == 6 and summary["accuracy"]["tuned"]["total"] == 6
    assert summary["val_loss"]["first"] is not None and summary["cost"]["hours"] > 0
    html = (tiny_run_dir / "report.html").read_text()
    assert "<script" not in html.lower() and "data:image/png;base64," in html
    for plot in ("loss", "token_accuracy", "learning_rate", "example_losses", "accuracy"):
        assert (tiny_run_dir / "plots" / f"{plot}.png").exists(), plot


def test_running_again_continues_without_redoing_finished_stages(tiny_run_dir, gsm8k_dir, capsys):
    before = (tiny_run_dir / "metrics.jsonl").read_text()
    assert main(["run", "--preset", "tiny", "--output-dir", str(tiny_run_dir.parent), "--data", str(gsm8k_dir)]) == 0
    assert "Continuing the run" in capsys.readouterr().out
    assert (tiny_run_dir / "metrics.jsonl").read_text() == before


def test_a_run_with_another_config_is_refused_in_the_same_directory(tiny_run_dir, gsm8k_dir, capsys):
    code = main(["run", "--preset", "tiny", "--output-dir", str(tiny_run_dir.parent), "--data", str(gsm8k_dir),
                 "--set", "train.learning_rate=0.5"])
    assert code == 2
    assert "another configuration" in capsys.readouterr().err


def test_eval_of_a_run_directory_uses_its_adapter_zero_shot(tiny_run_dir, gsm8k_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir),
                 "--limit", "3", "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["adapter"].endswith("adapter") and scores["shots"] == 0 and scores["n"] == 3


def test_eval_of_a_base_model_writes_where_name_says(gsm8k_dir, tmp_path, capsys):
    args = ["eval", "--preset", "tiny", "--model", "tiny-random", "--data", str(gsm8k_dir), "--limit", "2",
            "--shots", "0", "--output-dir", str(tmp_path), "--name", "zero-shot"]
    assert main(args) == 0
    assert json.loads((tmp_path / "zero-shot" / "scores.json").read_text())["shots"] == 0
    assert not (tmp_path / "eval-tiny-random").exists()
    assert main([*args, "--robustness", "2"]) == 0
    assert json.loads((tmp_path / "zero-shot-robustness" / "scores.json").read_text())["n"] == 2


def test_eval_of_an_adapter_directory_refuses_a_name(tiny_run_dir, gsm8k_dir, tmp_path, capsys):
    import shutil

    adapter = shutil.copytree(tiny_run_dir / "adapter", tmp_path / "my-adapter")
    assert main(["eval", "--preset", "tiny", "--model", str(adapter), "--data", str(gsm8k_dir), "--limit", "2",
                 "--output-dir", str(tmp_path), "--name", "x"]) == 2
    assert "--out DIR" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_report_rerenders_from_the_run_directory_alone(tiny_run_dir):
    (tiny_run_dir / "report.html").unlink()
    assert main(["report", str(tiny_run_dir)]) == 0
    assert (tiny_run_dir / "report.html").exists()


def test_compare_puts_runs_side_by_side(tiny_run_dir, tmp_path, capsys):
    html = tmp_path / "sweep.html"
    assert main(["compare", str(tiny_run_dir), str(tiny_run_dir), "--html", str(html)]) == 0
    table, where = capsys.readouterr().out.strip().split("\n\n")
    table = table.splitlines()
    assert table[0].startswith("| run | model |") and len(table) == 4
    assert "tiny-random" in table[2]
    assert where.endswith(str(html)) and "tiny-random" in html.read_text()


def test_a_missing_model_path_is_a_clear_error(tmp_path, gsm8k_dir, capsys):
    code = main(["eval", "--preset", "tiny", "--model", str(tmp_path / "nowhere"), "--data", str(gsm8k_dir),
                 "--limit", "2", "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"model path {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


# --- `mathtune eval --model RUN_DIR` uses the run's own settings --------------------------------


def test_eval_of_a_run_directory_takes_the_runs_settings_with_overrides_on_top(tiny_run_dir, gsm8k_dir, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir), "--set", "eval.limit=2",
                 "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["model"] == "tiny-random" and scores["n"] == 2  # the --set override applies
    assert scores["max_new_tokens"] == 16  # the run's tiny preset, not cpu-demo's 200


def test_eval_of_another_split_gets_its_own_directory(tiny_run_dir, gsm8k_dir):
    tuned = (tiny_run_dir / "eval/tuned/scores.json").read_bytes()
    assert main(["eval", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir), "--split", "validation",
                 "--limit", "2"]) == 0
    scores = json.loads((tiny_run_dir / "eval/tuned-validation/scores.json").read_text())
    assert scores["split"] == "validation" and scores["n"] == 2
    assert (tiny_run_dir / "eval/tuned/scores.json").read_bytes() == tuned


def test_eval_refuses_problems_the_run_trained_on(tiny_run_dir, gsm8k_dir, tmp_path, capsys):
    code = main(["eval", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir), "--split", "validation",
                 "--set", "data.validation_fraction=0.9", "--out", str(tmp_path / "eval")])
    assert code == 2
    err = capsys.readouterr().err
    assert str(tiny_run_dir / "data.json") in err and "train_ids" in err
    assert not (tmp_path / "eval").exists()


def test_a_finished_evaluation_is_scored_again_without_loading_the_model(tiny_run_dir, gsm8k_dir, monkeypatch):
    from mathtune import data, pipeline
    from mathtune.config import load_config

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded for an evaluation with nothing left to generate")

    monkeypatch.setattr(pipeline, "load_model", no_loading)
    monkeypatch.setattr(pipeline, "load_tokenizer", no_loading)
    config = load_config(tiny_run_dir / "config.yaml")
    before = json.loads((tiny_run_dir / "eval/base/scores.json").read_text())
    scores = pipeline.run_evaluation(config, data.load_dataset(config.data), tiny_run_dir / "eval/base",
                                     config.model.name, None, config.eval.shots)
    assert scores["strict"] == before["strict"] and scores["generated_problems"] == 0


def test_the_vllm_backend_evaluates_the_tuned_model_merged_into_a_workdir_that_goes(tiny_run_dir, gsm8k_dir,
                                                                                   tmp_path, monkeypatch,
                                                                                   vllm_installed):
    from mathtune import data, evaluate, pipeline
    from mathtune.config import load_config

    vllm_installed(True)
    calls = []

    def fake_load_vllm(name, dtype, revision, adapter, workdir, seed, max_rows):
        calls.append((name, adapter, workdir, workdir.is_dir(), max_rows))
        return "engine"

    def fake_generate(engine, prompts, max_new_tokens, stop):
        for index in range(len(prompts)):
            yield index, "#### 1\nQuestion:", 3

    monkeypatch.setattr(pipeline, "load_vllm", fake_load_vllm)
    monkeypatch.setattr(evaluate.vllm_engine, "generate", fake_generate)
    config = load_config(tiny_run_dir / "config.yaml", ["eval.backend=vllm", "eval.batch_size=3"])
    adapter = tiny_run_dir / "adapter"
    scores = pipeline.run_evaluation(config, data.load_dataset(config.data), tmp_path / "eval", config.model.name,
                                     adapter, 0)
    [(name, given, workdir, existed, rows)] = calls
    assert (name, given, existed, rows) == (config.model.name, adapter, True, 3) and not workdir.exists()
    assert scores["backend"] == "vllm" and scores["generated_problems"] == scores["n"] > 0


def test_a_preset_given_with_a_run_directory_is_not_used(tiny_run_dir, gsm8k_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--preset", "cpu-demo", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir),
                 "--limit", "1", "--out", str(out)]) == 0
    assert "--preset cpu-demo is not used" in capsys.readouterr().err
    assert json.loads((out / "scores.json").read_text())["max_new_tokens"] == 16


# --- protocol lm-eval ---------------------------------------------------------------------------


def test_a_run_directorys_evaluation_is_not_resumed_under_another_protocol(tiny_run_dir, gsm8k_dir, tmp_path, capsys):
    tuned = (tiny_run_dir / "eval/tuned/predictions.jsonl").read_bytes()
    code = main(["eval", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir), "--set", "eval.protocol=lm-eval"])
    assert code == 2
    assert "protocol: 'mathtune' there, 'lm-eval' now" in capsys.readouterr().err
    assert (tiny_run_dir / "eval/tuned/predictions.jsonl").read_bytes() == tuned
    out = tmp_path / "tuned-lm-eval"
    assert main(["eval", "--model", str(tiny_run_dir), "--data", str(gsm8k_dir), "--set", "eval.protocol=lm-eval",
                 "--out", str(out)]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert (scores["protocol"], scores["shots"], scores["n"]) == ("lm-eval", 0, 6)  # a tuned model: zero-shot


def test_eval_of_a_base_model_under_lm_eval_shows_the_harness_examples(gsm8k_dir, tmp_path, capsys):
    out = tmp_path / "base-lm-eval"
    assert main(["eval", "--preset", "tiny", "--model", "tiny-random", "--data", str(gsm8k_dir), "--limit", "2",
                 "--shots", "1", "--set", "eval.protocol=lm-eval", "--out", str(out)]) == 0
    assert "protocol lm-eval" in capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["protocol"], meta["shots"], len(meta["ids"])) == ("lm-eval", 1, 2)
    rng = random.Random(1234)  # the harness: one sample of the 7,473 training lines per test line, in turn
    draws = [f"train-{rng.sample(range(7473), 1)[0]}" for _ in range(1319)]
    assert meta["fewshot_ids"] == {i: [draws[int(i.split("-")[1])]] for i in meta["ids"]}


def test_the_base_models_worked_examples_under_each_protocol(capsys):
    from mathtune import pipeline
    from mathtune.config import load_config
    from mathtune.data import Dataset

    train = [{"id": f"train-{i}", "question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    test = [{"id": f"test-{i}", "question": f"t{i}", "answer": f"#### {i}"} for i in range(4)]
    gsm8k, generated = Dataset("gsm8k-local", "dir", train, test), Dataset("synthetic", "seeds", train, test)
    mathtune, lm_eval = load_config("tiny"), load_config("tiny", ["eval.protocol=lm-eval"])
    run_train = train[:15]

    shared = pipeline.fewshot_examples(mathtune, gsm8k, test, run_train, 2)
    assert isinstance(shared, list) and len(shared) == 2 and all(ex in run_train for ex in shared)
    own = pipeline.fewshot_examples(lm_eval, gsm8k, test, run_train, 5)
    assert set(own) == {p["id"] for p in test} and all(len(shown) == 5 for shown in own.values())
    assert any(ex not in run_train for shown in own.values() for ex in shown)  # the whole training file
    assert capsys.readouterr().out == ""
    fallback = pipeline.fewshot_examples(lm_eval, generated, test, run_train, 5)
    assert isinstance(fallback, list) and len(fallback) == 5 and "note:" in capsys.readouterr().out
    assert pipeline.fewshot_examples(lm_eval, gsm8k, test, run_train, 0) is None
