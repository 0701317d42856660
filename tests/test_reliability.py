"""Reliability: a killed run resumes to the numbers of an uninterrupted one, an interrupted evaluation resumes,
outputs are atomic, bad input is a clear error that overwrites nothing, a diverging run stops, untrusted text
never crashes the parser.

Tested elsewhere and not repeated here: the wording of each data error (test_data.py: malformed JSONL with file and
line, a record without `####`, an empty file, a split that leaves one side empty) and config error (test_config.py:
unknown keys, impossible hyperparameters); resuming `evaluate_problems` past a torn line (test_evaluate.py); the
answer parser's property tests (test_answers.py); the two-process data-parallel run (test_train.py).
"""

from __future__ import annotations

import ast
import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from conftest import write_jsonl
from mathtune import data, evaluate, runfiles
from mathtune.cli import main
from mathtune.config import load_config
from mathtune.runfiles import read_jsonl
from mathtune.training import recipe, rundir, train
from mathtune.training.rundir import last_checkpoint, save_adapter
from mathtune.training.trainer import MathTuneTrainer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
GOOD = {"question": "What is 1+1?", "answer": "1+1 = <<1+1=2>>2\n#### 2"}


def tiny_args(out: Path, data_dir: Path, *extra: str) -> list[str]:
    return ["train", "--preset", "tiny", "--output-dir", str(out), "--data", str(data_dir), *extra]


# --- resuming after a kill ----------------------------------------------------------------------


def parses(path: Path) -> bool:
    try:
        return bool(json.loads(path.read_text()))
    except (OSError, ValueError):
        return False


def test_a_run_killed_with_sigkill_resumes_to_the_numbers_of_an_uninterrupted_one(tmp_path, gsm8k_dir):
    command = [sys.executable, "-m", "mathtune", *tiny_args(tmp_path, gsm8k_dir, "--set", "train.eval_steps=2",
               "--set", "train.logging_steps=1", "--set", "train.epochs=2")]
    with open(tmp_path / "whole.log", "w") as log_whole, open(tmp_path / "killed.log", "w") as log_killed:
        whole = subprocess.Popen([*command, "--name", "whole"], env=ENV, cwd=tmp_path, stdout=log_whole,
                                 stderr=log_whole)
        killed = subprocess.Popen([*command, "--name", "killed"], env=ENV, cwd=tmp_path, stdout=log_killed,
                                  stderr=log_killed)
        run_dir, deadline = tmp_path / "killed", time.monotonic() + 600
        while not any(map(parses, run_dir.glob("checkpoints/checkpoint-*/trainer_state.json"))):  # a whole one
            assert killed.poll() is None, "training ended before its first checkpoint"
            assert time.monotonic() < deadline, "no checkpoint after 10 minutes"
            time.sleep(0.05)
        killed.send_signal(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()[-3000:]
    assert not (run_dir / "train_result.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "mathtune", "train", "--resume", str(run_dir)], env=ENV,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    whole_dir = tmp_path / "whole"
    result, reference = (json.loads((d / "train_result.json").read_text()) for d in (run_dir, whole_dir))
    assert result["resumed_from"] and result["steps_done"] == reference["steps_done"] == 16
    assert (result["train_tokens"], result["train_loss_tokens"]) == (reference["train_tokens"],
                                                                      reference["train_loss_tokens"])
    for name, key in (("metrics.jsonl", ("kind", "step")), ("example_losses.jsonl", ("step", "id"))):
        got, want = read_jsonl(run_dir / name), read_jsonl(whole_dir / name)
        keys = [tuple(r[k] for k in key) for r in got]
        assert len(keys) == len(set(keys)), f"{name}: a record was logged twice"
        assert keys == [tuple(r[k] for k in key) for r in want], name
        for ours, theirs in zip(got, want):
            for field, value in theirs.items():
                if field not in ("elapsed_s", "eval_generate_s"):
                    expected = pytest.approx(value, rel=1e-5) if isinstance(value, float) else value
                    assert ours[field] == expected, (name, ours[key[0]], ours[key[1]], field)
    elapsed = [m["elapsed_s"] for m in read_jsonl(run_dir / "metrics.jsonl")]
    assert elapsed == sorted(elapsed), "the resumed run's clock restarted"
    adapters = [load_file(d / "adapter/adapter_model.safetensors") for d in (run_dir, whole_dir)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])


def test_a_checkpoint_whose_save_was_cut_short_is_skipped(tmp_path, capsys):
    folder = tmp_path / "checkpoints"
    for step, state in ((2, "{}"), (4, '{"global_st'), (6, None)):  # whole, torn trainer_state.json, none yet
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "adapter_model.safetensors").write_text("weights")
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert last_checkpoint(tmp_path) == folder / "checkpoint-2"
    assert "checkpoint-6 is incomplete" in capsys.readouterr().err


