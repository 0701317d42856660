"""Tests for mathtune.answers: extraction, scoring, safe arithmetic, slip detection."""
from __future__ import annotations

import itertools
import json
import os
import re
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mathtune.answers import (
    MAX_ABS,
    MAX_CHARS,
    MAX_DEPTH,
    MAX_TOKENS,
    UnsafeExpression,
    check_arithmetic,
    count_reasoning_steps,
    extract_answer,
    gold_answer,
    harness_answer,
    harness_clean,
    harness_correct,
    has_arithmetic_slip,
    is_correct,
    normalize_number,
    safe_eval,
)

# -----------------------------------------------------------------------------
# extraction and scoring

GENERATIONS = [  # (generation, strict, flexible)
    ("She has 48 + 24 = 72 clips.\n#### 72", "72", "72"),
    ("#### 1,000", "1000", "1000"),
    ("The total is $1,234.50.\n#### $1,234.50", None, "1234.5"),  # the harness regex has no '$'
    ("#### 72.", "72", "72"),
    ("#### 72 clips in April and May", "72", "72"),
    ("#### 72.00", "72", "72"),
    ("#### -5", "-5", "-5"),
    ("He is down -3.50 dollars.\n#### -3.50", "-3.5", "-3.5"),
    ("#### 0.5", "0.5", "0.5"),
    ("#### .5", "0.5", "0.5"),
    ("#### 10\nwait, no\n#### 20", "10", "20"),  # strict takes the first, flexible the last
    ("I don't know.", None, None),
    ("", None, None),
    ("####72", None, "72"),  # the harness wants '#### ' with the space
    ("#### 1,234,567,890,123,456,789,012", "1234567890123456789012", "1234567890123456789012"),
    ("Room B12 is on the 3rd floor", None, "3"),  # numbers inside words count, as in the harness
    ("The answer is 5...", None, "5"),
    ("#### 5 see section 1.2.3", "5", "5"),  # '1.2.3' is no number
    ("Answer: 42, final", None, "42"),
    ("It costs 3-4 dollars", None, "-4"),  # the harness reads '-4' too
    ("#### ,", None, None),
]


@pytest.mark.parametrize("text,strict,flexible", GENERATIONS)
def test_extract_answer(text: str, strict: str | None, flexible: str | None) -> None:
    assert extract_answer(text) == strict
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "flexible") == flexible


def test_extract_answer_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="strict.*flexible"):
        extract_answer("#### 1", "loose")


@pytest.mark.parametrize("raw,expected", [
    ("72", "72"), ("72.0", "72"), ("72.00", "72"), ("-3.50", "-3.5"), ("0.5", "0.5"),
    (".5", "0.5"), ("-.5", "-0.5"), ("007", "7"), ("100", "100"), ("-0", "0"), ("-0.00", "0"),
    (" $1,000. ", "1000"), ("$-2", "-2"), ("12345678901234567890123456789", "12345678901234567890123456789"),
    ("", None), (".", None), ("abc", None), ("1.2.3", None), ("1e5", None), ("--1", None), ("٣", None),
])
def test_normalize_number(raw: str, expected: str | None) -> None:
    assert normalize_number(raw) == expected


@pytest.mark.parametrize("predicted,gold,expected", [
    ("72", "72", True), ("72.0", "72", True), ("72.00", "72", True), ("1,000", "1000", True),
    ("$5", "5", True), ("71", "72", False), ("-72", "72", False), (None, "72", False),
    ("abc", "5", False), ("12345678901234567890", "12345678901234567891", False),
])
def test_is_correct(predicted: str | None, gold: str, expected: bool) -> None:
    assert is_correct(predicted, gold) is expected


HARNESS_GENERATIONS = [  # (generation, strict, flexible) as lm-evaluation-harness's gsm8k task reads them
    ("She has 48 + 24 = 72 clips.\n#### 72", "72", "72"),
    ("#### 1,000", "1000", "1000"),
    ("The total is $1,234.50.\n#### $1,234.50", None, "1234.50"),
    ("#### 72.", "72", "72"),
    ("#### 72.00", "72.00", "72.00"),
    ("#### 72..", "72.", "72."),  # one trailing dot deleted
    ("#### 10\nwait, no\n#### 20", "10", "20"),
    ("I don't know.", None, None),
    ("####72", None, "72"),
    ("The answer is 5...", None, "5.."),
    ("#### 5 see section 1.2.3", "5", "1.2.3"),  # the last match, number or not
    ("It costs 3-4 dollars", None, "-4"),
    ("#### ,", "", None),  # a match that cleans to nothing; flexible finds none
]


