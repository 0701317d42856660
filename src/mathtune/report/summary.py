"""summary.json: every figure of the report from a run's records, each with its definition,
and the list of what could not be computed and why (the report never invents a number).

Pure: build_summary takes RunRecords (records.load_run reads them) and returns a dict. A figure
the records do not support is None, with a sentence in `missing`.
"""

from __future__ import annotations

from mathtune import synthetic
from mathtune.config import ReportConfig
from mathtune.report.cost import cost, throughput
from mathtune.report.curves import (
    detect_overfitting, early_stopping, final_phase, generalisation_gap, latest_per_step, loss_decrease_pct, loss_ends,
    loss_vs_exact_match, series,
)
from mathtune.report.definitions import PLANNING_GAIN_POINTS, definitions
from mathtune.report.examples import select_examples
from mathtune.report.hard_examples import (
    OUTLIER_Z, last_evaluation_losses, outlier_loss_cutoff, robust_outliers, tag_clusters,
)
from mathtune.report.recommendations import recommendations
from mathtune.report.records import RunRecords, data_location
from mathtune.report.stats import ALPHA as TEST_ALPHA
from mathtune.report.stats import (
    POWER, NotComputable, accuracy, accuracy_by_steps, arithmetic_slip_share, mcnemar_exact_p, min_detectable_gain,
    paired_table, problems_needed, regressions,
)


def build_summary(records: RunRecords) -> dict:
    """Every figure of the report, with its definition, and the list of what could not be computed and why."""
    config = records.config or {}
    missing: list[str] = []
    notes: list[str] = []
    metrics = latest_per_step(records.metrics or [])
    preds = {name: records.predictions.get(name) for name in ("base", "tuned")}
    scores = {name: records.scores.get(name) for name in ("base", "tuned")}

    training = _training(metrics, (records.train_result or {}).get("steps_per_epoch"), missing, notes)
    stopping = _early_stopping(records.train_result, config, missing)
    outliers, outlier_stats = _outliers(records.example_losses or [], records.questions or {},
                                        records.gold_steps or {}, missing)
    acc = _answers(preds, scores, missing, notes)
    cost_summary = _cost(metrics, config, records.train_result, {**records.scores, **scores}, acc["gain_points"],
                         missing)
    data = _data(records.data_info, missing)
    robustness = _robustness({name: records.predictions.get(f"robustness-{name}") for name in ("base", "tuned")},
                             {name: records.scores.get(f"robustness-{name}") for name in ("base", "tuned")},
                             acc["tuned"], missing)
    summary = {
        "model": _config_value(config, "model", "name") or (scores["base"] or {}).get("model")
        or (scores["tuned"] or {}).get("model"),
        "data": data,
        "config": {"learning_rate": _config_value(config, "train", "learning_rate"),
                   "lora_r": _config_value(config, "lora", "r"), "epochs": _config_value(config, "train", "epochs")},
        **training,
        "early_stopping": stopping,
        "outliers": outliers,
        "outlier_stats": outlier_stats,
        "accuracy": acc,
        "examples": _examples(preds, records.solutions or {}, config, notes),
        "robustness": robustness,
        "evaluation": {name: {k: (scores[name] or {}).get(k) for k in ("split", "n", "shots", "protocol", "backend",
                                                                   "max_new_tokens", "hardware")}
                       for name in ("base", "tuned")},
        "cost": cost_summary,
        "definitions": definitions(),
        "missing": missing,
        "notes": notes,
    }
    summary["recommendations"] = recommendations(summary)
    return summary


def _data(data_info: dict | None, missing: list[str]) -> dict:
    """Where the problems came from and how many were trained and validated on, from data.json."""
    if data_info is None:
        missing.append("data.json is missing, so the data source is unknown.")
    data = data_info or {}
    return {"source": data.get("source"), "synthetic": data.get("source") == "synthetic",
            "description": data_description(data_info), "location": data_location(data_info),
            "n_train": len(data["train_ids"]) if isinstance(data.get("train_ids"), list) else None,
            "n_validation": len(data["validation_ids"]) if isinstance(data.get("validation_ids"), list) else None}


