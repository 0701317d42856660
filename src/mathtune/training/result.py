"""train_result.json: what a finished training run did, from the Trainer's state and our counters."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import EarlyStoppingCallback

from mathtune.config import TrainConfig
from mathtune.hardware import hardware_name
from mathtune.training.rundir import step_of


def train_result(trainer, result, train: TrainConfig, *, elapsed: float, n_train_examples: int,
                 num_processes: int, dtype: torch.dtype, dropped: list[str], resumed_from: Path | None) -> dict:
    """The summary train() returns and writes; `result`: what trainer.train() returned.

    It calls trainer.loss_tokens_total(), a collective: every process calls this.
    """
    state = trainer.state
    steps_planned = state.max_steps
    stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    return {
        "wall_clock_s": round(elapsed, 1),
        "steps_done": state.global_step,
        "total_steps_planned": steps_planned,
        "steps_per_epoch": math.ceil(n_train_examples / (train.batch_size * train.gradient_accumulation_steps
                                                         * num_processes)),
        "epochs_done": state.epoch,
        "early_stopping_enabled": stopper is not None,
        "early_stopping_triggered": bool(stopper and state.global_step < steps_planned),
        "best_metric_name": trainer.args.metric_for_best_model if stopper else None,
        "best_metric": state.best_metric,
        "best_checkpoint": state.best_model_checkpoint,
        "best_step": step_of(state.best_model_checkpoint),
        "kept": "best checkpoint" if stopper else "last step",
        "train_tokens": trainer._total_train_tokens,
        "train_loss_tokens": trainer.loss_tokens_total(),
        "tokens_per_s": round(trainer._total_train_tokens / elapsed, 2) if elapsed else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "eval_s": round(trainer.eval_seconds, 1),  # evaluations during training, part of train_runtime_s
        "generate_s": round(trainer.generate_seconds, 1),  # exact match at evaluations, part of eval_s
        "hardware": hardware_name(),
        "num_processes": num_processes,
        "dtype": str(dtype).removeprefix("torch."),
        "dropped_too_long": dropped,
        "resumed_from": str(resumed_from) if resumed_from else None,
    }