@pytest.mark.parametrize("text,strict,flexible", HARNESS_GENERATIONS)
def test_harness_answer(text: str, strict: str | None, flexible: str | None) -> None:
    assert harness_answer(text) == harness_answer(text, "strict") == strict
    assert harness_answer(text, "flexible") == flexible


@pytest.mark.parametrize("answer,solution,mathtune,harness", [  # strict answers against a gold solution
    ("#### 72", "She sold 72.\n#### 72", True, True),
    ("#### 72.0", "#### 72", True, False),
    ("#### 072", "#### 72", True, False),
    ("#### 72..", "#### 72", True, False),
    ("#### 72.", "#### 72", True, True),
    ("#### 1,000.", "#### 1000", True, True),
    ("#### 1000", "Costs $5.\n#### 1,000", True, True),
    ("#### -3", "#### -3", True, True),
    ("#### 3", "#### -3", False, False),
    ("no answer", "#### 72", False, False),
])
def test_the_two_comparisons(answer: str, solution: str, mathtune: bool, harness: bool) -> None:
    assert is_correct(extract_answer(answer), gold_answer(solution)) is mathtune
    assert harness_correct(harness_answer(answer), solution) is harness


def test_dollars_commas_and_one_trailing_dot_are_ignored_by_both() -> None:
    text = "So she paid $1,000."
    assert extract_answer(text, "flexible") == "1000" and harness_answer(text, "flexible") == "1000"
    assert is_correct(extract_answer(text, "flexible"), "1000") and harness_correct(harness_answer(text, "flexible"), "#### 1000")


def test_harness_clean() -> None:
    assert harness_clean("48/2 = <<48/2=24>>24 #### 9\nThen #### $1,500.") == "1500"  # after the last '#### '
    assert harness_clean("72..") == "72." and harness_clean("[INVALID]") == "[invalid]"
    assert not harness_correct(None, "#### 72") and not harness_correct("72", "#### 7")


def test_gold_answer_and_steps() -> None:
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\nShe sold 48+24 = <<48+24=72>>72.\n#### 72"
    assert gold_answer(solution) == "72"
    assert count_reasoning_steps(solution) == 2
    assert gold_answer("#### 1,500\n") == "1500" and count_reasoning_steps("#### 1,500") == 0
    for bad in ["no answer here", "#### \n", "#### 5\nmore text", ""]:
        with pytest.raises(ValueError):
            gold_answer(bad)


# -----------------------------------------------------------------------------
# the real GSM8K files


def _gsm8k_dir() -> Path:
    if "MATHTUNE_DATA" in os.environ:
        return Path(os.environ["MATHTUNE_DATA"])
    path = Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k"
    if not path.is_dir():
        pytest.skip(f"GSM8K not found at {path} (set MATHTUNE_DATA)")
    return path


@pytest.fixture(scope="module")
def gsm8k() -> dict[str, list[dict]]:
    root = _gsm8k_dir()
    return {split: [json.loads(line) for line in open(root / f"{split}.jsonl")] for split in ("train", "test")}


def test_gsm8k_gold_answers_extract(gsm8k: dict[str, list[dict]]) -> None:
    assert {split: len(rows) for split, rows in gsm8k.items()} == {"train": 7473, "test": 1319}
    for split, rows in gsm8k.items():
        for i, row in enumerate(rows):
            solution = row["answer"]
            written = solution.rsplit("#### ", 1)[1].strip().replace(",", "")  # independent of the module
            assert Decimal(extract_answer(solution)) == Decimal(written), f"{split}-{i}"
            assert extract_answer(solution) == gold_answer(solution) == extract_answer(solution, "flexible")
            assert is_correct(written, gold_answer(solution))
            # The harness's reference is the same text, so `gold` means the same under both protocols.
            assert harness_clean(solution) == harness_answer(solution) == gold_answer(solution), f"{split}-{i}"
            assert count_reasoning_steps(solution) >= 1