def test_early_stopping_patience_count_survives_a_resume(tmp_path, gsm8k_dir):
    def config(max_steps):
        return load_config("tiny", [f"output_dir={tmp_path}", f"data.path={gsm8k_dir}", f"train.max_steps={max_steps}",
                                    "train.eval_steps=2", "train.early_stopping_patience=2"])

    train(config(2))
    state_path = tmp_path / "tiny/checkpoints/checkpoint-2/trainer_state.json"
    state = json.loads(state_path.read_text())
    state["best_metric"] = 0.0  # no later evaluation improves on it, and one already did not:
    state["stateful_callbacks"]["EarlyStoppingCallback"]["attributes"]["early_stopping_patience_counter"] = 1
    state_path.write_text(json.dumps(state))
    result = train(config(8), resume=True)
    assert result["steps_done"] == 4  # the second evaluation without improvement; a count reset on resume gives 6
    assert result["early_stopping_triggered"]


# --- resuming an interrupted evaluation in `mathtune run` ---------------------------------------


def test_mathtune_run_resumes_an_interrupted_base_evaluation(tmp_path, gsm8k_dir, monkeypatch, capsys):
    args = ["run", "--preset", "tiny", "--output-dir", str(tmp_path), "--data", str(gsm8k_dir),
            "--set", "train.max_steps=2", "--set", "train.eval_steps=2"]
    score, scored = evaluate.score_record, []

    def dies_at_the_third(*a):
        if len(scored) == 2:
            raise KeyboardInterrupt
        scored.append(score(*a))
        return scored[-1]

    monkeypatch.setattr(evaluate, "score_record", dies_at_the_third)
    assert main(args) == 130
    predictions = tmp_path / "tiny/eval/base/predictions.jsonl"
    assert len(read_jsonl(predictions)) == 2
    with predictions.open("a") as handle:  # the third record was being written when the process died
        handle.write(json.dumps(scored[0])[:50])
    monkeypatch.undo()

    assert main(args) == 0
    assert "dropped a torn last line" in capsys.readouterr().err
    scores = json.loads((predictions.parent / "scores.json").read_text())
    assert (scores["n"], scores["generated_problems"]) == (6, 4)
    ids = [r["id"] for r in read_jsonl(predictions)]
    assert len(ids) == len(set(ids)) == 6
    assert (tmp_path / "tiny/report.html").exists()


# --- atomic outputs -----------------------------------------------------------------------------


