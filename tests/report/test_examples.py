"""report/examples.py: which problems "What the model wrote" shows, on hand-made prediction records."""

from __future__ import annotations

import pytest

from mathtune.report.examples import GROUPS, marked_lines, select_examples


def record(i: int, correct: bool, generation: str = "#### 5", arithmetic=()) -> dict:
    return {"id": f"test-{i}", "question": f"Question {i}?", "gold": "5", "generation": generation,
            "pred_strict": "5" if correct else "6", "pred_flexible": "5" if correct else "6",
            "correct_strict": correct, "correct_flexible": correct, "arithmetic": list(arithmetic)}


# outcome by id: 0-3 fixed, 4-5 broken, 6-14 both wrong, 15-16 both right
OUTCOMES = {i: (False, True) for i in range(4)} | {i: (True, False) for i in (4, 5)} \
    | {i: (False, False) for i in range(6, 15)} | {i: (True, True) for i in (15, 16)}
BASE = [record(i, base) for i, (base, _) in OUTCOMES.items()]
TUNED = [record(i, tuned) for i, (_, tuned) in reversed(OUTCOMES.items())]  # another order than the base file


def shown(groups):
    return {g["kind"]: [e["id"] for e in g["shown"]] for g in groups}


def test_groups_hold_the_right_outcomes_and_count_them():
    groups = select_examples(BASE, TUNED, per_group=100, seed=0)
    assert [g["kind"] for g in groups] == [kind for kind, *_ in GROUPS] == ["fixed", "broken", "both_wrong"]
    assert [g["total"] for g in groups] == [4, 2, 9]
    ids = shown(groups)
    assert sorted(ids["fixed"]) == [f"test-{i}" for i in range(4)]
    assert ids["broken"] == ["test-5", "test-4"]  # in the tuned file's order
    assert all(not e["base"]["correct_strict"] and not e["tuned"]["correct_strict"] for e in groups[2]["shown"])


def test_each_group_is_a_seeded_sample_of_at_most_per_group():
    first = shown(select_examples(BASE, TUNED, per_group=3, seed=7))
    assert [len(first[k]) for k in ("fixed", "broken", "both_wrong")] == [3, 2, 3]
    assert shown(select_examples(BASE, TUNED, per_group=3, seed=7)) == first
    samples = {tuple(shown(select_examples(BASE, TUNED, per_group=3, seed=seed))["both_wrong"]) for seed in range(20)}
    assert len(samples) > 1  # the seed chooses which problems
    assert all(g["shown"] == [] for g in select_examples(BASE, TUNED, per_group=0, seed=0))
    with pytest.raises(ValueError):
        select_examples(BASE, TUNED, per_group=-1, seed=0)


def test_only_problems_in_both_files_are_paired():
    groups = select_examples(BASE[:3], TUNED, per_group=10, seed=0)
    assert [g["total"] for g in groups] == [3, 0, 0]


def test_an_example_carries_the_question_gold_solution_and_both_sides():
    slip = {"expression": "3 + 2", "claimed": "6", "value": "5", "ok": False}
    fine = {"expression": "1+1", "claimed": "2", "value": "2", "ok": True}
    base = [record(0, False, "We add.\n3 + 2 = 6\n#### 6", [slip, fine])]
    tuned = [record(0, True, "3+2=<<3+2=5>>5\n#### 5", [{**fine, "expression": "3+2", "claimed": "5", "value": "5"}])]
    fixed = select_examples(base, tuned, 1, 0, {"test-0": "3 + 2 = <<3+2=5>>5\n#### 5"})[0]
    example = fixed["shown"][0]
    assert (example["id"], example["question"], example["gold"]) == ("test-0", "Question 0?", "5")
    assert example["gold_solution"] == "3 + 2 = <<3+2=5>>5\n#### 5"
    assert example["base"]["slips"] == [{"expression": "3 + 2", "claimed": "6", "value": "5"}]
    assert [line["slip"] for line in example["base"]["lines"]] == [False, True, False]
    assert example["tuned"]["slips"] == [] and not any(line["slip"] for line in example["tuned"]["lines"])
    assert (example["base"]["pred_strict"], example["tuned"]["pred_strict"]) == ("6", "5")
    assert select_examples(base, tuned, 1, 0)[0]["shown"][0]["gold_solution"] is None


def test_a_line_is_marked_where_it_states_a_slip_and_nowhere_else():
    slips = [{"expression": "48/2", "claimed": "25", "value": "24"}]
    text = "Half is 48 / 2 = $25.\nThen <<48/2=25>>25 again\n148/2 = 74 is right\nSo 25 in all."
    assert [line["slip"] for line in marked_lines(text, slips)] == [True, True, False, False]
    assert [line["text"] for line in marked_lines(text, slips)] == text.split("\n")
    assert marked_lines("a\n\nb", []) == [{"text": "a", "slip": False}, {"text": "", "slip": False},
                                          {"text": "b", "slip": False}]
