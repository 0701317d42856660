"""Advice drawn from the summary's figures by fixed rules; each item names the figures behind it."""

from __future__ import annotations

from mathtune.report.curves import ALPHA

LOW_TRAIN_DECREASE_PCT = 5.0  # training loss falling less than this suggests a higher LR or rank


def recommendations(summary: dict) -> list[dict]:
    """Advice, each item with the figures (dotted summary keys) that triggered it."""
    items = []
    phase = summary["final_phase"]
    if phase["still_improving"]:
        evidence = {"final_phase.loss_decrease_pct": phase["loss_decrease_pct"], "final_phase.slope_p": phase["slope_p"]}
        forecast = (phase.get("forecast") or {}).get("points") or []
        for point in forecast:
            evidence[f"final_phase.forecast.{point['epochs_ahead']}_epoch"] = point["loss"]
        items.append({"text": "Train for more epochs: the training loss was still falling significantly at the end.",
                      "evidence": evidence})
    overfit = summary["generalisation"]["overfitting"]
    if overfit and overfit["detected"]:
        items.append({
            "text": "Regularise more (raise lora.dropout or train.weight_decay) or train fewer epochs: validation loss "
            f"rose at {overfit['consecutive_rises']} evaluations in a row while training loss fell.",
            "evidence": {"generalisation.overfitting.val_loss_rise_pct": overfit["val_loss_rise_pct"],
                         "generalisation.overfitting.train_loss_change_pct": overfit["train_loss_change_pct"],
                         "generalisation.overfitting.from_step": overfit["from_step"],
                         "generalisation.overfitting.to_step": overfit["to_step"]},
        })
    for cluster in summary["outlier_stats"]["tag_clusters"]:
        items.append({
            "text": f"Add training problems of the kind \"{cluster['tag']}\": they dominate the high-loss validation outliers.",
            "evidence": {"outlier_stats.tag_clusters.outliers": cluster["outliers"],
                         "outlier_stats.tag_clusters.outlier_share": cluster["outlier_share"],
                         "outlier_stats.tag_clusters.validation_share": cluster["validation_share"]},
        })
    decrease = summary["train_loss"]["decrease_pct"]
    if decrease is not None and decrease < LOW_TRAIN_DECREASE_PCT:
        items.append({
            "text": f"Raise the learning rate or the LoRA rank: training loss fell less than {LOW_TRAIN_DECREASE_PCT:.0f}%.",
            "evidence": {"train_loss.decrease_pct": decrease, "config.train.learning_rate": summary["config"]["learning_rate"],
                         "config.lora.r": summary["config"]["lora_r"]},
        })
    acc = summary["accuracy"]
    if acc["mcnemar_p"] is not None and acc["mcnemar_p"] >= ALPHA:
        needed = acc.get("problems_for_5_points")
        items.append({
            "text": "Evaluate on more problems (eval.limit): the accuracy difference is within what chance "
            "produces on this many paired problems"
            + (f"; finding a 5-point gain with {acc['detectable_at']['power']:.0%} power takes {needed:,} of them."
               if needed else "."),
            "evidence": {"accuracy.gain_points": acc["gain_points"], "accuracy.mcnemar_p": acc["mcnemar_p"],
                         "accuracy.paired.n": acc["paired"]["n"],
                         "accuracy.min_detectable_gain_points": acc.get("min_detectable_gain_points"),
                         "accuracy.problems_for_5_points": needed},
        })
    return items

