"""Experiment trackers (train.report_to): transformers' reporting callbacks, as TRL's SFTTrainer uses them.

The Trainer makes the callbacks and sends them every log record, exact match during training included
(MathTuneTrainer.evaluate logs it with the losses). What is ours: the names are checked and the trackers
made once before a run starts, so a typo or a tracker that is not installed fails before any work;
TensorBoard writes into the run directory; and the base and tuned accuracy, known only after training,
are sent to the same trackers at the last training step.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mathtune.config import Config, ConfigError

TENSORBOARD_DIR = "tensorboard"  # RUN_DIR/tensorboard, unless $TENSORBOARD_LOGGING_DIR names another
INSTALL = {"tensorboard": "pip install 'mathtune[tensorboard]'"}  # else: pip install <name>


def tracker_names() -> list[str]:
    """The names transformers accepts in report_to (besides "all" and "none", which mathtune does not take:
    a run should not depend on what happens to be installed)."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return list(INTEGRATION_TO_CALLBACK)


def check_installed(names: list[str]) -> None:
    """Make each named tracker's callback once, as the Trainer will: one whose package is missing is a ConfigError
    saying what to install, raised before the run directory or any model is touched."""
    if not names:
        return
    from transformers.integrations import get_reporting_integration_callbacks

    for name, callback in zip(names, get_reporting_integration_callbacks(list(names))):
        try:
            callback()
        except (ImportError, RuntimeError) as exc:
            raise ConfigError(
                f"train.report_to names {name!r}, which cannot be used here ({exc}). Install it "
                f"({INSTALL.get(name, f'pip install {name}')}) or remove it from train.report_to."
            ) from exc


def place_logs(callbacks: list, run_dir: Path) -> None:
    """TensorBoard writes its event files into RUN_DIR/tensorboard (transformers' default is a dated folder under
    the checkpoints), unless $TENSORBOARD_LOGGING_DIR names a directory."""
    from transformers.integrations import TensorBoardCallback

    for callback in callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = str(Path(run_dir) / TENSORBOARD_DIR)


def final_accuracy_logs(scores: dict[str, dict | None], split: str) -> dict[str, float]:
    """The base and tuned exact match (strict and flexible shares) of scores.json as tracker keys: `test_*` on the
    test split (shown as test/... by the trackers), `eval_*` on another, like the Trainer's own prefixes."""
    prefix = "test" if split == "test" else "eval"
    return {f"{prefix}_{model}_exact_match_{kind}": float(block[kind]["value"])
            for model, block in scores.items() if block
            for kind in ("strict", "flexible") if (block.get(kind) or {}).get("value") is not None}


def log_final_accuracy(config: Config, run_dir: Path, scores: dict[str, dict | None], step: int) -> dict[str, float]:
    """Send the base and tuned accuracy to the trackers of train.report_to at training step `step`; returns what
    was sent.

    Training has closed its trackers by now, so each is made again with the Trainer's arguments and closed
    after: TensorBoard adds an event file to the same directory (one run in TensorBoard); a tracker whose
    callback opens a run (wandb, trackio, mlflow) goes on with the process's active run where it keeps one.
    A tracker that fails here (a network error) is reported on stderr, not raised: the figures are in scores.json.
    """
    logs = final_accuracy_logs(scores, config.eval.split)
    if not config.train.report_to or not logs:
        return {}
    from transformers import TrainerControl, TrainerState
    from transformers.integrations import get_reporting_integration_callbacks

    from mathtune.hardware import resolve_dtype
    from mathtune.training.settings import sft_config

    args = sft_config(config, run_dir, resolve_dtype(config.model.dtype))
    state, control = TrainerState(global_step=step), TrainerControl()
    for name, make in zip(args.report_to, get_reporting_integration_callbacks(args.report_to)):
        try:
            callback = make()
            place_logs([callback], run_dir)
            callback.on_log(args, state, control, logs=dict(logs))
            callback.on_train_end(args, state, control)
        except Exception as exc:  # noqa: BLE001: any tracker's own error; the run's results are already written
            print(f"warning: the final accuracy could not be sent to {name}: {type(exc).__name__}: {exc}",
                  file=sys.stderr, flush=True)
    return logs
