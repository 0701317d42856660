"""What the model wrote: a few concrete problems per outcome, with both models' generations side by side.

Pure: select_examples takes the two prediction files' records (docs/run-directory.md) and returns the
problems the tuning fixed, the ones it broke, and some both models got wrong, each a seeded sample of at
most `per_group`, so that the same run always shows the same problems. Nothing here judges an answer
again: correctness and arithmetic slips are the evaluation's, as predictions.jsonl records them.
"""

from __future__ import annotations

import random
import re

# (kind, title, base correct, tuned correct): the outcomes shown, in the order the report shows them
GROUPS = (
    ("fixed", "Fixed by the tuning: wrong before, right after", False, True),
    ("broken", "Broken by the tuning: right before, wrong after", True, False),
    ("both_wrong", "Wrong before and after", False, False),
)


def select_examples(base: list[dict], tuned: list[dict], per_group: int, seed: int,
                    solutions: dict[str, str] | None = None) -> list[dict]:
    """One entry per outcome of GROUPS: its kind, title, how many problems have it, and up to `per_group` of them.

    Problems are paired by id (those both files hold) and judged by `correct_strict`. Each group's sample is
    drawn with random.Random(seed) from its problems in the tuned file's order, and shown in that order.
    `solutions` maps a problem id to its gold solution text, where the run directory's data source has it.
    """
    if per_group < 0:
        raise ValueError(f"per_group must be >= 0, got {per_group}")
    by_id = {record["id"]: record for record in base}
    pairs = [(by_id[t["id"]], t) for t in tuned if t["id"] in by_id]
    groups = []
    for kind, title, base_right, tuned_right in GROUPS:
        members = [pair for pair in pairs
                   if bool(pair[0].get("correct_strict")) == base_right
                   and bool(pair[1].get("correct_strict")) == tuned_right]
        chosen = sorted(random.Random(seed).sample(range(len(members)), min(per_group, len(members))))
        groups.append({"kind": kind, "title": title, "total": len(members),
                       "shown": [example(*members[i], (solutions or {}).get(members[i][1]["id"])) for i in chosen]})
    return groups


def example(base: dict, tuned: dict, solution: str | None) -> dict:
    """One problem as the report shows it: the question, the gold solution and answer, and each model's side."""
    return {
        "id": tuned["id"],
        "question": tuned.get("question") or base.get("question"),
        "gold": tuned.get("gold") if tuned.get("gold") is not None else base.get("gold"),
        "gold_solution": solution,
        "base": side(base),
        "tuned": side(tuned),
    }


def side(record: dict) -> dict:
    """One model's generation cut into lines, each marked when it holds one of the record's arithmetic slips,
    with the extracted answers, their correctness and the slips themselves."""
    generation = record.get("generation")
    slips = [{k: check.get(k) for k in ("expression", "claimed", "value")}
             for check in record.get("arithmetic") or [] if isinstance(check, dict) and check.get("ok") is False]
    return {
        "lines": marked_lines(generation, slips) if isinstance(generation, str) else None,
        "pred_strict": record.get("pred_strict"),
        "pred_flexible": record.get("pred_flexible"),
        "correct_strict": bool(record.get("correct_strict")),
        "correct_flexible": bool(record.get("correct_flexible")),
        "slips": slips,
    }


def marked_lines(text: str, slips: list[dict]) -> list[dict]:
    """The text's lines, each {"text", "slip"}: slip when the line states one of the slips' expressions followed
    by '=' ('3 + 2 = 6' or '<<3+2=6>>'), compared without spaces and '$' signs, as the evaluation records the
    expression without '$' and a plain statement keeps its spaces while an annotation has none."""
    expressions = {_bare(s["expression"]) for s in slips if isinstance(s.get("expression"), str)} - {""}
    # not inside a longer number: '3+2' is not stated by '13+2=15'
    stated = [re.compile(rf"(?<![0-9.,]){re.escape(e)}=") for e in sorted(expressions)]
    return [{"text": line, "slip": any(p.search(_bare(line)) for p in stated)} for line in text.split("\n")]


def _bare(text: str) -> str:
    return "".join(text.replace("$", "").split())