def test_a_write_that_fails_midway_keeps_the_old_file_and_leaves_no_debris(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    runfiles.write_text(path, "old\n")
    open_ = Path.open

    def disk_fills_midway(self, *args, **kwargs):
        handle = open_(self, *args, **kwargs)
        write = handle.write

        def half(text):
            write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

        handle.write = half
        return handle

    monkeypatch.setattr(Path, "open", disk_fills_midway)
    with pytest.raises(OSError):
        runfiles.write_text(path, "new content\n" * 100)
    assert path.read_text() == "old\n"
    assert list(tmp_path.iterdir()) == [path]


def test_the_adapter_is_saved_under_a_temporary_name(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("old")

    def saves(text, fail=False):
        def save_pretrained(folder):
            Path(folder).mkdir(exist_ok=True)
            (Path(folder) / "adapter_model.safetensors").write_text(text)
            if fail:
                raise OSError(errno.ENOSPC, "No space left on device")
        return save_pretrained

    trainer = SimpleNamespace(model=SimpleNamespace(save_pretrained=saves("half", fail=True)),
                              processing_class=SimpleNamespace(save_pretrained=lambda folder: None))
    with pytest.raises(OSError):
        save_adapter(trainer, target)
    assert (target / "adapter_model.safetensors").read_text() == "old"
    trainer.model.save_pretrained = saves("new")
    save_adapter(trainer, target)
    assert (target / "adapter_model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("train_lines, extra, overwrite, messages", [
    pytest.param([GOOD, '{"question": "broken'], [], True, ["{data}/train.jsonl:2: not valid JSON", "--skip-invalid"],
                 id="malformed JSONL"),
    pytest.param([GOOD, {"question": "Q?", "answer": "It is 3."}], [], True,
                 ["{data}/train.jsonl:2: the answer's last line is not '#### <number>'"], id="no #### line"),
    pytest.param([], [], True, ["{data}/train.jsonl holds no valid problems"], id="empty data set"),
    pytest.param([GOOD], [], True, ["leaves one side empty", "data.validation_fraction"], id="one-sided split"),
    pytest.param(None, ["--set", "train.learnig_rate=0.1"], True,
                 ["unknown key 'train.learnig_rate'", "did you mean 'learning_rate'"], id="unknown key"),
    pytest.param(None, ["--set", "train.learning_rate=-1e-4"], True, ["train.learning_rate must be a positive"],
                 id="negative learning rate"),
    pytest.param(None, ["--set", "lora.r=0"], True, ["lora.r must be a positive"], id="rank 0"),
    pytest.param(None, ["--set", "lora.dropout=1"], True, ["lora.dropout must be in [0, 1)"], id="dropout 1"),
    pytest.param(None, ["--set", "train.divergence_factor=0.5"], True, ["train.divergence_factor must be above 1"],
                 id="divergence factor below 1"),
    pytest.param(None, ["--set", "model.name=nobody/no-such-model"], True,
                 ["could not load model 'nobody/no-such-model'", "Hub cannot be reached", "give that path"],
                 id="model that does not exist, offline"),
    pytest.param(None, [], False, ["already holds a run", "--resume", "--overwrite"], id="another run there"),
])
def test_bad_input_is_a_clear_error_that_overwrites_nothing(
    tmp_path, gsm8k_dir, monkeypatch, capsys, train_lines, extra, overwrite, messages
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data_dir = gsm8k_dir
    if train_lines is not None:
        data_dir = tmp_path / "data"
        data_dir.mkdir()
        write_jsonl(data_dir / "train.jsonl", train_lines)
        write_jsonl(data_dir / "test.jsonl", [GOOD])
    old_run = tmp_path / "runs" / "tiny"  # a run already there, which even --overwrite must keep on bad input
    old_run.mkdir(parents=True)
    (old_run / "config.yaml").write_text(yaml.safe_dump(load_config("tiny").to_dict()))
    (old_run / "environment.json").write_text('{"mathtune": "0.1.0"}\n')
    (old_run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    before = {p: p.read_bytes() for p in old_run.rglob("*")}

    started = time.monotonic()
    code = main(tiny_args(tmp_path / "runs", data_dir, *extra, *(["--overwrite"] if overwrite else [])))
    assert code == 2
    err = capsys.readouterr().err
    for message in messages:
        assert message.format(data=data_dir) in err
    assert time.monotonic() - started < 60  # an offline Hub id fails at once, not after a minute of retries
    assert {p: p.read_bytes() for p in old_run.rglob("*")} == before


def test_run_overwrite_with_a_model_that_does_not_exist_keeps_the_old_run(tmp_path, gsm8k_dir, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    old_run = tmp_path / "runs" / "tiny"
    old_run.mkdir(parents=True)
    (old_run / "config.yaml").write_text(yaml.safe_dump(load_config("tiny").to_dict()))
    (old_run / "environment.json").write_text('{"mathtune": "0.1.0"}\n')
    (old_run / "report.md").write_text("the old run's report\n")
    before = {p: p.read_bytes() for p in old_run.rglob("*")}
    code = main(["run", "--preset", "tiny", "--output-dir", str(tmp_path / "runs"), "--data", str(gsm8k_dir),
                 "--set", "model.name=nobody/no-such-model", "--overwrite"])
    assert code == 2
    assert "could not load model 'nobody/no-such-model'" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in old_run.rglob("*")} == before


def test_a_full_disk_is_a_clear_error_and_the_run_continues_after(tmp_path, gsm8k_dir, monkeypatch, capsys):
    def disk_full(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir, "append_jsonl", disk_full)
    assert main(tiny_args(tmp_path, gsm8k_dir, "--set", "train.max_steps=2", "--set", "train.eval_steps=2")) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "Free some space" in err and "--resume" in err
    monkeypatch.undo()
    assert main(["train", "--resume", str(tmp_path / "tiny")]) == 0
    assert json.loads((tmp_path / "tiny/train_result.json").read_text())["steps_done"] == 2


# --- training health ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor, extra, problem", [
    (float("nan"), [], "loss became nan at step 4"),
    (100.0, ["--set", "train.divergence_factor=10"], "above train.divergence_factor=10 x its lowest"),
])
def test_a_diverging_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(
    tmp_path, gsm8k_dir, monkeypatch, capsys, factor, extra, problem
):
    class BlowsUpAtStep4(MathTuneTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return loss * factor if model.training and self.state.global_step >= 3 else loss

    monkeypatch.setattr(recipe, "MathTuneTrainer", BlowsUpAtStep4)
    code = main(tiny_args(tmp_path, gsm8k_dir, "--set", "train.max_steps=6", "--set", "train.eval_steps=2",
                          "--set", "train.logging_steps=1", *extra))
    assert code == 2
    err = capsys.readouterr().err
    run_dir = tmp_path / "tiny"
    assert problem in err and "step 4" in err and "train.learning_rate" in err
    assert f"last good checkpoint: {run_dir / 'checkpoints/checkpoint-2'}" in err
    assert not (run_dir / "checkpoints/checkpoint-4").exists() and not (run_dir / "train_result.json").exists()
    logged = read_jsonl(run_dir / "metrics.jsonl")
    assert max(m["step"] for m in logged) == 3 and all(m.get("loss", 0) < 10 for m in logged)


# --- untrusted text -----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=8,
)
answers = st.text() | st.builds("{}\n#### {}".format, st.text(), st.text(max_size=12))
records = st.fixed_dictionaries({}, optional={"question": st.text() | json_values, "answer": answers | json_values})


@given(records | json_values)
def test_check_record_judges_any_json_value_without_crashing(record):
    verdict = data.check_record(record)
    assert verdict is None or (isinstance(verdict, str) and verdict)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary() | st.text().map(str.encode) | records.map(lambda r: json.dumps(r).encode()), max_size=6),
       st.booleans())
@example([b"[" * 100_000], False)  # nested deeper than the JSON parser recurses
@example([b'{"question": "caf\xe9?", "answer": "#### 1"}'], True)  # Latin-1, not UTF-8
def test_reading_arbitrary_lines_gives_valid_problems_or_a_data_error(lines, skip_invalid):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "train.jsonl"
        path.write_bytes(b"\n".join(lines))
        try:
            problems, skipped = data.read_problems(path, "train", skip_invalid)
        except data.DataError as exc:
            assert str(path) in str(exc)
            return
    assert problems and all(data.check_record(p) is None for p in problems)
    assert all(f"{path}:" in line for line in skipped)


def test_the_source_never_evaluates_text():
    calls = [
        f"{path.relative_to(REPO)}:{node.lineno}"
        for path in (REPO / "src" / "mathtune").rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("eval", "exec")
    ]
    assert not calls, f"eval/exec called at {calls}"
