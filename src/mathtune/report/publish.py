"""A run's results to share: the report without data-set text or generations, and the small files behind it.

A run directory holds what may not be published with the results: the data set's questions and
solutions (in predictions, in summary.json's outliers, regressions and examples, and in the
reports), the model's generations (which quote and paraphrase them), and weights (adapter,
checkpoints). `mathtune report RUN_DIR --publish DEST` writes to DEST the same report with every
such text left out (ids, answers, counts and figures stay) and copies the run's own small records,
named one by one in PUBLISHED_FILES: nothing else of the run directory is copied.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

from mathtune.report.records import EVALUATIONS

# Copied as they are: configuration, machine, training records and scores. None holds data-set text.
PUBLISHED_FILES = ("config.yaml", "environment.json", "metrics.jsonl", "train_result.json",
                   *(f"eval/{name}/scores.json" for name in EVALUATIONS))
NOTE = ("This is a published copy (mathtune report --publish): the data set's text and the models' generations "
        "are left out; ids, answers and every figure are the run's.")


class PublishError(ValueError):
    """A destination that cannot hold a published copy."""


def without_text(summary: dict) -> dict:
    """A copy of the summary with the data set's text and the models' generations set to None.

    Questions (outliers, regressions, examples), gold solutions and generated lines go; ids, gold
    and extracted answers, losses, tags, arithmetic slips (an expression and two numbers) and every
    figure stay. `text_left_out` tells the pages to say so where a text would be.
    """
    out = copy.deepcopy(summary)
    for outlier in out.get("outliers") or []:
        outlier["question"] = None
    for regression in (out.get("accuracy") or {}).get("regressions") or []:
        regression["question"] = None
    for group in (out.get("examples") or {}).get("groups") or []:
        for example in group.get("shown") or []:
            example["question"] = example["gold_solution"] = None
            for side in ("base", "tuned"):
                if isinstance(example.get(side), dict):
                    example[side]["lines"] = None
    out["text_left_out"] = True
    out["notes"] = [*(out.get("notes") or []), NOTE]
    return out


def copy_records(run_dir: Path, dest: Path) -> list[str]:
    """Copy PUBLISHED_FILES that exist from run_dir into dest; returns the relative paths copied."""
    copied = []
    for name in PUBLISHED_FILES:
        source = run_dir / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest / name)
            copied.append(name)
    return copied
