"""train.report_to: a tiny `mathtune run` logging to TensorBoard, read back from its event files; bad names and
missing trackers refused before any work."""

import pytest

from mathtune.cli import main
from mathtune.config import ConfigError, load_config
from mathtune.runfiles import read_json, read_jsonl
from mathtune.training import trackers


def scalars(log_dir) -> dict[str, dict[int, float]]:
    """Every scalar of the event files in log_dir: {tag: {step: value}}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_a_run_with_tensorboard_logs_losses_exact_match_and_final_accuracy(tmp_path, gsm8k_dir):
    pytest.importorskip("tensorboard", reason="pip install 'mathtune[tensorboard]' (the test extra has it)")
    assert main(["run", "--preset", "tiny", "--output-dir", str(tmp_path), "--data", str(gsm8k_dir),
                 "--set", "train.report_to=[tensorboard]"]) == 0
    run_dir = tmp_path / "tiny"
    logged = scalars(run_dir / trackers.TENSORBOARD_DIR)
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train_logs = {m["step"]: m["loss"] for m in metrics if m["kind"] == "train"}
    eval_logs = [m for m in metrics if m["kind"] == "eval"]
    assert train_logs and eval_logs and all("eval_exact_match_strict" in m for m in eval_logs)
    assert logged["train/loss"] == pytest.approx(train_logs)
    assert logged["eval/loss"] == pytest.approx({m["step"]: m["eval_loss"] for m in eval_logs})
    assert logged["eval/exact_match_strict"] == pytest.approx({m["step"]: m["eval_exact_match_strict"] for m in eval_logs})
    steps = read_json(run_dir / "train_result.json")["steps_done"]
    for model in ("base", "tuned"):
        value = read_json(run_dir / "eval" / model / "scores.json")["strict"]["value"]
        assert logged[f"test/{model}_exact_match_strict"] == {steps: pytest.approx(value)}
    assert not (run_dir / "checkpoints" / "runs").exists()  # the event files are in RUN_DIR/tensorboard only


def test_final_accuracy_keys_follow_the_split():
    scores = {"base": {"strict": {"value": 0.25}, "flexible": {"value": 0.5}}, "tuned": None}
    assert trackers.final_accuracy_logs(scores, "test") == {"test_base_exact_match_strict": 0.25,
                                                            "test_base_exact_match_flexible": 0.5}
    assert list(trackers.final_accuracy_logs(scores, "validation")) == ["eval_base_exact_match_strict",
                                                                        "eval_base_exact_match_flexible"]


def test_an_unknown_tracker_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"train.report_to\[0\] must be one of .*'tensorboard'.*did you mean 'tensorboard'"):
        load_config("tiny", ["train.report_to=[tensorbord]"])
    with pytest.raises(ConfigError, match="twice"):
        load_config("tiny", ["train.report_to=[tensorboard, tensorboard]"])
    with pytest.raises(ConfigError, match="must be a list"):
        load_config("tiny", ["train.report_to=tensorboard"])
    assert load_config("tiny").train.report_to == []


def test_a_tracker_that_is_not_installed_is_refused_before_the_run_starts(tmp_path, gsm8k_dir, monkeypatch, capsys):
    from transformers.integrations import integration_utils

    monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: False)
    code = main(["run", "--preset", "tiny", "--output-dir", str(tmp_path), "--data", str(gsm8k_dir),
                 "--set", "train.report_to=[tensorboard]"])
    assert code == 2
    assert "pip install 'mathtune[tensorboard]'" in capsys.readouterr().err
    assert not (tmp_path / "tiny").exists()
