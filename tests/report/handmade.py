"""Hand-made run records for the report's tests: curves, predictions and whole run directories
(following docs/run-directory.md) whose figures are known."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import yaml

EVIL = 'Tom has <script>alert(1)</script> 3 <b>bold</b> apples & 2 pears | "quoted". How many?'


# A noisy series whose true level falls from about 1.0 to about 0.86; its first log happens to be
# low and its last high, so the first and last single logs show a rise.
NOISY_FALL = [0.92, 1.05, 1.02, 0.99, 1.04, 1.0, 0.98, 0.97, 0.95, 0.96,
              0.93, 0.92, 0.91, 0.9, 0.89, 0.86, 0.85, 0.87, 0.84, 0.96]


def falling_curve(n=100, noise=0.01, seed=0):
    """A power-law loss still falling at the end, with a little noise."""
    rng = np.random.default_rng(seed)
    steps = [10 * (i + 1) for i in range(n)]
    losses = [2.0 * s**-0.3 + 0.5 + rng.normal(0, noise) for s in steps]
    return steps, losses


def flat_curve(n=100, noise=0.02, seed=1):
    """A loss that falls, then stays flat from step 300."""
    rng = np.random.default_rng(seed)
    steps = [10 * (i + 1) for i in range(n)]
    losses = [0.8 + max(0.0, 1 - s / 300) + rng.normal(0, noise) for s in steps]  # falls, then flat from step 300
    return steps, losses


def pred(i, correct, steps=2, slip=False, q="Tom has 3 apples."):
    """One scored prediction, as predictions.jsonl holds it, with the fields the statistics read."""
    return {"id": f"test-{i}", "question": q, "gold": "3", "gold_steps": steps, "pred_strict": "3" if correct else "4",
            "pred_flexible": "3" if correct else "4", "correct_strict": correct, "correct_flexible": correct,
            "arithmetic_slip": slip}


def logged_metrics(steps, losses, eval_every=100, eval_losses=None):
    """Training logs at `steps` and an evaluation every `eval_every` steps, as metrics.jsonl holds them."""
    records = [{"kind": "train", "step": s, "epoch": s / 500, "elapsed_s": s * 3.6, "loss": v, "learning_rate": 2e-4,
                "grad_norm": 1.0, "mean_token_accuracy": 0.5 + 0.1 * s / steps[-1], "num_tokens": s * 1000,
                "num_loss_tokens": s * 400} for s, v in zip(steps, losses)]
    eval_steps = [s for s in steps if s % eval_every == 0]
    for s, v in zip(eval_steps, eval_losses or [losses[steps.index(s)] + 0.1 for s in eval_steps]):
        records.append({"kind": "eval", "step": s, "epoch": s / 500, "elapsed_s": s * 3.6, "eval_loss": v,
                        "eval_mean_token_accuracy": 0.6})
    return records


def write_jsonl(path: Path, records: list[dict], torn_tail: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    path.write_text(text + (torn_tail or ""))


def run_metrics(n_logs: int = 40, eval_every: int = 5) -> list[dict]:
    """metrics.jsonl of a small run: training logs every 10 steps and an evaluation with exact match every 50."""
    records = []
    for i in range(1, n_logs + 1):
        step = 10 * i
        records.append({"kind": "train", "step": step, "epoch": step / 200, "elapsed_s": step * 2.0,
                        "loss": 1.2 * step**-0.25 + 0.3 + 0.01 * math.sin(i), "learning_rate": 2e-4 * (1 - step / 500),
                        "grad_norm": 1.0, "mean_token_accuracy": 0.6 + 0.1 * i / n_logs,
                        "num_tokens": step * 900, "num_loss_tokens": step * 300})
        if i % eval_every == 0:
            records.append({"kind": "eval", "step": step, "epoch": step / 200, "elapsed_s": step * 2.0 + 1,
                            "eval_loss": 1.2 * step**-0.2 + 0.35, "eval_mean_token_accuracy": 0.62 + 0.08 * i / n_logs,
                            "eval_exact_match_strict": 0.1 + 0.005 * i, "eval_exact_match_flexible": 0.12 + 0.005 * i,
                            "eval_exact_match_n": 20, "eval_generate_s": 3.0})
    return records


def _prediction(i: int, correct: bool, question: str = "Sam has 3 pens and buys 2. How many pens?") -> dict:
    return {"id": f"test-{i}", "question": question, "gold": "5", "gold_steps": 2 + i % 3,
            "generation": "3 + 2 = <<3+2=5>>5\n#### 5" if correct else "<i>3 + 2 = 6</i>\n#### 6",
            "generated_tokens": 20, "pred_strict": "5" if correct else "6", "pred_flexible": "5" if correct else "6",
            "correct_strict": correct, "correct_flexible": correct,
            "arithmetic": [{"expression": "3+2", "claimed": "5" if correct else "6", "value": "5", "ok": correct}],
            "arithmetic_slip": not correct}


def _scores(predictions: list[dict], model: str, shots: int) -> dict:
    correct = sum(p["correct_strict"] for p in predictions)
    block = {"correct": correct, "total": len(predictions), "value": correct / len(predictions), "ci95": [0, 1]}
    return {"model": model, "adapter": None, "split": "test", "n": len(predictions), "shots": shots,
            "ids_sha256": "x", "strict": block, "flexible": block, "arithmetic_slip_share": 0.5,
            "accuracy_by_steps": {}, "elapsed_s": 360.0, "problems_per_s": 0.1, "generated_tokens_per_s": 5.0,
            "max_new_tokens": 256, "hardware": "NVIDIA H100 80GB HBM3"}


def make_run(root: Path, evaluate: bool = True, source: str = "synthetic") -> Path:
    """A small complete run: 40 training logs, 8 evaluations, 40 validation losses, base and tuned evaluations."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({
        "name": "hand-made", "model": {"name": "gemma-3-270m"},
        "train": {"learning_rate": 2e-4, "early_stopping_patience": 5, "epochs": 2}, "lora": {"r": 8},
        "cost": {"hardware": None, "price_per_hour": None}}))
    (run / "data.json").write_text(json.dumps({"source": source, "path": None, "train_ids": ["train-0"] * 90,
                                               "validation_ids": [f"train-{i}" for i in range(40)]}))
    write_jsonl(run / "metrics.jsonl", run_metrics())
    losses = [{"step": 400, "id": f"train-{i}", "loss": 0.8 + 0.005 * i, "token_accuracy": 0.7, "n_tokens": 90,
               "question": "Ann reads 4 pages a day. How many pages in 3 days?", "gold_steps": 2} for i in range(40)]
    losses[3].update(loss=4.0, question=EVIL)
    write_jsonl(run / "example_losses.jsonl", losses)
    (run / "train_result.json").write_text(json.dumps({
        "early_stopping_triggered": False, "best_step": 400, "best_metric": 0.7, "total_steps_planned": 400,
        "steps_done": 400, "hardware": "NVIDIA H100 80GB HBM3"}))
    if evaluate:
        base = [_prediction(i, i % 4 == 0, EVIL if i == 0 else "Sam has 3 pens and buys 2. How many pens?")
                for i in range(20)]
        tuned = [_prediction(i, i % 2 == 1 or i == 4, EVIL if i == 0 else "Sam has 3 pens and buys 2. How many pens?")
                 for i in range(20)]
        write_jsonl(run / "eval" / "base" / "predictions.jsonl", base)
        write_jsonl(run / "eval" / "tuned" / "predictions.jsonl", tuned)
        (run / "eval" / "base" / "scores.json").write_text(json.dumps(_scores(base, "gemma-3-270m", 8)))
        (run / "eval" / "tuned" / "scores.json").write_text(json.dumps(_scores(tuned, "gemma-3-270m", 0)))
    return run
