"""A run directory's files, read into one RunRecords: the report's only input.

This is the report's reading edge: it reads the files described in docs/run-directory.md (each
one optional; runfiles drops a torn last JSONL line with a warning) and looks up the question
text of problems the records name only by id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mathtune import data, synthetic
from mathtune.answers import count_reasoning_steps
from mathtune.runfiles import read_json, read_jsonl

EVALUATIONS = ("base", "tuned", "robustness-base", "robustness-tuned")  # eval/<name>/ in a run directory


@dataclass
class RunRecords:
    """The files of one run directory as read; an absent file is empty or None, never an error."""

    config: dict = field(default_factory=dict)  # config.yaml
    metrics: list[dict] = field(default_factory=list)  # metrics.jsonl
    example_losses: list[dict] = field(default_factory=list)  # example_losses.jsonl
    train_result: dict | None = None  # train_result.json
    data_info: dict | None = None  # data.json
    # eval/<name>/predictions.jsonl and eval/<name>/scores.json by evaluation name (EVALUATIONS); None when absent
    predictions: dict[str, list[dict] | None] = field(default_factory=dict)
    scores: dict[str, dict | None] = field(default_factory=dict)
    # Question text and gold step count by problem id, from the data source and from the records themselves
    questions: dict[str, str] = field(default_factory=dict)
    gold_steps: dict[str, int] = field(default_factory=dict)
    # The gold solution text of the base and tuned evaluations' problems, where the data source is on this machine
    solutions: dict[str, str] = field(default_factory=dict)


def data_location(data_info: dict | None) -> str | None:
    """Where the problems came from: a directory, a Hub id or the generator's seeds."""
    return (data_info or {}).get("path") or (data_info or {}).get("location")


def read_config(path: Path, notes: list[str]) -> dict:
    """The resolved config, or {} (with a note) when it is absent or not a YAML mapping."""
    if not path.exists():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        notes.append(f"{path.name} is not a valid YAML mapping and was ignored.")
        return {}
    return config


def source_problems(data_info: dict | None, ids: set[str]) -> dict[str, dict]:
    """Question text, gold solution and gold step count of problems named by id, from where the run got them.

    example_losses.jsonl names validation problems by id alone, and predictions.jsonl holds the gold
    answer but not the solution. Generated problems are regenerated
    from their seed (generate(n, seed) is a prefix of every longer run); GSM8K problems are re-read
    from the run's local files when they exist on this machine. Hub data is not fetched: rendering
    a report must not need the network.
    """
    source = (data_info or {}).get("source")
    location = data_location(data_info)
    problems: list[dict] = []
    # Generated ids name their seed, whatever the run's source (robustness problems come from a fresh seed).
    last_index: dict[int, int] = {}
    for parsed in map(synthetic.parse_id, ids):
        if parsed and parsed[1] is not None:
            seed, index = parsed
            last_index[seed] = max(index, last_index.get(seed, 0))
    for seed, index in last_index.items():
        problems += synthetic.generate(index + 1, seed)
    if source == "gsm8k-local" and location and Path(location).is_dir():
        for split in {i.rpartition("-")[0] for i in ids} & {"train", "test"}:
            path = Path(location) / f"{split}.jsonl"
            if path.exists():
                problems += data.read_problems(path, split, skip_invalid=True)[0]
    return {p["id"]: {"question": p["question"], "solution": p["answer"], "gold_steps": count_reasoning_steps(p["answer"])}
            for p in problems if p["id"] in ids}


def load_run(run_dir: Path) -> tuple[RunRecords, list[str]]:
    """The run directory's records, and notes on what was ignored."""
    notes: list[str] = []
    data_info = read_json(run_dir / "data.json")
    example_losses = read_jsonl(run_dir / "example_losses.jsonl")
    preds = {name: read_jsonl(run_dir / "eval" / name / "predictions.jsonl") or None for name in EVALUATIONS}
    scores = {name: read_json(run_dir / "eval" / name / "scores.json") for name in EVALUATIONS}
    # Question text, solution and gold steps: from the data source, then from any record that carries them.
    named = example_losses + [r for name in ("base", "tuned") for r in preds[name] or []]
    problems = source_problems(data_info, {r["id"] for r in named if isinstance(r.get("id"), str)})
    for record in example_losses + [r for name in EVALUATIONS for r in preds[name] or []]:
        if isinstance(record.get("id"), str) and isinstance(record.get("question"), str):
            problems.setdefault(record["id"], {}).update(
                {k: record[k] for k in ("question", "gold_steps") if record.get(k) is not None})
    records = RunRecords(
        config=read_config(run_dir / "config.yaml", notes),
        metrics=read_jsonl(run_dir / "metrics.jsonl"),
        example_losses=example_losses,
        train_result=read_json(run_dir / "train_result.json"),
        data_info=data_info,
        predictions=preds,
        scores=scores,
        questions={i: p["question"] for i, p in problems.items() if "question" in p},
        gold_steps={i: p["gold_steps"] for i, p in problems.items() if "gold_steps" in p},
        solutions={i: p["solution"] for i, p in problems.items() if "solution" in p},
    )
    return records, notes