def data_description(data_info: dict | None) -> str:
    """The data line of the report's header; says plainly when the problems are not GSM8K."""
    source = (data_info or {}).get("source")
    where = data_location(data_info)
    described = {
        "synthetic": "synthetic problems (not GSM8K)",
        "gsm8k-local": "GSM8K, local files",
        "gsm8k-hub": "GSM8K from the Hugging Face Hub",
    }.get(source, f"source {source!r}" if source else "unknown (no data.json)")
    return f"{described} — {where}" if where else described


def _first_last(values: list[float]) -> dict:
    return {"first": values[0] if values else None, "last": values[-1] if values else None}


def _attempt(missing: list[str], function, *args, **kwargs):
    """The function's result, or None with its reason added to `missing`."""
    try:
        return function(*args, **kwargs)
    except NotComputable as exc:
        missing.append(str(exc))
        return None


def _model_accuracy(predictions: list[dict] | None, scores: dict | None, kind: str) -> dict:
    """Accuracy from the predictions (the source of truth) when present, else from scores.json."""
    if predictions:
        return accuracy(sum(bool(p.get(f"correct_{kind}")) for p in predictions), len(predictions))
    block = (scores or {}).get(kind)
    if block and block.get("total") is not None:
        return accuracy(block["correct"], block["total"])
    return dict.fromkeys(["correct", "total", "value", "ci95"])


def _config_value(config: dict, section: str, key: str):
    return (config.get(section) or {}).get(key)


def _training(metrics: list[dict], steps_per_epoch: float | None, missing: list[str], notes: list[str]) -> dict:
    """Loss, final phase, token accuracy and generalisation from metrics.jsonl."""
    train = series(metrics, "train", "loss")
    evals = series(metrics, "eval", "eval_loss")
    if train[2] or evals[2]:
        notes.append(f"{train[2]} training and {evals[2]} validation losses were not finite (NaN or inf) and were "
                     "left out: the run may have diverged.")
    train_steps, train_losses, _ = train
    eval_steps, eval_losses, _ = evals
    if not train_steps:
        missing.append("metrics.jsonl holds no training losses, so training loss, the final phase and token accuracy "
                       "in training cannot be computed.")
    if not eval_steps:
        missing.append("metrics.jsonl holds no evaluations, so validation loss, the generalisation gap and overfitting "
                       "cannot be computed.")
    elif len(eval_steps) == 1:
        missing.append(f"Only one evaluation was logged (step {eval_steps[0]}), so the change in validation loss "
                       "cannot be computed.")
    epochs = [m for m in metrics if isinstance(m.get("epoch"), (int, float)) and m["epoch"] > 0]
    if steps_per_epoch is None and epochs:
        widest = max(epochs, key=lambda m: m["epoch"])
        steps_per_epoch = widest["step"] / widest["epoch"]

    phase = dict.fromkeys(["window_start_step", "window_end_step", "n_points", "smoothing", "loss_start", "loss_end",
                           "loss_decrease_pct", "slope_per_step", "slope_p", "still_improving", "verdict",
                           "forecast", "forecast_note"])
    if train_steps:
        phase = _attempt(missing, final_phase, train_steps, train_losses, steps_per_epoch) or phase
    if phase["forecast_note"]:
        missing.append(phase["forecast_note"])
    token_accuracy = _token_accuracy(metrics, train_steps, eval_steps, missing)
    generalisation = {"first": None, "last": None, "overfitting": None}
    if eval_steps:
        generalisation.update(generalisation_gap(train_steps, train_losses, eval_steps, eval_losses))
        generalisation["overfitting"] = _attempt(
            missing, detect_overfitting, eval_steps, eval_losses, train_steps, train_losses)
    return {
        "steps_per_epoch": steps_per_epoch,
        **_losses(train_steps, train_losses, eval_steps, eval_losses),
        "final_phase": phase,
        "token_accuracy": token_accuracy,
        "generalisation": generalisation,
        "loss_vs_exact_match": _agreement(metrics, eval_steps, eval_losses, missing),
    }


