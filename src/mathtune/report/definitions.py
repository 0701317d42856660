"""One sentence per figure of the summary saying how it is computed: the report prints each beside its figure."""

from __future__ import annotations

from mathtune.report.curves import ALPHA, END_TRIM, FINAL_FRACTION, MIN_POINTS, OVERFIT_RISES, SMOOTHING
from mathtune.report.hard_examples import OUTLIER_Z
from mathtune.report.stats import ALPHA as TEST_ALPHA
from mathtune.report.stats import POWER

PLANNING_GAIN_POINTS = 5  # the gain accuracy.problems_for_5_points plans for


def definitions() -> dict[str, str]:
    """One sentence per figure saying how it is computed, keyed by its dotted path in the summary."""
    return {
        "train_loss.first": f"Training loss at the start: the {END_TRIM:.0%}-trimmed mean of the first "
        f"train_loss.window logs ({SMOOTHING}, the final phase's smoothing window, or the first {FINAL_FRACTION:.0%} of "
        "the logs when that is more; at most half of them). Each log is the Trainer's mean of the per-token losses of "
        "the optimizer steps in its logging interval.",
        "train_loss.last": f"Training loss at the end: the {END_TRIM:.0%}-trimmed mean of the last train_loss.window logs.",
        "train_loss.decrease_pct": "(first - last) / first x 100 of those two trimmed means, not of two single noisy "
        "logs; negative means it rose.",
        "train_loss.window": "How many logs each end of the training loss averages.",
        "val_loss.first": "Validation loss (token-weighted mean over the validation set) at the first evaluation.",
        "val_loss.best": "Lowest validation loss over all evaluations.",
        "val_loss.last": "Validation loss at the last evaluation.",
        "val_loss.decrease_pct": "(first - best) / first x 100 of the validation loss.",
        "val_loss.decrease_pct_last": "(first - last) / first x 100 of the validation loss.",
        "steps_per_epoch": "Optimizer steps per epoch, from train_result.json, else step / epoch at the log with the "
        "largest epoch.",
        "final_phase.loss_decrease_pct": f"Relative decrease of the training loss, smoothed by a trailing rolling mean over "
        f"{SMOOTHING} logs, from the start to the end of the final {FINAL_FRACTION:.0%} of the steps done "
        f"(at least {MIN_POINTS} logs).",
        "final_phase.slope_p": "One-sided p-value that the least-squares slope of the raw training loss over the final "
        "phase is negative (scipy linregress, alternative='less').",
        "final_phase.still_improving": f"'still improving' when the slope is negative with p < {ALPHA}, else 'flat'.",
        "final_phase.forecast": "Training loss after 1 and 2 more epochs from loss = a + b*ln(step) fitted to the second "
        "half of the curve, with the 95% confidence band of the fit; it extends the curve as it was, schedule included.",
        "token_accuracy.train.first": "Training token accuracy at the first log, as TRL's SFTTrainer logs it: each "
        "forward pass records the share of its loss-bearing tokens whose greedy prediction equals the reference "
        "(counts summed over devices; a batch mathtune cuts into pieces records one share), and the log is the "
        "unweighted mean of these per-batch shares over the logging interval, so a batch with few tokens weighs "
        "as much as a full one.",
        "token_accuracy.train.last": "The same at the last training log.",
        "token_accuracy.val.first": "Share of the validation set's loss-bearing tokens predicted exactly, at the first evaluation.",
        "token_accuracy.val.last": "The same at the last evaluation.",
        "generalisation.first.gap": "Validation loss minus the last training loss logged at or before the first evaluation.",
        "generalisation.last.gap": "Validation loss minus the last training loss logged at or before the last evaluation.",
        "generalisation.overfitting": f"Detected when validation loss rose at {OVERFIT_RISES} consecutive evaluations "
        f"while the smoothed training loss fell over the same steps.",
        "early_stopping.triggered": "Whether the early-stopping callback ended training before the planned steps (train_result.json).",
        "early_stopping.kept_checkpoint": "The checkpoint saved as the adapter: when early stopping is on, the best one by "
        "the named metric (the Trainer's metric_for_best_model), else the last.",
        "outliers": f"Validation examples of the last evaluation whose robust z = 0.6745 x (loss - median) / MAD "
        f"exceeds {OUTLIER_Z} in absolute value (Iglewicz & Hoaglin); tags come from keyword rules on the question.",
        "outlier_stats.tag_clusters": "Tags carried by at least 2 high-loss outliers, by half of them, and 1.5 times "
        "as often as among all validation examples with text.",
        "outlier_stats.loss_cutoff": f"median + {OUTLIER_Z} x MAD / 0.6745: the loss above which an example is a high outlier.",
        "accuracy.base": "Strict exact match of the base model: correct / scored, with a 95% Wilson score interval.",
        "accuracy.tuned": "Strict exact match of the tuned model: correct / scored, with a 95% Wilson score interval.",
        "accuracy.flexible": "Exact match when the last number in the generation is taken as the answer, 95% Wilson interval.",
        "accuracy.gain_points": "Tuned minus base strict accuracy, in percentage points, on the problems both models "
        "were scored on (the paired problems, accuracy.gain_n); none when they share no problem.",
        "accuracy.gain_n": "How many problems the gain is computed on: those whose ids both prediction files hold.",
        "accuracy.paired": "Counts of problems scored for both models by which of them answered correctly (strict).",
        "accuracy.mcnemar_p": "Two-sided exact McNemar test: binomial test of only-base vs only-tuned problems against 50/50.",
        "accuracy.discordant_rate": "Share of the paired problems that exactly one of the two models answered "
        "correctly (only base plus only tuned, over all paired problems).",
        "accuracy.min_detectable_gain_points": f"The smallest gain, in points, that the two-sided exact McNemar test "
        f"at alpha = {TEST_ALPHA} would detect with {POWER:.0%} power on the accuracy.paired.n problems of this "
        "evaluation. Exact, not a normal approximation: the number of discordant problems is binomial over the "
        "problems, and the only-tuned count binomial over them; the discordant rate is the observed one, or the gain "
        "itself when larger (a gain of g points moves at least g% of the problems). Smaller gains could be real "
        "and still be missed.",
        "accuracy.problems_for_5_points": f"The smallest number of paired problems on which the same test detects "
        f"a {PLANNING_GAIN_POINTS}-point gain with {POWER:.0%} power, at this run's discordant rate "
        f"(at least {PLANNING_GAIN_POINTS}%).",
        "accuracy.detectable_at": "The level (alpha) and power the two figures above are computed for.",
        "accuracy.by_steps": "Strict exact match grouped by the number of lines of the gold solution before ####.",
        "accuracy.arithmetic_slip_share": "Among wrong answers, the share whose generation states a calculation with a wrong result.",
        "accuracy.regressions": "Problems the base model answered correctly and the tuned model did not (strict).",
        "loss_vs_exact_match.spearman_rho": "Spearman rank correlation of validation loss and exact match over the "
        "evaluations that logged both; negative means they agree.",
        "examples": "Problems drawn at random (seeded by report.examples_seed) among those the tuning fixed "
        "(the base model wrong, the tuned one right, strict), broke (the reverse) and both models got wrong, "
        "report.examples_per_group of each at most. Each shows the gold solution and both generations with the "
        "answers extracted from them; a line that states a calculation with a wrong result is marked.",
        "robustness": "Strict exact match on fresh generated problems (mathtune.synthetic, the same templates, "
        "seed data.synthetic_seed + 1000, which neither training nor the test set uses), base few-shot and tuned "
        "zero-shot as on the evaluation set; 95% Wilson interval. Names and numbers are new, so a model that "
        "memorised look-alikes drops here.",
        "robustness.gap_points": "Tuned strict accuracy on the evaluation set minus tuned accuracy on the fresh "
        "generated problems, in percentage points; positive means the evaluation set flatters the model.",
        "robustness.seed": "The seed of the fresh generated problems (their ids are synthetic-<seed>-<index>).",
        "cost.hours": "Wall-clock hours of training (train_result.json's wall_clock_s, else elapsed_s at the last log) "
        "plus every evaluation of the run: base, tuned and, where run, robustness (each scores.json's elapsed_s). "
        "Model loading and the report are not counted.",
        "cost.usd": "Sum over training and evaluations of hours x price per hour; the price is cost.price_per_hour "
        "or a rough 2025 on-demand default for the hardware.",
        "cost.usd_per_point": "Training cost in USD divided by the accuracy gain in percentage points; none without a gain.",
        "cost.generate_s": "Seconds of training spent generating answers for exact match at evaluations "
        "(train_result.json's generate_s, else the sum of eval_generate_s); already part of the training time.",
        "cost.tokens": "Tokens processed in training, all of them, at the last training log (num_tokens).",
        "cost.tokens_per_s": "Training tokens divided by the wall-clock seconds elapsed at that log.",
        "recommendations": "Rules on the figures above; each lists the figures that triggered it.",
    }