def test_gsm8k_annotations_recompute(gsm8k: dict[str, list[dict]]) -> None:
    annotations = [a for rows in gsm8k.values() for row in rows for a in re.findall(r"<<[^<>]*>>", row["answer"])]
    ok = sum(1 for a in annotations if (checks := check_arithmetic(a)) and checks[0]["ok"])
    with_slip = sum(has_arithmetic_slip(check_arithmetic(row["answer"])) for rows in gsm8k.values() for row in rows)
    print(f"\nGSM8K gold: {ok}/{len(annotations)} calculator annotations recompute ok ({ok / len(annotations):.4%}); "
          f"{with_slip} of 8792 solutions have a slip in annotations or plain statements")
    assert len(annotations) > 25_000
    assert ok / len(annotations) > 0.999
    assert with_slip / 8792 < 0.01  # gold is nearly error-free: few false slips


# -----------------------------------------------------------------------------
# safe_eval


@pytest.mark.parametrize("expression,expected", [
    ("48/2", "24"), ("0.2 x 50", "10"), ("0.2*50", "10"), ("3 × 4", "12"), ("12 ÷ 4", "3"),
    ("1,000 * 2", "2000"), ("-(2+3)*4", "-20"), ("2 - -3", "5"), ("+7", "7"), ("10/4", "2.5"),
    ("(1+2)*(3+4)", "21"), ("1 - 2 - 3", "-4"), ("2+3*4", "14"), ("100/10/5", "2"), ("1/3*27", "9"),
    ("  .5 + 2. ", "2.5"), ("999999999999999999999999999999 + 1", "1000000000000000000000000000000"),
])
def test_safe_eval(expression: str, expected: str) -> None:
    value = safe_eval(expression)
    assert isinstance(value, Decimal) and value == Decimal(expected)


def test_safe_eval_division_is_precise() -> None:
    assert abs(safe_eval("10/3") - Decimal(10) / Decimal(3)) < Decimal("1e-25")


@pytest.mark.parametrize("expression", [
    "__import__('os')", "__import__('os').system('true')", "2**1000000", "2 ** 10", "9**9**9", "abc", "x",
    "().__class__", "(1).real", "1e30", "1+", "", "  ", "(1+2", "1+2)", "1,0", "1 2", "2 % 3", "2 // 3",
    "9" * 31, "1" + "+1" * 60, "(" * 21 + "1" + ")" * 21, "-" * 21 + "1", "1" + " " * 200,
    "1" + "0" * 20 + " * 1" + "0" * 20, "lambda: 0", "[1]", "1;2", "\u0663 + 1",
])
def test_safe_eval_rejects(expression: str) -> None:
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)


def test_safe_eval_division_by_zero() -> None:
    with pytest.raises(ValueError, match="zero"):
        safe_eval("5 / (3 - 3)")


def test_safe_eval_bounds_are_within_limits() -> None:
    assert safe_eval("(" * 20 + "1" + ")" * 20) == 1
    assert safe_eval("9" * 30) == Decimal("9" * 30)


def _expressions() -> st.SearchStrategy[tuple[str, Fraction]]:
    """Random arithmetic as (text, exact value) pairs, written the ways models write it."""
    leaves = st.integers(0, 1000).map(lambda n: (str(n), Fraction(n)))
    ops = {"+": Fraction.__add__, "-": Fraction.__sub__, "*": Fraction.__mul__, "x": Fraction.__mul__,
           "×": Fraction.__mul__, "/": Fraction.__truediv__, "÷": Fraction.__truediv__}

    def extend(children: st.SearchStrategy) -> st.SearchStrategy:
        def combine(a: tuple, op: str, b: tuple) -> tuple[str, Fraction]:
            assume(not (ops[op] is Fraction.__truediv__ and b[1] == 0))
            return f"({a[0]} {op} {b[0]})", ops[op](a[1], b[1])
        negate = children.map(lambda a: (f"-({a[0]})", -a[1]))
        return st.builds(combine, children, st.sampled_from(sorted(ops)), children) | negate

    return st.recursive(leaves, extend, max_leaves=8)


@settings(max_examples=300, suppress_health_check=[HealthCheck.filter_too_much])
@given(_expressions())
def test_safe_eval_matches_exact_arithmetic(case: tuple[str, Fraction]) -> None:
    text, exact = case
    # within safe_eval's documented bounds (beyond them it refuses: test_safe_eval_never_crashes)
    depth = max(itertools.accumulate({"(": 1, ")": -1}.get(c, 0) for c in text))
    tokens = len(re.findall(r"[0-9]+|[-+*/()x×÷]", text))
    assume(len(text) <= MAX_CHARS and tokens <= MAX_TOKENS and depth <= MAX_DEPTH and abs(exact) <= MAX_ABS)
    value = safe_eval(text)
    assert abs(Fraction(value) - exact) <= Fraction(1, 10**40) * max(1, abs(exact)), text


