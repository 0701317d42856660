"""Shared fixtures: the real GSM8K files beside the checkout, and small GSM8K-format directories."""

import json
import os
from pathlib import Path

import pytest

GSM8K_DIR = Path(os.environ.get("MATHTUNE_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    if not (GSM8K_DIR / "train.jsonl").exists():
        pytest.fail(f"GSM8K not found at {GSM8K_DIR}: set MATHTUNE_DATA to a directory with train.jsonl and test.jsonl")
    return GSM8K_DIR


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture
def small_gsm8k(tmp_path: Path, gsm8k_dir: Path) -> Path:
    """The first 40 train and 10 test problems of GSM8K in a directory of their own."""
    directory = tmp_path / "gsm8k-small"
    directory.mkdir()
    for split, n in (("train", 40), ("test", 10)):
        lines = (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()[:n]
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


# The summary.json keys the report promises (the analysis-report issue's list).
REQUIRED_SUMMARY_KEYS = [
    "train_loss.first", "train_loss.last", "train_loss.decrease_pct", "val_loss.first", "val_loss.best",
    "val_loss.last", "val_loss.decrease_pct", "val_loss.decrease_pct_last", "final_phase.loss_decrease_pct",
    "final_phase.still_improving", "token_accuracy.train.first", "token_accuracy.train.last",
    "token_accuracy.val.first", "token_accuracy.val.last", "early_stopping.triggered", "outliers",
    "accuracy.base", "accuracy.tuned", "accuracy.mcnemar_p", "accuracy.min_detectable_gain_points",
    "accuracy.problems_for_5_points", "examples", "cost.hours", "cost.usd", "recommendations",
    "definitions", "missing",
]


def summary_lookup(summary: dict, dotted: str):
    node = summary
    for part in dotted.split("."):
        assert part in node, f"summary lacks {dotted}"
        node = node[part]
    return node


@pytest.fixture
def vllm_installed(monkeypatch):
    """Call with True or False: from then on the vllm package looks installed or missing to find_spec
    (every other package as it is)."""
    import importlib.util

    find_spec = importlib.util.find_spec

    def pretend(installed: bool) -> None:
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *rest: (object() if installed else None) if name == "vllm"
                            else find_spec(name, *rest))

    return pretend
