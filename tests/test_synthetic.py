"""The synthetic problem generator: correct arithmetic, GSM8K's format, determinism, template coverage."""

import json
import re
from collections import Counter

import pytest

from mathtune import synthetic
from mathtune.answers import ANNOTATION_RE as ANNOTATION, check_arithmetic, count_reasoning_steps, gold_answer
from mathtune.data import check_record

SEEDS = (0, 1, 7, 1234, 99991)


@pytest.fixture(scope="module")
def problems():
    """2,000 problems from five seeds."""
    return [p for seed in SEEDS for p in synthetic.generate(400, seed)]


def test_every_annotation_recomputes(problems):
    for p in problems:
        checks = check_arithmetic(p["answer"])
        assert len(checks) == p["steps"], p
        assert all(c["ok"] for c in checks), p


def test_gsm8k_format(problems):
    for p in problems:
        assert set(p) == {"id", "question", "answer", "template", "steps"}
        assert check_record(p) is None, p
        assert p["question"].endswith("?"), p
        lines = p["answer"].split("\n")
        assert re.fullmatch(r"#### [1-9][0-9]*", lines[-1]), p
        assert p["answer"].count("####") == 1, p
        assert len(lines) - 1 == p["steps"] == count_reasoning_steps(p["answer"])
        assert all(len(ANNOTATION.findall(line)) == 1 for line in lines[:-1]), p


def test_answer_is_positive_integer_from_last_step(problems):
    for p in problems:
        answer = gold_answer(p["answer"])
        assert int(answer) > 0
        last_result = ANNOTATION.findall(p["answer"])[-1][1]
        assert last_result == answer, p


def test_every_intermediate_is_a_positive_integer(problems):
    results = [r for p in problems for _, r in ANNOTATION.findall(p["answer"])]
    assert all(re.fullmatch(r"[1-9][0-9]*", r) for r in results)


def test_ids_and_templates(problems):
    by_name = {t.name: t for t in synthetic.TEMPLATES}
    assert [p["id"] for p in problems[:3]] == ["synthetic-0-0", "synthetic-0-1", "synthetic-0-2"]
    assert len({p["id"] for p in problems}) == len(problems)
    for p in problems:
        assert p["steps"] == by_name[p["template"]].steps


def test_same_seed_same_problems():
    assert synthetic.generate(60, 5) == synthetic.generate(60, 5)


def test_shorter_run_is_a_prefix():
    assert synthetic.generate(20, 3)[:10] == synthetic.generate(10, 3)
    assert synthetic.generate(0, 3) == []


def test_different_seeds_different_numbers():
    def numbers(seed):
        return [re.findall(r"\d+", p["question"]) for p in synthetic.generate(100, seed)]

    a, b = numbers(1), numbers(2)
    assert sum(x != y for x, y in zip(a, b)) > 90
    assert [p["answer"] for p in synthetic.generate(100, 1)] != [p["answer"] for p in synthetic.generate(100, 2)]


def test_at_least_30_templates_with_unique_names():
    names = [t.name for t in synthetic.TEMPLATES]
    assert len(names) >= 30
    assert len(set(names)) == len(names)


def test_step_counts_2_to_8_are_covered():
    assert {t.steps for t in synthetic.TEMPLATES} == set(range(2, 9))


def test_kinds_cover_gsm8k_topics():
    kinds = Counter(t.kind for t in synthetic.TEMPLATES)
    expected = {"rates", "unit_price", "percent", "fractions", "time_units", "price_tiers", "comparison", "multi_person"}
    assert set(kinds) == expected
    assert all(n >= 3 for n in kinds.values()), kinds


def test_every_template_is_used_once_per_round():
    for seed in SEEDS:
        used = Counter(p["template"] for p in synthetic.generate(2 * len(synthetic.TEMPLATES), seed))
        assert used == {t.name: 2 for t in synthetic.TEMPLATES}


def test_names_and_objects_vary():
    questions = {p["question"] for seed in SEEDS for p in synthetic.generate(len(synthetic.TEMPLATES), seed)}
    assert len(questions) == len(SEEDS) * len(synthetic.TEMPLATES)


def test_questions_are_not_copied_from_gsm8k(problems, gsm8k_dir):
    lines = (gsm8k_dir / "train.jsonl").read_text().splitlines()
    gsm8k = {json.loads(line)["question"] for line in lines}
    assert not gsm8k & {p["question"] for p in problems}


def _fake_template(monkeypatch, name, build, steps=2):
    template = synthetic.Template(name, "rates", steps, build)
    monkeypatch.setattr(synthetic, "TEMPLATES", [template])


def test_wrong_annotation_raises(monkeypatch):
    def wrong(rng):
        s = synthetic._Solution()
        s.step("She has", "3*4", 12)
        s.step("Then she has", "12+5", 18)  # 12 + 5 is 17
        return "How many does she have?", s

    _fake_template(monkeypatch, "wrong", wrong)
    with pytest.raises(ValueError, match="12\\+5"):
        synthetic.generate(1, 0)


def test_step_count_mismatch_raises(monkeypatch):
    def short(rng):
        s = synthetic._Solution()
        s.step("She has", "3*4", 12)
        return "How many does she have?", s

    _fake_template(monkeypatch, "short", short, steps=2)
    with pytest.raises(ValueError, match="1 solution lines"):
        synthetic.generate(1, 0)


def test_unsatisfiable_constraints_raise(monkeypatch):
    def never(rng):
        synthetic._need(False)

    _fake_template(monkeypatch, "never", never)
    with pytest.raises(RuntimeError, match="never"):
        synthetic.generate(1, 0)


def test_parse_id_reads_seed_and_index_of_generated_ids():
    assert [synthetic.parse_id(p["id"]) for p in synthetic.generate(3, 77)] == [(77, 0), (77, 1), (77, 2)]
    assert synthetic.parse_id("synthetic-2234") == (2234, None)  # a generated split's name
    for other in ("train-3", "test-12", "synthetic-", "synthetic-1-2-3", "synthetic-x-1", "xsynthetic-1-2"):
        assert synthetic.parse_id(other) is None