ARITHMETIC_TEXT = st.text(alphabet="0123456789.,+-*/()x×÷^²³¹⁰ $=<>#%\nabcX:", max_size=300)


@settings(max_examples=300, deadline=500)
@given(st.one_of(st.text(max_size=300), ARITHMETIC_TEXT))
def test_safe_eval_never_crashes(text: str) -> None:
    start = time.perf_counter()
    try:
        assert isinstance(safe_eval(text), Decimal)
    except ValueError:
        pass
    assert time.perf_counter() - start < 0.1


def test_safe_eval_huge_input_is_refused_quickly() -> None:
    start = time.perf_counter()
    for text in ["9" * 10**6, "(" * 10**5, "2**" * 10**5 + "2"]:
        with pytest.raises(UnsafeExpression):
            safe_eval(text)
    assert time.perf_counter() - start < 0.5


# -----------------------------------------------------------------------------
# arithmetic checks


def _summary(text: str) -> list[tuple[str, str, str, bool]]:
    """(expression, claimed, value cut to 12 characters, ok) per check."""
    return [(c["expression"], c["claimed"], c["value"][:12], c["ok"]) for c in check_arithmetic(text)]


@pytest.mark.parametrize("text,expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.", [("48/2", "24", "24", True)]),  # counted once
    ("Natalia sold 48/2 = 24 clips in May.", [("48/2", "24", "24", True)]),
    ("she earned 0.2 x 50 = $10.", [("0.2 x 50", "10", "10", True)]),
    ("so 3 * 4 = 12.", [("3 * 4", "12", "12", True)]),
    ("so 3 * 4 = 13.", [("3 * 4", "13", "12", False)]),
    ("<<5*5=26>>26", [("5*5", "26", "25", False)]),
    ("10/3 = 3.33 each", [("10/3", "3.33", "3.3333333333", True)]),
    ("10/3 = 3.34 each", [("10/3", "3.34", "3.3333333333", False)]),
    ("2/3 = 0.67 and 17/3 = 5 full loads", [("2/3", "0.67", "0.6666666666", True), ("17/3", "5", "5.6666666666", True)]),
    ("7/2 = 3 and 7/2 = 4 but 7/2 = 5", [("7/2", "3", "3.5", True), ("7/2", "4", "3.5", True), ("7/2", "5", "3.5", False)]),
    ("1,000 x 3 = 3,000 and 2 + 2 = 5", [("1,000 x 3", "3000", "3000", True), ("2 + 2", "5", "4", False)]),
    ("The answer is 7 - 10 = -3", [("7 - 10", "-3", "-3", True)]),
    ("So 12 + 5 = 17 * 2 = 34", [("17 * 2", "34", "34", True)]),  # '= 17 * 2' is no claim that 12 + 5 = 17
    ("It costs $5. 3 * 2 = 6", [("3 * 2", "6", "6", True)]),
    ("a fox 2*3 = 6", [("2*3", "6", "6", True)]),
    ("<<2*3=6>>6 then 6 + 4 = 10", [("2*3", "6", "6", True), ("6 + 4", "10", "10", True)]),
])
def test_check_arithmetic(text: str, expected: list) -> None:
    assert _summary(text) == expected
    assert has_arithmetic_slip(check_arithmetic(text)) is any(not ok for *_, ok in expected)


@pytest.mark.parametrize("text", [
    "3 + 1 = 8/2",  # right side is an expression
    "1/2 = 50%",  # a percentage
    "8 x 1 1/2 = 12 rolls",  # mixed number
    "600 x 30 = 18 000 watts",  # space as thousands separator
    "3x-5=16", "2x + 3 = 7", "x = 5", "10x=80",  # algebra
    "s+55-20=90", "(7 * V) + (4 * 5) = $69", "100/5 = 5A/5",
    "5 boxes x 3 = 15",  # 'x 3' after a word is not read as '5 * 3'
    "Total - 3*5 = 15", "6:00+48=6:48 PM",
    "__import__('os').system('ls') = 0", "2**1000000 = 5", "2 ** 3 = 8", "48 / 0 = 5", "<<560//10=56>>",
    "no numbers = here", "5 = 5", "== 3", "",
])
def test_check_arithmetic_skips_what_it_cannot_read(text: str) -> None:
    assert check_arithmetic(text) == []