def _losses(train_steps: list[int], train_losses: list[float], eval_steps: list[int], eval_losses: list[float]) -> dict:
    """First, last and best training and validation loss, and how far each fell."""
    train_loss = {**loss_ends(train_losses), "first_step": train_steps[0] if train_steps else None,
                  "last_step": train_steps[-1] if train_steps else None, "decrease_pct": None}
    if len(train_steps) > 1:
        train_loss["decrease_pct"] = loss_decrease_pct(train_loss["first"], train_loss["last"])
    val_loss = {**_first_last(eval_losses), "best": min(eval_losses) if eval_losses else None,
                "best_step": eval_steps[eval_losses.index(min(eval_losses))] if eval_losses else None,
                "n_evals": len(eval_steps), "decrease_pct": None, "decrease_pct_last": None}
    if len(eval_steps) > 1:
        val_loss["decrease_pct"] = loss_decrease_pct(val_loss["first"], val_loss["best"])
        val_loss["decrease_pct_last"] = loss_decrease_pct(val_loss["first"], val_loss["last"])
    return {"train_loss": train_loss, "val_loss": val_loss}


def _token_accuracy(metrics: list[dict], train_steps: list[int], eval_steps: list[int], missing: list[str]) -> dict:
    """First and last token accuracy in training and on the validation set."""
    token_accuracy = {}
    for name, kind, key in (("train", "train", "mean_token_accuracy"), ("val", "eval", "eval_mean_token_accuracy")):
        token_accuracy[name] = _first_last(series(metrics, kind, key)[1])
        logged = train_steps if kind == "train" else eval_steps
        if logged and token_accuracy[name]["first"] is None:
            missing.append(f"No {kind} record carries {key}, so {name} token accuracy cannot be reported.")
    return token_accuracy


def _agreement(metrics: list[dict], eval_steps: list[int], eval_losses: list[float], missing: list[str]) -> dict:
    """Whether validation loss and exact match moved together over the evaluations that logged both."""
    exact = dict(zip(*series(metrics, "eval", "eval_exact_match_strict")[:2]))  # only some evaluations generate
    em = [(step, loss, exact[step]) for step, loss in zip(eval_steps, eval_losses) if step in exact]
    agreement = dict.fromkeys(["n", "spearman_rho", "p_value", "agree", "sentence"])
    if not em:
        missing.append("No evaluation logged exact match during training, so loss and exact match cannot be compared.")
    else:
        agreement = _attempt(missing, loss_vs_exact_match, *map(list, zip(*em))) or agreement
        if agreement["n"] and agreement["spearman_rho"] is None:
            missing.append(f"Validation loss or exact match was constant over the {agreement['n']} evaluations that "
                           "logged both, so their rank correlation is undefined.")
    return agreement


def _early_stopping(train_result: dict | None, config: dict, missing: list[str]) -> dict:
    """Early stopping as train_result.json records it; whether it was on, from there or else from the config."""
    train_config = config.get("train") or {}
    enabled = train_config["early_stopping_patience"] is not None if "early_stopping_patience" in train_config else None
    if train_result is None:
        missing.append("train_result.json is missing (the run may still be training, or it crashed), so early stopping "
                       "and the kept checkpoint cannot be reported.")
        return dict.fromkeys(["enabled", "triggered", "best_step", "best_metric", "best_metric_name", "steps_done",
                              "total_steps_planned", "steps_not_run", "kept_checkpoint"])
    stopping = early_stopping(train_result, train_result.get("early_stopping_enabled", enabled))
    if (stopping["steps_not_run"] or 0) > 0:
        why = "by early stopping" if stopping["triggered"] else "without early stopping firing (interrupted or crashed)"
        missing.append(f"The run stopped at step {stopping['steps_done']} of {stopping['total_steps_planned']} planned "
                       f"{why}; no figure describes the steps not run.")
    return stopping


