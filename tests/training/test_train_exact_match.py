"""Exact match during training on the tiny model: when it is logged, and early stopping on it."""

import json

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

from mathtune import evaluate
from mathtune.generation import decode
from mathtune.config import ConfigError, load_config
from mathtune.report.render import write_report
from mathtune.runfiles import read_jsonl
from mathtune.training import recipe, train

EM_KEYS = {"eval_exact_match_strict", "eval_exact_match_flexible", "eval_exact_match_n", "eval_generate_s"}


def tiny_config(tmp_path, data_dir, *overrides):
    """8 steps, an evaluation every 2, few and short generations."""
    return load_config("tiny", [f"output_dir={tmp_path}", f"data.path={data_dir}", "train.eval_steps=2",
                                "eval.generate_subset=3", "eval.max_new_tokens=8", *overrides])


def test_exact_match_is_logged_at_every_nth_evaluation_with_the_kv_cache(tmp_path, gsm8k_dir, monkeypatch):
    """generate_every=2: the 2nd and 4th evaluations; gradient checkpointing (which turns the cache off) on."""
    decoding, modes = [], []
    forward = decode._forward

    def spy(model, kv, first, start, inputs, head=None, bands=None, attention=None):
        # a decoding step feeds each row its last token alone: the rest is in the cache
        decoding.append((model.training, all(len(ids) == 1 for ids in inputs) and any(start)))
        return forward(model, kv, first, start, inputs, head, bands, attention)

    class TrainingMode(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            modes.append(model.training)

    make_callbacks = recipe.make_callbacks
    monkeypatch.setattr(decode, "_forward", spy)
    monkeypatch.setattr(recipe, "make_callbacks", lambda *a: make_callbacks(*a) + [TrainingMode()])
    config = tiny_config(tmp_path, gsm8k_dir, "eval.generate_every=2", "train.gradient_checkpointing=true")
    result = train(config)

    evals = [m for m in read_jsonl(config.run_dir / "metrics.jsonl") if m["kind"] == "eval"]
    assert [m["step"] for m in evals] == [2, 4, 6, 8]
    assert [m["step"] for m in evals if EM_KEYS <= m.keys()] == [4, 8]
    assert not any(EM_KEYS & m.keys() for m in evals if m["step"] in (2, 6))
    for m in evals[1::2]:
        assert m["eval_exact_match_n"] == 3
        assert 0 <= m["eval_exact_match_strict"] <= 1 and 0 <= m["eval_exact_match_flexible"] <= 1
    assert result["generate_s"] == pytest.approx(sum(m.get("eval_generate_s", 0) for m in evals), abs=0.1)
    assert any(cached for _, cached in decoding)
    assert not any(training for training, _ in decoding)
    assert modes == [True] * 8  # back in train mode after every evaluation


def test_early_stopping_on_exact_match_keeps_the_best_checkpoint(tmp_path, gsm8k_dir, monkeypatch):
    """Planted strict exact match 0.2, 0.6, 0.4, 0.4 on 5 problems: patience 2 stops at step 8, keeps step 4."""
    planted = iter([right for k in (1, 3, 2, 2) for right in [True] * k + [False] * (5 - k)])
    monkeypatch.setattr(evaluate, "score_record", lambda problem, generation, n_tokens, protocol: dict.fromkeys(
        ["correct_strict", "correct_flexible"], next(planted)))
    config = tiny_config(tmp_path, gsm8k_dir, "eval.generate_subset=5", "train.epochs=3",
                         "train.early_stopping_metric=eval_exact_match", "train.early_stopping_patience=2")
    result = train(config)

    run_dir = config.run_dir
    evals = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "eval"]
    assert [m["eval_exact_match_strict"] for m in evals] == pytest.approx([0.2, 0.6, 0.4, 0.4])
    assert result["early_stopping_triggered"] and result["steps_done"] == 8 < result["total_steps_planned"]
    assert result["best_metric_name"] == "eval_exact_match_strict"
    assert result["best_metric"] == pytest.approx(0.6) and result["best_step"] == 4
    assert result["best_checkpoint"].endswith("checkpoint-4")
    adapter = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    for step, same in ((4, True), (8, False)):
        saved = load_file(run_dir / "checkpoints" / f"checkpoint-{step}" / "adapter_model.safetensors")
        assert all(adapter[k].equal(saved[k]) for k in saved) is same, step

    summary = write_report(run_dir)
    assert summary["early_stopping"]["best_metric_name"] == "eval_exact_match_strict"
    assert summary["cost"]["generate_s"] == json.loads((run_dir / "train_result.json").read_text())["generate_s"]
    assert summary["loss_vs_exact_match"]["n"] == 4
    assert (run_dir / "plots" / "exact_match.png").exists()
    report = (run_dir / "report.md").read_text()
    assert "checkpoint-4 (chosen by eval_exact_match_strict = 0.600)" in report
    assert "Generating for exact match in training" in report


@pytest.mark.parametrize("every", [0, 2])
def test_early_stopping_on_exact_match_needs_it_at_every_evaluation(every):
    with pytest.raises(ConfigError, match="eval.generate_every=1"):
        load_config("tiny", ["train.early_stopping_metric=eval_exact_match", f"eval.generate_every={every}"])


def test_generation_settings_are_checked():
    with pytest.raises(ConfigError, match="eval.generate_every"):
        load_config("tiny", ["eval.generate_every=-1"])
    with pytest.raises(ConfigError, match="eval.generate_subset"):
        load_config("tiny", ["eval.generate_subset=0"])
    assert load_config("tiny", ["eval.generate_every=0"]).eval.generate_every == 0
