"""The training run's directory: refusing to mix two runs, the run's record, checkpoints, and the saved adapter.

Every file training writes is named here: config.yaml, environment.json and data.json (what the
run was), metrics.jsonl and example_losses.jsonl (what it logged), a counters file in each
checkpoint, the adapter and the merged model.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from mathtune import __version__
from mathtune.config import Config
from mathtune.data import Dataset
from mathtune.hardware import cpu_facts, cpu_kind, hardware_name
from mathtune.runfiles import append_jsonl, read_json, read_jsonl, write_dir, write_json, write_text
from mathtune.speedups.memory import release_free_heap

COUNTERS = "mathtune_counters.json"  # in each checkpoint: the counts the Trainer does not keep
METRICS = "metrics.jsonl"
EXAMPLE_LOSSES = "example_losses.jsonl"
MARKER = "mathtune"  # environment.json's key holding mathtune's version: the sign of a mathtune run directory


class RunDirError(ValueError):
    """The output directory holds another run; the message says how to proceed."""


def check_run_dir(run_dir: Path, overwrite: bool = False, resume: bool = False) -> bool:
    """Whether run_dir holds a run; raises where it may not be used as asked. Nothing is changed.

    `--overwrite` only ever deletes a directory that mathtune wrote (its environment.json carries the
    MARKER key), never a folder that merely holds a config.yaml.
    """
    holds_run = (run_dir / "config.yaml").exists()
    if holds_run and not (overwrite or resume):
        raise RunDirError(
            f"{run_dir} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --name / output_dir."
        )
    if holds_run and overwrite and not is_mathtune_run(run_dir):
        raise RunDirError(
            f"{run_dir} does not look like a mathtune run directory (its environment.json has no {MARKER!r} "
            "key), so --overwrite will not delete it. Choose another --name / --output-dir, or move or delete "
            "that folder yourself if it is yours to lose."
        )
    return holds_run


def prepare_run_dir(run_dir: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to mix two runs in one directory unless the user asks for it; with overwrite, empty it."""
    if check_run_dir(run_dir, overwrite=overwrite, resume=resume) and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def is_mathtune_run(run_dir: Path) -> bool:
    """True when run_dir's environment.json was written by mathtune (it carries the MARKER key)."""
    try:
        environment = read_json(run_dir / "environment.json")
    except (OSError, ValueError):
        return False
    return isinstance(environment, dict) and MARKER in environment


# --- what the run was ---------------------------------------------------------------------------


def write_run_record(run_dir: Path, config: Config, dataset: Dataset, train: list[dict],
                     validation: list[dict]) -> None:
    """config.yaml, environment.json and data.json: enough to reproduce the run and check its split."""
    import yaml

    write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
    write_json(run_dir / "environment.json", environment_info(config))
    write_data_json(run_dir, dataset, train, validation)


@functools.cache
def source_commit() -> tuple[str | None, bool | None]:
    """(the git commit of mathtune's source, whether its tracked files differ from it), or (None, None) outside a
    checkout. Read once per process, at the run record's first writing: a long run keeps running the code it
    imported even when the checkout moves on before training rewrites the record."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, cwd=Path(__file__).parent,
                                  timeout=5)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout if done.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip() or None
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return commit, (bool(status.strip()) if status is not None else None)


def environment_info(config: Config) -> dict:
    import accelerate
    import peft
    import transformers
    import trl

    commit, changed = source_commit()
    return {
        MARKER: __version__,
        "python": sys.version.split()[0],
        "packages": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "accelerate": accelerate.__version__,
        },
        "hardware": hardware_name(),
        "cpu_kind": cpu_kind(*cpu_facts(), os.environ.get("ONEDNN_MAX_CPU_ISA")),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "seed": config.train.seed,
        "git_commit": commit,
        "git_uncommitted_changes": changed,
        "command": sys.argv,
    }


def write_data_json(run_dir: Path, dataset: Dataset, train: list[dict], validation: list[dict]) -> None:
    """data.json: where the problems came from, and the ids of each side of the split."""
    write_json(run_dir / "data.json", {
        "source": dataset.source,
        "location": dataset.location,
        "train_records": len(dataset.train),
        "test_records": len(dataset.test),
        "skipped_invalid": dataset.skipped,
        "train_ids": [p["id"] for p in train],
        "validation_ids": [p["id"] for p in validation],
    })


# --- what the run logged ------------------------------------------------------------------------


def append_metrics(run_dir: Path, record: dict) -> None:
    append_jsonl(run_dir / METRICS, record)


def read_metrics(run_dir: Path) -> list[dict]:
    return read_jsonl(run_dir / METRICS)


def append_example_losses(run_dir: Path, records: list[dict]) -> None:
    for record in records:
        append_jsonl(run_dir / EXAMPLE_LOSSES, record)


def trim_metrics_after(run_dir: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint: the resumed run logs them again."""
    for name in (METRICS, EXAMPLE_LOSSES):
        path = run_dir / name
        if path.exists():
            kept = [r for r in read_jsonl(path) if r["step"] <= step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


# --- checkpoints --------------------------------------------------------------------------------


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint: the Trainer writes trainer_state.json last, so a save cut short lacks it."""
    found = sorted(run_dir.glob("checkpoints/checkpoint-[0-9]*"), key=lambda c: step_of(c.name), reverse=True)
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return checkpoint
        except (OSError, ValueError):
            print(f"warning: {checkpoint} is incomplete (its save was interrupted); skipping it", file=sys.stderr)
    return None


def step_of(checkpoint: str | None) -> int | None:
    """The step in a checkpoint's name (checkpoint-<step>), or None for no checkpoint."""
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None


def write_counters(checkpoint: Path, counters: dict) -> None:
    write_json(checkpoint / COUNTERS, counters)


def read_counters(checkpoint: Path) -> dict:
    return read_json(checkpoint / COUNTERS) or {}


# --- what the run made --------------------------------------------------------------------------


def save_adapter(trainer, target: Path) -> None:
    """Save the adapter (the best one when early stopping kept it) and its tokenizer as one directory
    that appears whole, in place of an older one."""
    release_free_heap()  # as before a checkpoint

    def fill(folder: Path) -> None:
        trainer.model.save_pretrained(folder)
        trainer.processing_class.save_pretrained(folder)

    write_dir(target, fill, replace=True)


def save_merged(peft_model, tokenizer, target: Path) -> None:
    """The base model with the adapter merged in, and the tokenizer: a model that loads without PEFT."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