def _outliers(example_losses: list[dict], questions: dict, gold_steps: dict, missing: list[str]) -> tuple[list, dict]:
    """High- and low-loss validation examples at the last evaluation, and the statistics behind them."""
    outlier_stats = {"step": None, "n": None, "median": None, "mad": None, "threshold": OUTLIER_Z,
              "loss_cutoff": None, "tag_clusters": []}
    last, latest = last_evaluation_losses(example_losses)
    if last is None:
        missing.append("example_losses.jsonl is missing or empty, so per-example outliers cannot be found.")
        return [], outlier_stats
    records = [{**r, "question": questions.get(r["id"]), "gold_steps": gold_steps.get(r["id"])} for r in latest]
    outliers = _attempt(missing, robust_outliers, records) or []
    if records:
        outlier_stats.update(outlier_loss_cutoff([r["loss"] for r in records]), step=last)
    if outliers:
        outlier_stats["tag_clusters"] = tag_clusters(outliers, records)
    unnamed = sum(o["question"] is None for o in outliers)
    if unnamed:
        missing.append(f"{unnamed} outlier(s) have no question text in the run directory, so they carry no tags.")
    return outliers, outlier_stats


def _answers(preds: dict, scores: dict, missing: list[str], notes: list[str]) -> dict:
    """Base and tuned accuracy, their paired comparison, and where the answers go wrong."""
    acc = {
        "base": _model_accuracy(preds["base"], scores["base"], "strict"),
        "tuned": _model_accuracy(preds["tuned"], scores["tuned"], "strict"),
        "flexible": {name: _model_accuracy(preds[name], scores[name], "flexible") for name in ("base", "tuned")},
        "gain_points": None, "gain_n": None, "gain_note": None, "paired": None, "mcnemar_p": None,
        "by_steps": {"base": None, "tuned": None},
        "arithmetic_slip_share": {"base": None, "tuned": None},
        "regressions": None,
    }
    for name in ("base", "tuned"):
        if not preds[name] and not scores[name]:
            missing.append(f"No {name}-model evaluation (eval/{name}/) was found, so its accuracy, the gain and the "
                           "paired test cannot be computed.")
            continue
        if not preds[name]:
            missing.append(f"eval/{name}/predictions.jsonl is missing, so the {name} model's accuracy by steps, "
                           "arithmetic slips and the paired comparison cannot be computed.")
            continue
        acc["by_steps"][name] = _attempt(missing, accuracy_by_steps, preds[name])
        acc["arithmetic_slip_share"][name] = _attempt(missing, arithmetic_slip_share, preds[name])
        expected = (scores[name] or {}).get("n")
        if isinstance(expected, int) and len(preds[name]) != expected:
            notes.append(f"eval/{name}/predictions.jsonl holds {len(preds[name])} problems but scores.json says "
                         f"{expected}: the evaluation may be unfinished; figures use the predictions.")
    if preds["base"] and preds["tuned"]:
        correct = {name: {p["id"]: bool(p.get("correct_strict")) for p in preds[name]} for name in ("base", "tuned")}
        try:
            acc["paired"] = paired_table(correct["base"], correct["tuned"])
        except NotComputable:
            acc["paired"] = None
        if acc["paired"]:
            acc["mcnemar_p"] = mcnemar_exact_p(acc["paired"]["only_base"], acc["paired"]["only_tuned"])
            acc["regressions"] = regressions(preds["base"], preds["tuned"])
    acc.update(_gain(acc, preds, scores, missing))
    if acc["gain_n"] and acc["gain_note"]:
        notes.append(acc["gain_note"])
    acc.update(_detectable(acc, missing, notes))
    return acc