@settings(max_examples=300, deadline=500)
@given(st.one_of(st.text(max_size=400), ARITHMETIC_TEXT))
def test_arbitrary_text_never_crashes(text: str) -> None:
    for mode in ("strict", "flexible"):
        answer = extract_answer(text, mode)
        assert answer is None or normalize_number(answer) == answer  # canonical form is a fixed point
    checks = check_arithmetic(text)
    assert all(set(c) == {"expression", "claimed", "value", "ok"} for c in checks)
    assert isinstance(has_arithmetic_slip(checks), bool)


def test_has_arithmetic_slip() -> None:
    assert has_arithmetic_slip([]) is False
    assert has_arithmetic_slip([{"expression": "1+1", "claimed": "2", "value": "2", "ok": True}]) is False
    assert has_arithmetic_slip([{"expression": "1+1", "claimed": "3", "value": "2", "ok": False}]) is True


@pytest.mark.parametrize("solution, gold, steps", [
    ("3 + 2 = 5\n  #### 5", "5", 1),  # an indented final line reads unambiguously
    ("3 + 2 = 5\n\t#### -5 \n\n", "-5", 1),
    ("Half is 2.5.\n#### 2.50", "2.5", 1),
    ("#### 1,500", "1500", 0),
])
def test_gold_line_is_the_last_line_stripped(solution: str, gold: str, steps: int) -> None:
    assert gold_answer(solution) == gold and count_reasoning_steps(solution) == steps


GOLD_CASES = ["a\n#### 5", "a\n  #### 5", "a\n#### $5", "a\n#### 5.", "a\n####5", "a\n#### 1,000", "a\n#### .5",
              "a\n#### five", "a\n####", "a\n#### 5 apples", "a\n#### 5\nmore", "#### 5 #### 6", "a\n### 5",
              "a\n#### 1.2.3", "a\n#### --5"]


@pytest.mark.parametrize("answer", GOLD_CASES)
def test_data_validation_and_scoring_accept_the_same_gold_lines(answer: str) -> None:
    """A record data.check_record accepts is one gold_answer can score, and the other way round."""
    from mathtune.data import check_record

    try:
        gold_answer(answer)
        scorable = True
    except ValueError:
        scorable = False
    assert (check_record({"question": "q?", "answer": answer}) is None) == scorable


# -----------------------------------------------------------------------------
# powers


@pytest.mark.parametrize("expression,expected", [
    ("10^2", "100"), ("2^10", "1024"), ("10²", "100"), ("2³ + 1", "9"), ("2^3^2", "512"), ("-2^2", "-4"),
    ("(-2)^2", "4"), ("2^-2", "0.25"), ("3 x 2^2", "12"), ("10^0", "1"), ("1.5^2", "2.25"), ("2¹⁰", "1024"),
])
def test_safe_eval_powers(expression: str, expected: str) -> None:
    assert safe_eval(expression) == Decimal(expected)


@pytest.mark.parametrize("expression", ["10^31", "2^200", "9^9^9", "4^0.5", "2^", "^2", "²", "0.1^-40", "10^10^10"])
def test_safe_eval_refuses_powers_beyond_its_bounds(expression: str) -> None:
    start = time.perf_counter()
    with pytest.raises(UnsafeExpression):
        safe_eval(expression)
    assert time.perf_counter() - start < 0.1


@pytest.mark.parametrize("text,expected", [
    ("10 x 10 = 10^2 = 100", [("10^2", "100", "100", True)]),  # '= 10^2' is no claim that 10 x 10 = 10
    ("10 x 10 = 10² = 100 tiles", [("10²", "100", "100", True)]),
    ("so 10^2 = 1000", [("10^2", "1000", "100", False)]),
    ("so 10² = 1000", [("10²", "1000", "100", False)]),
    ("<<2^5=32>>32", [("2^5", "32", "32", True)]),
    ("3^2 + 4^2 = 25", [("3^2 + 4^2", "25", "25", True)]),
])
def test_check_arithmetic_reads_powers(text: str, expected: list) -> None:
    assert _summary(text) == expected
