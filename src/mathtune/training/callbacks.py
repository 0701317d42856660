"""The Trainer's callbacks: a divergence guard, the metrics.jsonl writer, and early stopping when configured.

The guard comes before the writer, so a NaN is never logged.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from transformers import EarlyStoppingCallback, TrainerCallback

from mathtune.config import TrainConfig
from mathtune.training.rundir import append_metrics, last_checkpoint


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or blew up; the message names the step and the last good checkpoint."""


class DivergenceGuard(TrainerCallback):
    """Stops at a NaN or infinite loss, or (with divergence_factor) a training loss above factor x its lowest.

    It raises in on_log, before the Trainer saves a checkpoint at that step, so every checkpoint is a good one.
    `logged`: the records a resumed run goes on from, whose lowest loss counts.
    """

    def __init__(self, run_dir: Path, divergence_factor: float | None, logged: list[dict]):
        self.run_dir = run_dir
        self.divergence_factor = divergence_factor
        self.lowest = min((r["loss"] for r in logged if r["kind"] == "train"), default=math.inf)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        loss = logs.get("loss")
        factor = self.divergence_factor
        problem = next((f"{k} became {logs[k]}" for k in ("loss", "eval_loss")
                        if k in logs and not math.isfinite(logs[k])), None)
        if not problem and loss is not None and factor and loss > factor * self.lowest:
            problem = (f"loss rose to {loss:.4g}, above train.divergence_factor={factor:g} x its "
                       f"lowest ({self.lowest:.4g})")
        if problem:
            raise TrainingDiverged(
                f"training diverged: {problem} at step {state.global_step}; last good checkpoint: "
                f"{last_checkpoint(self.run_dir) or 'none yet'}. Lower train.learning_rate (or raise "
                "train.warmup_ratio, lower train.max_grad_norm) and start again with --overwrite or another --name."
            )
        if loss is not None:
            self.lowest = min(self.lowest, loss)


class MetricsFile(TrainerCallback):
    """Appends each log record to metrics.jsonl, one writer only under data parallelism.

    `start_time`: the clock's start, earlier than now for a resumed run so its elapsed time goes on.
    """

    def __init__(self, run_dir: Path, start_time: float):
        self.run_dir = run_dir
        self.start_time = start_time

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        kind = "eval" if any(k.startswith("eval_") for k in logs) else "train" if "loss" in logs else None
        if kind is None:
            return  # the end-of-training summary; train_result.json holds it
        record = {"kind": kind, "step": state.global_step, "epoch": state.epoch,
                  "elapsed_s": round(time.time() - self.start_time, 3)}
        record.update({k: v for k, v in logs.items() if k not in ("epoch", "step")})
        append_metrics(self.run_dir, record)


def make_callbacks(run_dir: Path, start_time: float, train: TrainConfig, logged: list[dict]) -> list[TrainerCallback]:
    """The guard, the metrics writer, and early stopping when train.early_stopping_patience is set."""
    callbacks = [DivergenceGuard(run_dir, train.divergence_factor, logged), MetricsFile(run_dir, start_time)]
    if train.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    return callbacks