def _detectable(acc: dict, missing: list[str], notes: list[str]) -> dict:
    """The smallest gain this paired evaluation could have detected, and the problems a 5-point gain needs."""
    figures = {"discordant_rate": None, "min_detectable_gain_points": None, "problems_for_5_points": None,
               "detectable_at": {"alpha": TEST_ALPHA, "power": POWER}}
    paired = acc["paired"]
    if paired is None:
        if acc["base"]["value"] is not None and acc["tuned"]["value"] is not None:
            missing.append("Without both models' predictions on shared problems there is no paired table, so the "
                           "smallest detectable gain and the problems needed for a 5-point gain are not computed.")
        return figures
    discordant = (paired["only_base"] + paired["only_tuned"]) / paired["n"]
    gain = _attempt(missing, min_detectable_gain, paired["n"], discordant)
    figures.update(discordant_rate=discordant, min_detectable_gain_points=None if gain is None else gain * 100,
                   problems_for_5_points=problems_needed(PLANNING_GAIN_POINTS / 100, discordant))
    if discordant == 0:
        notes.append(f"No problem changed sides between the models on the {paired['n']} paired problems, so the "
                     "smallest detectable gain and the problems needed assume that none gets worse after tuning "
                     "(the discordant rate equals the gain): the most favourable case, so both are lower bounds.")
    return figures


def _examples(preds: dict, solutions: dict[str, str], config: dict, notes: list[str]) -> dict | None:
    """What the model wrote: a seeded few problems per outcome (report.examples_per_group, report.examples_seed)."""
    if not preds["base"] or not preds["tuned"]:
        return None
    defaults, chosen = ReportConfig(), {}
    settings = config.get("report") if isinstance(config.get("report"), dict) else {}
    for key, least in (("examples_per_group", 0), ("examples_seed", None)):
        value = settings.get(key, getattr(defaults, key))
        if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
            notes.append(f"config.yaml's report.{key} is {value!r}, not a whole number{' >= 0' if least == 0 else ''}: "
                         f"the report uses {getattr(defaults, key)}.")
            value = getattr(defaults, key)
        chosen[key] = value
    groups = select_examples(preds["base"], preds["tuned"], chosen["examples_per_group"], chosen["examples_seed"],
                             solutions)
    unsolved = sum(e["gold_solution"] is None for g in groups for e in g["shown"])
    if unsolved:
        notes.append(f"{unsolved} problem(s) in What the model wrote are shown without their gold solution: "
                     "predictions.jsonl holds the answer only, and the run's data source does not have them on this "
                     "machine (GSM8K from the Hub is not fetched to render a report).")
    return {"per_group": chosen["examples_per_group"], "seed": chosen["examples_seed"], "groups": groups}


NO_PAIRED_GAIN = "Base and tuned were scored on different problems: no paired gain"


def _gain(acc: dict, preds: dict, scores: dict, missing: list[str]) -> dict:
    """The gain in points on the problems both models were scored on, how many those are, and a note.

    A gain over two different sets of problems measures the sets as much as the tuning, so it is
    paired: from the predictions, over the ids both files hold; from scores.json alone only when
    both name the same problems (ids_sha256).
    """
    if acc["base"]["value"] is None or acc["tuned"]["value"] is None:
        return {"gain_points": None, "gain_n": None, "gain_note": None}
    paired = acc["paired"]
    if preds["base"] and preds["tuned"]:
        if paired is None:
            note = f"{NO_PAIRED_GAIN}: their predictions share no problem id."
            missing.append(f"{note} The paired table, McNemar's test and the cost per point are not reported.")
            return {"gain_points": None, "gain_n": 0, "gain_note": note}
        gain = (paired["only_tuned"] - paired["only_base"]) / paired["n"] * 100
        note = None
        if paired["n"] < max(len(preds["base"]), len(preds["tuned"])):
            note = (f"The gain is computed on the {paired['n']} problems both models were scored on "
                    f"(base: {len(preds['base'])}, tuned: {len(preds['tuned'])}).")
        return {"gain_points": gain, "gain_n": paired["n"], "gain_note": note}
    hashes = [(scores[name] or {}).get("ids_sha256") for name in ("base", "tuned")]
    if None not in hashes and hashes[0] == hashes[1]:
        return {"gain_points": (acc["tuned"]["value"] - acc["base"]["value"]) * 100,
                "gain_n": acc["tuned"]["total"], "gain_note": None}
    why = ("their scores.json name different problems (ids_sha256)" if None not in hashes else
           "without both prediction files or both ids_sha256 it cannot be told which problems they share")
    note = f"{NO_PAIRED_GAIN}: {why}." if None not in hashes else f"No paired gain: {why}."
    missing.append(note)
    return {"gain_points": None, "gain_n": None, "gain_note": note}


