"""report/summary.py: build_summary on hand-made records, complete and partial."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from conftest import REQUIRED_SUMMARY_KEYS, summary_lookup
from handmade import NOISY_FALL, falling_curve, logged_metrics, pred
from mathtune.report.cost import PRICES_USD_PER_HOUR
from mathtune.report.records import RunRecords
from mathtune.report.stats import min_detectable_gain, problems_needed
from mathtune.report.summary import build_summary


def _summary(**records):
    """The summary of a run holding only `records` (RunRecords' fields); every other file is absent."""
    return build_summary(RunRecords(**records))


def test_summary_has_required_keys_and_computes_figures():
    steps, losses = falling_curve()
    base = [pred(i, i < 10) for i in range(50)]
    tuned = [pred(i, i < 25) for i in range(50)]
    summary = _summary(
        config={"model": {"name": "gemma-3-270m"}, "train": {"learning_rate": 2e-4, "early_stopping_patience": 5},
                "lora": {"r": 8}, "cost": {"hardware": None, "price_per_hour": None}},
        metrics=logged_metrics(steps, losses),
        train_result={"early_stopping_triggered": False, "best_step": 1000, "best_metric": 0.6,
                      "total_steps_planned": 1000, "steps_done": 1000, "hardware": "NVIDIA H100 80GB HBM3"},
        predictions={"base": base, "tuned": tuned}, data_info={"source": "synthetic"},
    )
    for key in REQUIRED_SUMMARY_KEYS:
        summary_lookup(summary, key)
    assert summary["model"] == "gemma-3-270m" and summary["data"]["synthetic"]
    assert summary["train_loss"]["first"] == pytest.approx(stats.trim_mean(losses[:10], 0.2))
    assert summary["train_loss"]["last"] == pytest.approx(stats.trim_mean(losses[-10:], 0.2))
    assert summary["steps_per_epoch"] == pytest.approx(500)
    assert summary["final_phase"]["still_improving"]
    assert [p["step"] for p in summary["final_phase"]["forecast"]["points"]] == [1500, 2000]
    assert summary["accuracy"]["base"]["value"] == 0.2 and summary["accuracy"]["tuned"]["value"] == 0.5
    assert summary["accuracy"]["paired"]["only_tuned"] == 15
    assert summary["accuracy"]["mcnemar_p"] == pytest.approx(stats.binomtest(0, 15).pvalue)
    assert summary["accuracy"]["gain_points"] == pytest.approx(30)
    assert summary["cost"]["hours"] == pytest.approx(1.0)
    assert summary["cost"]["usd"] == pytest.approx(PRICES_USD_PER_HOUR["H100"])
    assert summary["cost"]["usd_per_point"] == pytest.approx(PRICES_USD_PER_HOUR["H100"] / 30)
    assert summary["cost"]["tokens"] == 1_000_000 and summary["cost"]["tokens_per_s"] == pytest.approx(1000 / 3.6)
    assert summary["early_stopping"]["kept_checkpoint"] == "checkpoint-1000"
    assert any("more epochs" in r["text"] for r in summary["recommendations"])
    assert all(r["evidence"] for r in summary["recommendations"])
    for key in ["train_loss.decrease_pct", "final_phase.loss_decrease_pct", "accuracy.mcnemar_p", "cost.usd"]:
        assert summary["definitions"][key]


def test_summary_with_a_single_evaluation_says_so():
    steps, losses = falling_curve(n=10)
    summary = _summary(metrics=logged_metrics(steps, losses, eval_every=100))
    assert summary["val_loss"]["n_evals"] == 1 and summary["val_loss"]["decrease_pct"] is None
    assert summary["val_loss"]["first"] == summary["val_loss"]["last"]
    assert any("Only one evaluation" in m for m in summary["missing"])


def test_summary_without_base_predictions():
    tuned = [pred(i, i < 20) for i in range(40)]
    summary = _summary(predictions={"tuned": tuned},
                       scores={"tuned": {"model": "m", "elapsed_s": 36.0, "hardware": "cpu"}})
    assert summary["accuracy"]["base"] == {"correct": None, "total": None, "value": None, "ci95": None}
    assert summary["accuracy"]["tuned"]["value"] == 0.5
    assert summary["accuracy"]["mcnemar_p"] is None and summary["accuracy"]["gain_points"] is None
    assert any("No base-model evaluation" in m for m in summary["missing"])
    assert summary["cost"]["usd"] == pytest.approx(0.01 * PRICES_USD_PER_HOUR["CPU"])


def test_summary_of_nothing_does_not_raise_and_lists_what_is_missing():
    summary = _summary()
    for key in REQUIRED_SUMMARY_KEYS:
        summary_lookup(summary, key)
    assert summary["train_loss"]["first"] is None and summary["cost"]["usd"] is None
    text = " ".join(summary["missing"])
    for fragment in ["no training losses", "no evaluations", "train_result.json is missing", "example_losses",
                     "No base-model evaluation", "No tuned-model evaluation", "data.json is missing"]:
        assert fragment in text


def test_summary_overfitting_and_outliers_lead_to_recommendations():
    train_steps = list(range(10, 610, 10))
    train_losses = [1.5 - 0.002 * s for s in train_steps]
    eval_losses = [1.0, 0.9, 0.85, 0.87, 0.9, 0.95]
    losses = [{"step": 600, "id": f"train-{i}", "loss": float(v), "token_accuracy": 0.7, "n_tokens": 80}
              for i, v in enumerate(np.linspace(0.9, 1.1, 40))]
    questions = {f"train-{i}": "Tom has 3 apples." for i in range(40)}
    for i in (1, 2, 3):
        losses[i]["loss"] = 3.0 + i / 10
        questions[f"train-{i}"] = f"A shop raised prices by {10 * i}% this year."
    stale = [{"step": 300, "id": "train-0", "loss": 9.0, "token_accuracy": 0.1, "n_tokens": 80}]
    summary = _summary(metrics=logged_metrics(train_steps, train_losses, eval_losses=eval_losses),
                       example_losses=stale + losses, questions=questions,
                       train_result={"early_stopping_triggered": True, "best_step": 300, "best_metric": 0.85,
                                     "total_steps_planned": 900, "steps_done": 600},
                       config={"train": {"early_stopping_patience": 3}})
    assert summary["generalisation"]["overfitting"]["detected"]
    assert {o["id"] for o in summary["outliers"]} == {"train-1", "train-2", "train-3"}
    assert summary["outlier_stats"]["step"] == 600
    texts = " ".join(r["text"] for r in summary["recommendations"])
    assert "Regularise more" in texts and '"percentage"' in texts
    assert summary["early_stopping"]["kept_checkpoint"] == "checkpoint-300"
    assert any("stopped at step 600 of 900 planned by early stopping" in m for m in summary["missing"])


def test_summary_drops_non_finite_losses_and_resumed_duplicates():
    steps, losses = falling_curve(n=20)
    metrics = logged_metrics(steps, losses)
    metrics.insert(5, {"kind": "train", "step": steps[-1], "epoch": 0.4, "elapsed_s": 1.0, "loss": 99.0})  # re-logged later
    metrics.append({"kind": "train", "step": 210, "epoch": 0.42, "elapsed_s": 800.0, "loss": float("nan")})
    summary = _summary(metrics=metrics)
    assert summary["train_loss"]["last"] == pytest.approx(stats.trim_mean(losses[-5:], 0.2))
    assert any("not finite" in n for n in summary["notes"])


def _renamed(predictions: list[dict], prefix: str) -> list[dict]:
    return [{**p, "id": p["id"].replace("test-", prefix)} for p in predictions]


_PRICED = {"train_result": {"wall_clock_s": 3600.0, "hardware": "NVIDIA H100 80GB HBM3"}}


def test_gain_is_computed_on_the_problems_both_models_were_scored_on():
    base = [pred(i, i < 2) for i in range(10)]  # test-0..9, right on test-0 and test-1 only
    tuned = [pred(i, True) for i in range(5, 15)]  # test-5..14, all right
    summary = _summary(predictions={"base": base, "tuned": tuned}, **_PRICED)
    acc = summary["accuracy"]
    assert acc["base"]["value"] == 0.2 and acc["tuned"]["value"] == 1.0  # each model's own problems
    assert acc["gain_n"] == 5 and acc["paired"]["n"] == 5
    assert acc["gain_points"] == pytest.approx(100)  # test-5..9: base 0 of 5, tuned 5 of 5
    assert "5 problems both" in acc["gain_note"]
    assert summary["cost"]["usd_per_point"] == pytest.approx(PRICES_USD_PER_HOUR["H100"] / 100)


def test_no_gain_when_base_and_tuned_share_no_problem():
    base = [pred(i, i < 2) for i in range(10)]
    tuned = _renamed([pred(i, i < 8) for i in range(10)], "train-")
    scores = {"base": {"ids_sha256": "a", "n": 10}, "tuned": {"ids_sha256": "b", "n": 10}}
    summary = _summary(predictions={"base": base, "tuned": tuned}, scores=scores, **_PRICED)
    acc = summary["accuracy"]
    assert acc["base"]["value"] == 0.2 and acc["tuned"]["value"] == 0.8
    assert acc["gain_points"] is None and acc["gain_n"] == 0 and acc["paired"] is None and acc["mcnemar_p"] is None
    assert "base and tuned were scored on different problems: no paired gain" in acc["gain_note"].lower()
    assert any("scored on different problems" in m for m in summary["missing"])
    assert summary["cost"]["usd_per_point"] is None


@pytest.mark.parametrize("tuned_ids, gain", [("a", pytest.approx(30)), ("b", None), (None, None)])
def test_gain_from_scores_alone_needs_the_same_problem_ids(tuned_ids, gain):
    block = lambda correct: {"correct": correct, "total": 10}  # noqa: E731
    scores = {"base": {"ids_sha256": "a", "n": 10, "strict": block(2)},
              "tuned": {"ids_sha256": tuned_ids, "n": 10, "strict": block(5)}}
    acc = _summary(scores=scores)["accuracy"]
    assert acc["base"]["value"] == 0.2 and acc["tuned"]["value"] == 0.5
    assert acc["gain_points"] == gain
    assert (acc["gain_note"] is None) == (gain is not None)


def test_training_loss_decrease_reads_the_trend_not_two_single_noisy_logs():
    steps = [10 * (i + 1) for i in range(len(NOISY_FALL))]
    summary = _summary(metrics=logged_metrics(steps, NOISY_FALL))
    assert summary["train_loss"]["decrease_pct"] == pytest.approx(15.41, abs=0.01)  # the single logs: -4.3%
    assert summary["train_loss"]["first"] == pytest.approx(1.01667, abs=1e-4)
    assert summary["train_loss"]["window"] == 5
    assert not any("Raise the learning rate" in r["text"] for r in summary["recommendations"])


def test_training_token_accuracy_definition_says_how_trl_averages_it():
    """TRL's SFTTrainer appends each forward pass's correct/valid ratio and log() averages the list:
    an unweighted mean of per-batch shares, not a share pooled over the interval's tokens."""
    text = build_summary(RunRecords())["definitions"]["token_accuracy.train.first"]
    assert "pooled" not in text
    assert "unweighted mean" in text and "per batch" in text.replace("-", " ")


def test_what_a_paired_evaluation_could_detect_is_in_the_summary():
    # 50 problems, 5 only-base and 20 only-tuned: a discordant rate of 50%.
    base = [pred(i, i < 5 or 30 <= i < 40) for i in range(50)]
    tuned = [pred(i, 5 <= i < 25 or 30 <= i < 40) for i in range(50)]
    acc = _summary(predictions={"base": base, "tuned": tuned})["accuracy"]
    assert (acc["paired"]["only_base"], acc["paired"]["only_tuned"], acc["discordant_rate"]) == (5, 20, 0.5)
    assert acc["min_detectable_gain_points"] == pytest.approx(min_detectable_gain(50, 0.5) * 100)
    # near Connor's (1987) normal approximation, n = (z_a sqrt(psi) + z_b sqrt(psi - g^2))^2 / g^2, solved for g
    z_a, z_b = stats.norm.isf(0.025), stats.norm.isf(0.2)
    connor = optimize.brentq(lambda g: (z_a * 0.5**0.5 + z_b * (0.5 - g * g) ** 0.5) ** 2 / g**2 - 50, 0.01, 0.7)
    assert connor * 100 == pytest.approx(27.3, abs=0.1)
    assert acc["min_detectable_gain_points"] == pytest.approx(connor * 100, rel=0.1)
    assert acc["problems_for_5_points"] == problems_needed(0.05, 0.5)
    assert acc["detectable_at"] == {"alpha": 0.05, "power": 0.8}


def test_zero_to_zero_says_in_numbers_how_little_it_could_have_seen():
    both_wrong = [pred(i, False) for i in range(20)]
    summary = _summary(predictions={"base": both_wrong, "tuned": both_wrong})
    acc = summary["accuracy"]
    assert acc["discordant_rate"] == 0
    assert round(acc["min_detectable_gain_points"], 1) == 36.6  # P(Binomial(20, g) >= 6) = 0.8
    assert acc["problems_for_5_points"] == 157  # P(Binomial(n, 0.05) >= 6) >= 0.8 from n = 157
    assert any("none gets worse" in note for note in summary["notes"])
    more = next(r for r in summary["recommendations"] if r["text"].startswith("Evaluate on more problems"))
    assert "takes 157 of them" in more["text"] and more["evidence"]["accuracy.problems_for_5_points"] == 157


def test_what_could_be_detected_is_missing_with_a_reason_without_paired_predictions():
    scores = {"model": "m", "n": 20, "ids_sha256": "same", "strict": {"correct": 2, "total": 20}}
    summary = _summary(scores={"base": scores, "tuned": {**scores, "strict": {"correct": 6, "total": 20}}})
    assert summary["accuracy"]["gain_points"] == pytest.approx(20)
    assert summary["accuracy"]["min_detectable_gain_points"] is None
    assert summary["accuracy"]["problems_for_5_points"] is None
    assert any("smallest detectable gain" in m for m in summary["missing"])
    assert _summary()["accuracy"]["min_detectable_gain_points"] is None


def test_examples_follow_the_report_settings_of_config_yaml():
    base = [pred(i, i % 2 == 0) for i in range(20)]
    tuned = [pred(i, i % 3 == 0) for i in range(20)]
    examples = _summary(predictions={"base": base, "tuned": tuned},
                        config={"report": {"examples_per_group": 2, "examples_seed": 5}})["examples"]
    assert (examples["per_group"], examples["seed"]) == (2, 5)
    assert [len(g["shown"]) for g in examples["groups"]] == [2, 2, 2]
    assert [g["total"] for g in examples["groups"]] == [3, 6, 7]  # odd and 3k; even, not 3k; odd, not 3k
    default = _summary(predictions={"base": base, "tuned": tuned})["examples"]
    assert default["per_group"] == 3 and default["seed"] == 0
    bad = _summary(predictions={"base": base, "tuned": tuned}, config={"report": {"examples_per_group": -2}})
    assert bad["examples"]["per_group"] == 3
    assert any("report.examples_per_group is -2" in note for note in bad["notes"])
    assert _summary(predictions={"base": base})["examples"] is None


def test_cost_counts_every_evaluation_robustness_included():
    scores = {"base": {"elapsed_s": 720.0, "hardware": "cpu"}, "tuned": {"elapsed_s": 360.0, "hardware": "cpu"},
              "robustness-base": {"elapsed_s": 180.0, "hardware": "cpu"},
              "robustness-tuned": {"elapsed_s": 36.0, "hardware": "cpu"}}
    summary = _summary(scores=scores, train_result={"wall_clock_s": 3600.0, "hardware": "cpu"})
    phases = {p["phase"]: p["hours"] for p in summary["cost"]["phases"]}
    assert phases == pytest.approx({"training": 1.0, "base evaluation": 0.2, "tuned evaluation": 0.1,
                                    "robustness evaluation, base model": 0.05,
                                    "robustness evaluation, tuned model": 0.01})
    assert summary["cost"]["hours"] == pytest.approx(1.36)
    assert summary["cost"]["usd"] == pytest.approx(1.36 * PRICES_USD_PER_HOUR["CPU"])
