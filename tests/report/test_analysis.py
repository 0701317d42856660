"""analysis.py on hand-made inputs whose answers are known (published values or closed forms)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
from scipy import optimize, stats

from conftest import REQUIRED_SUMMARY_KEYS, summary_lookup
from mathtune.report import analysis as A

# --- Wilson -------------------------------------------------------------------------------------


def _wilson_by_inversion(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """An independent reference: the p0 where the score statistic |p - p0| / sqrt(p0 (1 - p0) / n) equals z."""
    p = correct / total

    def score(p0: float) -> float:
        return abs(p - p0) / math.sqrt(p0 * (1 - p0) / total) - z

    eps = 1e-12
    low = 0.0 if correct == 0 else optimize.brentq(score, eps, min(p, 1 - eps))
    high = 1.0 if correct == total else optimize.brentq(score, max(p, eps), 1 - eps)
    return low, high


def test_wilson_12_of_50_matches_statsmodels_value():
    # statsmodels.stats.proportion.proportion_confint(12, 50, method="wilson") = (0.14297, 0.37413)
    low, high = A.wilson_interval(12, 50)
    assert low == pytest.approx(0.14297, abs=1e-4)
    assert high == pytest.approx(0.37413, abs=1e-4)


@pytest.mark.parametrize(
    "correct,total,expected",
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (Wilson score, no continuity correction)
    [(81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718))],
)
def test_wilson_matches_newcombe_table(correct, total, expected):
    low, high = A.wilson_interval(correct, total, z=1.959964)
    assert (low, high) == pytest.approx(expected, abs=6e-5)


@pytest.mark.parametrize("correct,total", [(0, 10), (3, 7), (12, 50), (49, 50), (50, 50)])
def test_wilson_matches_score_test_inversion(correct, total):
    assert A.wilson_interval(correct, total) == pytest.approx(_wilson_by_inversion(correct, total), abs=1e-9)


def test_accuracy_with_nothing_scored_has_no_value():
    assert A.accuracy(0, 0) == {"correct": 0, "total": 0, "value": None, "ci95": None}
    acc = A.accuracy(12, 50)
    assert acc["value"] == 0.24 and acc["ci95"] == pytest.approx([0.14297, 0.37413], abs=1e-4)


# --- McNemar ------------------------------------------------------------------------------------


def _exact_two_sided(b: int, c: int) -> float:
    n, k = b + c, min(b, c)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)


@pytest.mark.parametrize("b,c", [(1, 9), (0, 5), (10, 10), (3, 12), (25, 14)])
def test_mcnemar_matches_binomtest_and_closed_form(b, c):
    p = A.mcnemar_exact_p(b, c)
    assert p == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
    assert p == pytest.approx(_exact_two_sided(b, c), rel=1e-12)


def test_mcnemar_textbook_value():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91, airway hyper-responsiveness
    # example: 1 and 7 discordant pairs, exact conditional McNemar p = 0.070.
    assert A.mcnemar_exact_p(1, 7) == pytest.approx(0.0703125, abs=1e-9)
    assert round(A.mcnemar_exact_p(7, 1), 3) == 0.070


def test_mcnemar_without_discordant_pairs_is_one():
    assert A.mcnemar_exact_p(0, 0) == 1.0


def test_paired_table_counts_shared_ids_only():
    base = {"a": True, "b": True, "c": False, "d": False, "only-base": True}
    tuned = {"a": True, "b": False, "c": True, "d": False, "only-tuned": True}
    assert A.paired_table(base, tuned) == {"n": 4, "both_right": 1, "only_base": 1, "only_tuned": 1, "both_wrong": 1}
    with pytest.raises(A.NotComputable):
        A.paired_table({"a": True}, {"b": True})


# --- training curves ----------------------------------------------------------------------------


def test_loss_decrease_pct():
    assert A.loss_decrease_pct(2.0, 1.5) == pytest.approx(25.0)
    assert A.loss_decrease_pct(1.0, 1.2) == pytest.approx(-20.0)
    assert A.loss_decrease_pct(None, 1.0) is None


def test_rolling_mean_is_trailing():
    assert A.rolling_mean([1, 2, 3, 4, 5, 6], window=3) == pytest.approx([1, 1.5, 2, 3, 4, 5])


def _falling_curve(n=100, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    steps = [10 * (i + 1) for i in range(n)]
    losses = [2.0 * s**-0.3 + 0.5 + rng.normal(0, noise) for s in steps]
    return steps, losses


def _flat_curve(n=100, noise=0.02, seed=1):
    rng = np.random.default_rng(seed)
    steps = [10 * (i + 1) for i in range(n)]
    losses = [0.8 + max(0.0, 1 - s / 300) + rng.normal(0, noise) for s in steps]  # falls, then flat from step 300
    return steps, losses


def test_final_phase_on_a_falling_curve_says_still_improving_and_forecasts():
    steps, losses = _falling_curve()
    phase = A.final_phase(steps, losses, steps_per_epoch=250)
    assert phase["verdict"] == "still improving" and phase["still_improving"]
    assert phase["window_start_step"] == 900 and phase["window_end_step"] == 1000 and phase["n_points"] == 11
    assert phase["loss_decrease_pct"] > 0 and phase["slope_p"] < 0.05
    points = phase["forecast"]["points"]
    assert [p["epochs_ahead"] for p in points] == [1, 2] and [p["step"] for p in points] == [1250, 1500]
    truth = [2.0 * p["step"] ** -0.3 + 0.5 for p in points]
    assert points[0]["loss"] > points[1]["loss"]
    for point, true_loss in zip(points, truth):  # the fit extrapolates close to the true curve
        low, high = point["ci95"]
        assert low < point["loss"] < high
        assert point["loss"] == pytest.approx(true_loss, abs=0.02)
    assert "ln(step)" in phase["forecast"]["method"]


def test_final_phase_on_a_flat_curve_says_flat_without_forecast():
    steps, losses = _flat_curve()
    phase = A.final_phase(steps, losses, steps_per_epoch=250)
    assert phase["verdict"] == "flat" and not phase["still_improving"]
    assert phase["slope_p"] >= 0.05
    assert abs(phase["loss_decrease_pct"]) < 3
    assert phase["forecast"] is None


def test_final_phase_needs_enough_points_and_says_why_without_epochs():
    with pytest.raises(A.NotComputable, match="at least 5"):
        A.final_phase([1, 2, 3], [1.0, 0.9, 0.8])
    steps, losses = _falling_curve()
    phase = A.final_phase(steps, losses, steps_per_epoch=None)
    assert phase["still_improving"] and phase["forecast"] is None and "epoch" in phase["forecast_note"]


def test_constant_loss_is_flat():
    phase = A.final_phase(list(range(1, 21)), [1.0] * 20)
    assert phase["verdict"] == "flat" and phase["slope_p"] is None


def test_overfitting_detected_when_val_rises_three_times_while_train_falls():
    train_steps = list(range(10, 310, 10))
    train_losses = [1.5 - 0.004 * s for s in train_steps]
    eval_steps = [50, 100, 150, 200, 250, 300]
    eval_losses = [1.0, 0.9, 0.85, 0.87, 0.9, 0.95]
    result = A.detect_overfitting(eval_steps, eval_losses, train_steps, train_losses)
    assert result["detected"] and result["from_step"] == 150 and result["to_step"] == 300
    assert result["consecutive_rises"] == 3
    assert result["val_loss_rise_pct"] == pytest.approx((0.95 - 0.85) / 0.85 * 100)
    assert result["train_loss_change_pct"] < 0


def test_no_overfitting_when_train_rises_too_or_val_rises_only_twice():
    train_steps = list(range(10, 310, 10))
    rising_train = [0.5 + 0.004 * s for s in train_steps]
    eval_steps = [50, 100, 150, 200, 250, 300]
    assert not A.detect_overfitting(eval_steps, [1.0, 0.9, 0.85, 0.87, 0.9, 0.95], train_steps, rising_train)["detected"]
    falling_train = rising_train[::-1]
    assert not A.detect_overfitting(eval_steps, [1.0, 0.9, 0.95, 0.97, 0.96, 0.97], train_steps, falling_train)["detected"]
    with pytest.raises(A.NotComputable):
        A.detect_overfitting([50, 100], [1.0, 1.1], train_steps, falling_train)


def test_generalisation_gap_uses_last_train_loss_at_or_before_eval():
    gap = A.generalisation_gap([10, 20, 30, 40], [1.0, 0.9, 0.8, 0.7], [20, 35], [1.1, 1.0])
    assert gap["first"] == {"step": 20, "train_loss": 0.9, "val_loss": 1.1, "gap": pytest.approx(0.2)}
    assert gap["last"]["train_loss"] == 0.8 and gap["last"]["gap"] == pytest.approx(0.2)
    assert A.generalisation_gap([30], [1.0], [20], [1.1])["first"]["gap"] is None


def test_early_stopping_keeps_best_checkpoint_when_on():
    result = {"early_stopping_triggered": True, "best_step": 300, "best_metric": 0.71,
              "total_steps_planned": 1000, "steps_done": 550}
    stop = A.early_stopping(result, enabled=True)
    assert stop["triggered"] and stop["kept_checkpoint"] == "checkpoint-300" and stop["steps_not_run"] == 450
    assert A.early_stopping(result, enabled=False)["kept_checkpoint"] == "checkpoint-550"


# --- outliers and tags --------------------------------------------------------------------------


def test_reason_tags():
    assert A.reason_tags("Prices rose by 20% this year.") == ["percentage", "growth/rate"]
    assert "price tiers" in A.reason_tags("Apples cost $2, pears $3 and a melon $5. How much for all?")
    assert A.reason_tags("A movie lasts 2 hours and 30 minutes.") == ["unit/time conversion"]
    assert A.reason_tags("She buys 3 dozen eggs.") == ["unit/time conversion"]
    assert A.reason_tags("Tom has 3 apples.", gold_steps=6) == ["many steps"]
    assert A.reason_tags("A house costs 250,000 dollars.") == ["large numbers"]
    assert A.reason_tags("Tom has 3 apples and eats 1.", gold_steps=2) == []


def test_robust_outliers_finds_planted_examples():
    spread = np.linspace(0.9, 1.1, 60)  # evenly spread: no outlier but the planted ones
    records = [{"id": f"train-{i}", "loss": float(v), "question": "Tom has 3 apples."} for i, v in enumerate(spread)]
    records[7] = {"id": "train-7", "loss": 3.0, "question": "A price rose by 15% per year.", "gold_steps": 3}
    records[40] = {"id": "train-40", "loss": 2.6, "question": "Sam has 4 pens.", "gold_steps": 7}
    found = A.robust_outliers(records)
    assert [o["id"] for o in found] == ["train-7", "train-40"]
    assert found[0]["robust_z"] > 3.5 and found[0]["tags"] == ["percentage", "growth/rate"]
    assert found[1]["tags"] == ["many steps"]
    values = [r["loss"] for r in records]
    median = float(np.median(values))
    mad = float(np.median(np.abs(np.array(values) - median)))
    assert found[0]["robust_z"] == pytest.approx(0.6745 * (3.0 - median) / mad)
    cutoff = A.outlier_loss_cutoff(values)["loss_cutoff"]
    assert 1.0 < cutoff < 2.6


def test_robust_z_undefined_when_mad_is_zero():
    with pytest.raises(A.NotComputable, match="MAD"):
        A.robust_z_scores([1.0, 1.0, 1.0, 5.0])


def test_tag_clusters_need_overrepresentation():
    outliers = [{"robust_z": 5, "question": "q", "tags": ["percentage"]}] * 3
    examples = [{"question": "Up 5% today."}] * 3 + [{"question": "Tom has 3 apples."}] * 27
    assert A.tag_clusters(outliers, examples) == [
        {"tag": "percentage", "outliers": 3, "outlier_share": 1.0, "validation_share": 0.1}]
    common = [{"question": "Up 5% today."}] * 30  # every problem is a percentage problem: no cluster
    assert A.tag_clusters(outliers, common) == []


# --- answers, agreement, cost -------------------------------------------------------------------


def _pred(i, correct, steps=2, slip=False, q="Tom has 3 apples."):
    return {"id": f"test-{i}", "question": q, "gold": "3", "gold_steps": steps, "pred_strict": "3" if correct else "4",
            "pred_flexible": "3" if correct else "4", "correct_strict": correct, "correct_flexible": correct,
            "arithmetic_slip": slip}


def test_accuracy_by_steps_slips_and_regressions():
    base = [_pred(0, True), _pred(1, True, 3), _pred(2, False, 3, slip=True), _pred(3, False, 3)]
    tuned = [_pred(0, True), _pred(1, False, 3, slip=True), _pred(2, True, 3), _pred(3, False, 3)]
    by_steps = A.accuracy_by_steps(tuned)
    assert [(b["steps"], b["correct"], b["total"]) for b in by_steps] == [(2, 1, 1), (3, 1, 3)]
    assert A.arithmetic_slip_share(tuned) == {"wrong": 2, "with_slip": 1, "value": 0.5}
    assert [r["id"] for r in A.regressions(base, tuned)] == ["test-1"]
    with pytest.raises(A.NotComputable):
        A.arithmetic_slip_share([_pred(0, True)])


def test_loss_vs_exact_match_flags_disagreement():
    agree = A.loss_vs_exact_match([1, 2, 3, 4], [1.0, 0.9, 0.8, 0.7], [0.1, 0.2, 0.25, 0.3])
    assert agree["spearman_rho"] == pytest.approx(-1.0) and agree["agree"] and agree["sentence"] is None
    stuck = A.loss_vs_exact_match([1, 2, 3, 4], [1.0, 1.0, 0.97, 0.94], [0.2, 0.24, 0.24, 0.24])
    assert "Validation loss fell 6.0% over the last 3 evaluations while exact match did not move" in stuck["sentence"]
    with pytest.raises(A.NotComputable):
        A.loss_vs_exact_match([1, 2], [1.0, 0.9], [0.1, 0.2])


def test_cost_defaults_and_override():
    h100 = A.cost(2.0, "NVIDIA H100 80GB HBM3")
    assert h100["usd"] == pytest.approx(2 * A.PRICES_USD_PER_HOUR["H100"]) and h100["price_source"] == "default table (H100)"
    assert A.price_key("NVIDIA L40S") == "L40S" and A.price_key("NVIDIA L4") == "L4"
    assert A.price_key("NVIDIA A10G") == "A10G" and A.price_key("NVIDIA A100-SXM4-80GB") == "A100"
    assert A.price_key("cpu (2 cores)") == "CPU"
    assert A.cost(1.5, "NVIDIA H100", price_per_hour=4.0)["usd"] == pytest.approx(6.0)
    assert A.cost(1.0, "Some TPU")["usd"] is None
    two = A.cost(1.0, "2x NVIDIA A100-SXM4-80GB")
    assert two["usd"] == pytest.approx(2 * A.PRICES_USD_PER_HOUR["A100"]) and two["price_source"] == "default table (2 x A100)"
    assert A.cost(1.0, "1x NVIDIA H100 80GB HBM3")["usd"] == pytest.approx(A.PRICES_USD_PER_HOUR["H100"])
    assert A.price_key("CPU (2 cores, x86_64)") == "CPU"


# --- the summary --------------------------------------------------------------------------------



def _metrics(steps, losses, eval_every=100, eval_losses=None):
    records = [{"kind": "train", "step": s, "epoch": s / 500, "elapsed_s": s * 3.6, "loss": v, "learning_rate": 2e-4,
                "grad_norm": 1.0, "mean_token_accuracy": 0.5 + 0.1 * s / steps[-1], "num_tokens": s * 1000,
                "num_loss_tokens": s * 400} for s, v in zip(steps, losses)]
    eval_steps = [s for s in steps if s % eval_every == 0]
    for s, v in zip(eval_steps, eval_losses or [losses[steps.index(s)] + 0.1 for s in eval_steps]):
        records.append({"kind": "eval", "step": s, "epoch": s / 500, "elapsed_s": s * 3.6, "eval_loss": v,
                        "eval_mean_token_accuracy": 0.6})
    return records


def _summary(**kwargs):
    args = dict(config={}, metrics=[], example_losses=[], questions={}, gold_steps={}, train_result=None,
                base_preds=None, tuned_preds=None, base_scores=None, tuned_scores=None, data_info=None)
    args.update(kwargs)
    return A.build_summary(**args)


def test_summary_has_required_keys_and_computes_figures():
    steps, losses = _falling_curve()
    base = [_pred(i, i < 10) for i in range(50)]
    tuned = [_pred(i, i < 25) for i in range(50)]
    summary = _summary(
        config={"model": {"name": "gemma-3-270m"}, "train": {"learning_rate": 2e-4, "early_stopping_patience": 5},
                "lora": {"r": 8}, "cost": {"hardware": None, "price_per_hour": None}},
        metrics=_metrics(steps, losses),
        train_result={"early_stopping_triggered": False, "best_step": 1000, "best_metric": 0.6,
                      "total_steps_planned": 1000, "steps_done": 1000, "hardware": "NVIDIA H100 80GB HBM3"},
        base_preds=base, tuned_preds=tuned, data_info={"source": "synthetic"},
    )
    for key in REQUIRED_SUMMARY_KEYS:
        summary_lookup(summary, key)
    assert summary["model"] == "gemma-3-270m" and summary["data"]["synthetic"]
    assert summary["train_loss"]["first"] == losses[0] and summary["train_loss"]["last"] == losses[-1]
    assert summary["steps_per_epoch"] == pytest.approx(500)
    assert summary["final_phase"]["still_improving"]
    assert [p["step"] for p in summary["final_phase"]["forecast"]["points"]] == [1500, 2000]
    assert summary["accuracy"]["base"]["value"] == 0.2 and summary["accuracy"]["tuned"]["value"] == 0.5
    assert summary["accuracy"]["paired"]["only_tuned"] == 15
    assert summary["accuracy"]["mcnemar_p"] == pytest.approx(stats.binomtest(0, 15).pvalue)
    assert summary["accuracy"]["gain_points"] == pytest.approx(30)
    assert summary["cost"]["hours"] == pytest.approx(1.0)
    assert summary["cost"]["usd"] == pytest.approx(A.PRICES_USD_PER_HOUR["H100"])
    assert summary["cost"]["usd_per_point"] == pytest.approx(A.PRICES_USD_PER_HOUR["H100"] / 30)
    assert summary["cost"]["tokens"] == 1_000_000 and summary["cost"]["tokens_per_s"] == pytest.approx(1000 / 3.6)
    assert summary["early_stopping"]["kept_checkpoint"] == "checkpoint-1000"
    assert any("more epochs" in r["text"] for r in summary["recommendations"])
    assert all(r["evidence"] for r in summary["recommendations"])
    for key in ["train_loss.decrease_pct", "final_phase.loss_decrease_pct", "accuracy.mcnemar_p", "cost.usd"]:
        assert summary["definitions"][key]


def test_summary_with_a_single_evaluation_says_so():
    steps, losses = _falling_curve(n=10)
    summary = _summary(metrics=_metrics(steps, losses, eval_every=100))
    assert summary["val_loss"]["n_evals"] == 1 and summary["val_loss"]["decrease_pct"] is None
    assert summary["val_loss"]["first"] == summary["val_loss"]["last"]
    assert any("Only one evaluation" in m for m in summary["missing"])


def test_summary_without_base_predictions():
    tuned = [_pred(i, i < 20) for i in range(40)]
    summary = _summary(tuned_preds=tuned, tuned_scores={"model": "m", "elapsed_s": 36.0, "hardware": "cpu"})
    assert summary["accuracy"]["base"] == {"correct": None, "total": None, "value": None, "ci95": None}
    assert summary["accuracy"]["tuned"]["value"] == 0.5
    assert summary["accuracy"]["mcnemar_p"] is None and summary["accuracy"]["gain_points"] is None
    assert any("No base-model evaluation" in m for m in summary["missing"])
    assert summary["cost"]["usd"] == pytest.approx(0.01 * A.PRICES_USD_PER_HOUR["CPU"])


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
    summary = _summary(metrics=_metrics(train_steps, train_losses, eval_losses=eval_losses),
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
    steps, losses = _falling_curve(n=20)
    metrics = _metrics(steps, losses)
    metrics.insert(5, {"kind": "train", "step": steps[-1], "epoch": 0.4, "elapsed_s": 1.0, "loss": 99.0})  # re-logged later
    metrics.append({"kind": "train", "step": 210, "epoch": 0.42, "elapsed_s": 800.0, "loss": float("nan")})
    summary = _summary(metrics=metrics)
    assert summary["train_loss"]["last"] == losses[-1]
    assert any("not finite" in n for n in summary["notes"])


def test_importing_the_training_module_leaves_scipy_unloaded():
    """Training imports analysis (through evaluate); scipy.stats loads only when a statistic is computed."""
    code = "import sys, mathtune.training.recipe; print('scipy.stats' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