def _robustness(preds: dict, scores: dict, tuned: dict, missing: list[str]) -> dict:
    """Base and tuned accuracy on fresh generated problems, and how far the tuned model drops there."""
    rob = {name: _model_accuracy(preds[name], scores[name], "strict") for name in ("base", "tuned")}
    rob["gap_points"] = None
    seeds = {parsed[0] for name in ("base", "tuned")
             for text in [p.get("id") for p in preds[name] or []] + [(scores[name] or {}).get("split")]
             if isinstance(text, str) and (parsed := synthetic.parse_id(text))}
    rob["seed"] = seeds.pop() if len(seeds) == 1 else None
    if rob["base"]["total"] is None and rob["tuned"]["total"] is None:
        missing.append("No robustness evaluation (set eval.robustness_size or run mathtune eval --robustness), so "
                       "accuracy on fresh generated problems cannot be reported.")
    elif tuned["value"] is not None and rob["tuned"]["value"] is not None:
        rob["gap_points"] = (tuned["value"] - rob["tuned"]["value"]) * 100
    return rob


# Each evaluation a run directory can hold (eval/<name>/scores.json), as its cost phase is called.
EVALUATION_PHASES = {"base": "base evaluation", "tuned": "tuned evaluation",
                     "robustness-base": "robustness evaluation, base model",
                     "robustness-tuned": "robustness evaluation, tuned model"}


def _cost(metrics: list[dict], config: dict, train_result: dict | None, scores: dict, gain: float | None,
          missing: list[str]) -> dict:
    """Hours and USD of training and of each evaluation, cost per point gained, tokens and throughput."""
    cost_config = config.get("cost") or {}
    price = cost_config.get("price_per_hour")
    phases = []
    elapsed = [m["elapsed_s"] for m in metrics if isinstance(m.get("elapsed_s"), (int, float))]
    train_seconds = (train_result or {}).get("wall_clock_s") or (max(elapsed) if elapsed else None)
    if train_seconds:
        hardware = cost_config.get("hardware") or (train_result or {}).get("hardware")
        phases.append({"phase": "training", **cost(train_seconds / 3600, hardware, price)})
    for name, phase in EVALUATION_PHASES.items():
        if scores.get(name) and isinstance(scores[name].get("elapsed_s"), (int, float)):
            phases.append({"phase": phase, **cost(scores[name]["elapsed_s"] / 3600, scores[name].get("hardware"), price)})
    unpriced = [p["phase"] for p in phases if p["usd"] is None]
    if not phases:
        missing.append("No wall-clock time was logged, so cost cannot be computed.")
    elif unpriced:
        missing.append(f"No price is known for the hardware of {', '.join(unpriced)}; set cost.price_per_hour "
                       "in the config to price it.")
    if gain is not None and gain <= 0:
        missing.append("The tuned model gained no accuracy over the base model, so there is no cost per point gained.")
    generated = [m["eval_generate_s"] for m in metrics if isinstance(m.get("eval_generate_s"), (int, float))]
    generate_s = (train_result or {}).get("generate_s")
    if generate_s is None and generated:
        generate_s = sum(generated)
    train_usd = next((p["usd"] for p in phases if p["phase"] == "training"), None)
    has_tokens = any(m.get("kind") == "train" for m in metrics)
    tokens = (_attempt(missing, throughput, metrics) if has_tokens else None) or {}
    return {
        "hours": sum(p["hours"] for p in phases) if phases else None,
        "usd": sum(p["usd"] for p in phases) if phases and not unpriced else None,
        "phases": phases,
        "usd_per_point": train_usd / gain if train_usd is not None and gain is not None and gain > 0 else None,
        "generate_s": generate_s,
        "generate_share": generate_s / train_seconds if generate_s is not None and train_seconds else None,
        "tokens": tokens.get("tokens"),
        "loss_tokens": tokens.get("loss_tokens"),
        "tokens_per_s": tokens.get("tokens_per_s"),
    }

