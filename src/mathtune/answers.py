"""Answer extraction, scoring and arithmetic checking for GSM8K-style generations.

Pure functions (no torch, no I/O) so that eval, report and tests agree on one definition
of "the model's answer" and "an arithmetic slip". See docs/answers.md.
"""
from __future__ import annotations

import math
import re
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, localcontext
from fractions import Fraction

MODES = ("strict", "flexible")
# The two filters of lm-evaluation-harness's gsm8k task, verbatim.
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# Its exact_match metric's regexes_to_ignore, deleted in this order from answer and reference alike.
HARNESS_IGNORE = tuple(re.compile(r) for r in (r",", r"\$", r"(?s).*#### ", r"\.$"))
_NUMBER_RE = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")

# -----------------------------------------------------------------------------
# answers


def _clean(s: str) -> str:
    """Drop thousands commas, '$', surrounding whitespace and trailing dots (the harness drops one dot)."""
    return s.replace(",", "").replace("$", "").strip().rstrip(".")


def _canonical(d: Decimal) -> str:
    """Plain decimal text without trailing zeros or exponent: 72.00 -> '72', 1E+2 -> '100'."""
    s = format(d, "f")  # exact, whatever the context precision
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s == "-0" else s


def normalize_number(s: str) -> str | None:
    """Canonical text of a number as written ('$1,000.00' -> '1000'), or None if not a number.

    One canonical form makes '72', '72.0' and '72.00' the same answer; Decimal keeps
    20-digit numbers exact where float would not.
    """
    s = _clean(s)
    return _canonical(Decimal(s)) if _NUMBER_RE.fullmatch(s) else None


def _matches(text: str, mode: str) -> list[str]:
    """What a mode's regex matched, in the order answers are looked for: strict the first '#### N'
    alone, flexible every match from the last one back (the harness's filter takes the first of these)."""
    if mode == "strict":
        m = STRICT_RE.search(text)
        return [m.group(1)] if m else []
    if mode == "flexible":
        return [m.group(0) for m in reversed(list(FLEXIBLE_RE.finditer(text)))]
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def extract_answer(text: str, mode: str = "strict") -> str | None:
    """The model's final answer, normalised, or None.

    strict: the first '#### N' (the format GSM8K solutions end with);
    flexible: the last number anywhere, for models that don't follow the format.
    """
    for match in _matches(text, mode):
        if (n := normalize_number(match)) is not None:  # flexible skips '...', '1.2.3'
            return n
    return None


def is_correct(predicted: str | None, gold: str) -> bool:
    """Numeric equality, so '72.0' matches gold '72'; no answer is never correct."""
    if predicted is None:
        return False
    p, g = normalize_number(predicted), normalize_number(gold)
    return p is not None and g is not None and Decimal(p) == Decimal(g)


def harness_clean(text: str) -> str:
    """Text as lm-evaluation-harness's gsm8k exact_match compares it: HARNESS_IGNORE deleted in turn
    (',', '$', everything up to the last '#### ', one trailing '.'), then lower-cased.

    Applied to a whole gold solution it gives the harness's reference ('... #### 1,500' -> '1500')."""
    for pattern in HARNESS_IGNORE:
        text = pattern.sub("", text)
    return text.lower()


def harness_answer(text: str, mode: str = "strict") -> str | None:
    """The answer lm-evaluation-harness's gsm8k filter takes, cleaned by harness_clean; None where the
    filter finds no match (its '[invalid]'). Flexible takes the last match even when it is no number."""
    matches = _matches(text, mode)
    return harness_clean(matches[0]) if matches else None


def harness_correct(predicted: str | None, solution: str) -> bool:
    """The harness's exact match: predicted (from harness_answer) equals the cleaned gold solution as a
    string, so '72.0' against '#### 72' is wrong; no answer is never correct."""
    return predicted is not None and predicted == harness_clean(solution)


def gold_line(solution: str) -> tuple[list[str], str]:
    """The reasoning lines of a GSM8K solution and the normalised N of its final '#### N' line.

    The one rule for a gold answer: data.check_record applies it when a file is read and
    gold_answer when a problem is scored, so a record that passes validation is one that can be
    scored. The last non-empty line, surrounding whitespace ignored, is '####' and then a number
    as normalize_number reads it ('#### 1,500', '  #### 5', '#### $5'); raises ValueError otherwise.
    """
    lines = solution.strip().splitlines()
    last = lines[-1].strip() if lines else ""
    if not last.startswith("####"):
        raise ValueError(f"gold solution does not end with a '#### N' line: {solution[-80:]!r}")
    if (n := normalize_number(last[4:])) is None:
        raise ValueError(f"no number in gold answer line {last!r}")
    return lines[:-1], n


def gold_answer(solution: str) -> str:
    """The normalised N of the final '#### N' line of a GSM8K solution (gold_line's rule)."""
    return gold_line(solution)[1]


def count_reasoning_steps(solution: str) -> int:
    """Non-empty lines before the '####' line: a rough difficulty measure for accuracy_by_steps."""
    return sum(1 for line in gold_line(solution)[0] if line.strip())


# -----------------------------------------------------------------------------
# safe arithmetic
# Model text is untrusted. eval()/exec() would run it as code, and even an ast-based
# evaluator lets '9**9**9' or a million-digit int hang the process. So: a tokenizer and a
# recursive-descent parser for numbers, + - * / ^ ( ), superscript exponents and unary
# signs, with hard bounds on size, that can only return a Decimal or raise ValueError. It
# computes with exact fractions so that 1/3*27 is 9, not 8.999..., and checks a power's size
# before computing it.

MAX_CHARS, MAX_TOKENS, MAX_DEPTH, MAX_DIGITS = 200, 50, 20, 30
MAX_ABS = 10**30
MAX_EXPONENT = 100  # |n| of an integer exponent; the result must stay within 1e30 (and above 1e-30) too
SUPERSCRIPTS = "⁰¹²³⁴⁵⁶⁷⁸⁹"  # '10²' is 10^2; a run of them is one exponent ('2¹⁰')
_PREC = 60  # significant digits of a non-terminating result (10/3)
_TOKEN_RE = re.compile(
    rf"\s*(?:([0-9]{{1,3}}(?:,[0-9]{{3}})+(?:\.[0-9]+)?|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)|([-+*/()x×÷^])|([{SUPERSCRIPTS}]+))")
_OPS = {"x": "*", "×": "*", "÷": "/"}


class UnsafeExpression(ValueError):
    """An expression safe_eval refuses: not plain arithmetic, or too big."""


def _tokenize(expression: str) -> list[Fraction | str]:
    tokens: list[Fraction | str] = []
    pos, end = 0, len(expression.rstrip())
    while pos < end:
        m = _TOKEN_RE.match(expression, pos)
        if not m:
            raise UnsafeExpression(f"unexpected {expression[pos:pos + 10].strip()!r}")
        if (number := m.group(1)) is not None:
            if sum(c.isdigit() for c in number) > MAX_DIGITS:
                raise UnsafeExpression(f"number longer than {MAX_DIGITS} digits")
            tokens.append(Fraction(Decimal(number.replace(",", ""))))
        elif (superscript := m.group(3)) is not None:  # '²' is '^' and 2
            if not tokens or tokens[-1] == "^" or len(superscript) > 3:
                raise UnsafeExpression(f"unexpected {superscript!r}")
            tokens += ["^", Fraction(int("".join(str(SUPERSCRIPTS.index(c)) for c in superscript)))]
        else:
            tokens.append(_OPS.get(m.group(2), m.group(2)))
        if len(tokens) > MAX_TOKENS:
            raise UnsafeExpression(f"more than {MAX_TOKENS} tokens")
        pos = m.end()
    return tokens


def _bounded(value: Fraction) -> Fraction:
    if abs(value) > MAX_ABS:
        raise UnsafeExpression("result beyond 1e30")
    return value


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    """base ** exponent for a whole exponent up to MAX_EXPONENT, refused before computing when the
    result would leave [1e-30, 1e30]: '9^9^9' must not run for ever."""
    if exponent.denominator != 1 or abs(exponent) > MAX_EXPONENT:
        raise UnsafeExpression(f"exponent {exponent} is not a whole number up to {MAX_EXPONENT}")
    if base == 0:
        if exponent < 0:
            raise ValueError("division by zero")
        return Fraction(1) if exponent == 0 else Fraction(0)
    if abs(exponent) * abs(math.log10(abs(base))) > 30:
        raise UnsafeExpression("power beyond 1e30")
    return _bounded(base ** int(exponent))


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := ('-'|'+') unary | power ; power := atom ('^' unary)? ; atom := '(' expr ')' | NUMBER

    '-2^2' is -4 and '2^3^2' is 2^9, as in written mathematics."""

    def __init__(self, tokens: list[Fraction | str]) -> None:
        self.tokens, self.pos, self.depth = tokens, 0, 0

    def peek(self) -> Fraction | str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> Fraction | str | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while (op := self.peek()) in ("+", "-"):
            self.take()
            rhs = self.term()
            value = _bounded(value + rhs if op == "+" else value - rhs)
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while (op := self.peek()) in ("*", "/"):
            self.take()
            rhs = self.unary()
            if op == "/" and rhs == 0:
                raise ValueError("division by zero")
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def unary(self) -> Fraction:
        if self.peek() not in ("-", "+"):
            return self.power()
        tok = self.take()
        value = self.nested(self.unary)
        return -value if tok == "-" else value

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        return _power(base, self.nested(self.unary))

    def atom(self) -> Fraction:
        tok = self.take()
        if isinstance(tok, Fraction):
            return tok
        if tok != "(":
            raise UnsafeExpression(f"unexpected {tok!r}")
        value = self.nested(self.expr)
        if self.take() != ")":
            raise UnsafeExpression("missing ')'")
        return value

    def nested(self, rule) -> Fraction:
        """rule() one level deeper, refused beyond MAX_DEPTH levels."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise UnsafeExpression(f"nesting deeper than {MAX_DEPTH}")
        value = rule()
        self.depth -= 1
        return value


def safe_eval(expression: str) -> Decimal:
    """Value of a small arithmetic expression from model text ('0.2 x 50', '1,000 ÷ 4')."""
    if len(expression) > MAX_CHARS:
        raise UnsafeExpression(f"longer than {MAX_CHARS} characters")
    tokens = _tokenize(expression)
    if not tokens:
        raise UnsafeExpression("empty expression")
    parser = _Parser(tokens)
    value = parser.expr()
    if parser.pos != len(tokens):
        raise UnsafeExpression(f"unexpected {parser.peek()!r}")
    with localcontext() as ctx:
        ctx.prec = _PREC
        return Decimal(value.numerator) / Decimal(value.denominator)


# -----------------------------------------------------------------------------
# arithmetic slips
# Plain statements are found conservatively: a false slip (blaming the model for our
# misreading of '8 x 1 1/2 = 12' or '3x-5=16') is worse than a statement left unchecked.

ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>=]*)>>")  # GSM8K calculator annotation <<expression=result>>
_CLAIM_RE = re.compile(
    r"\s*\$?\s*(-?(?:[0-9][0-9,]*(?:\.[0-9]+)?|\.[0-9]+))"
    r"(?![0-9,]|\.[0-9])"  # the whole number: no backtracking into '123%'
    rf"(?![A-Za-z_%:{SUPERSCRIPTS}]|[ \t]+[0-9])"  # not '5A', '50%', '6:48', '1 1/2', '18 000', '10²'
    r"(?!\s*(?:[-+*/×÷^]|x\s*[$(.0-9]))"  # '3 + 1 = 8/2', '= 10^2': the right side is an expression
)
_LHS_CHARS = frozenset("0123456789.,$()+-*/x×÷^ \t" + SUPERSCRIPTS)
_BINARY_RE = re.compile(rf"[0-9.)]\s*[-+*/x×÷^]|[0-9)][{SUPERSCRIPTS}]")
_VARIABLE_X_RE = re.compile(r"x(?!\s*[$(.0-9])")  # '3x-5': x is a variable, not a times sign
_ROUNDINGS = (ROUND_HALF_UP, ROUND_DOWN)


def _check(expression: str, claimed_text: str) -> dict | None:
    """One check record, or None when the expression or the claim can't be read."""
    claimed = normalize_number(claimed_text)
    if claimed is None:
        return None
    try:
        value = safe_eval(expression.replace("$", ""))
    except ValueError:
        return None
    target = Decimal(claimed)
    ok = value == target
    places = -min(0, Decimal(_clean(claimed_text)).as_tuple().exponent)  # '3.30' -> 2
    if not ok and places <= MAX_DIGITS:  # a claim may round or truncate: 10/3 = 3.33, 17/3 = 5
        with localcontext() as ctx:
            ctx.prec = 2 * _PREC
            ok = any(value.quantize(Decimal(1).scaleb(-places), rounding=r) == target for r in _ROUNDINGS)
    return {"expression": expression.replace("$", "").strip(), "claimed": claimed,
            "value": _canonical(value), "ok": ok}


def _lhs_expression(text: str, eq: int) -> str | None:
    """The arithmetic expression, with a binary operator, that ends just before text[eq]."""
    start = eq
    while start > 0 and eq - start < MAX_CHARS and text[start - 1] in _LHS_CHARS:
        start -= 1
    if start and text[start - 1].isalpha():
        while text[start] == "x":  # the end of a word ('box 2*3'), not a times sign
            start += 1
    run = text[start:eq].replace("$", "")
    for i, c in enumerate(run):  # longest first
        if c not in "0123456789.(-" or (i and run[i - 1] in "0123456789.,"):
            continue  # not the start of a token
        if c == "-" and run[i + 1:i + 2].isspace():
            continue  # 'Total - 3*5' is a dash, not a minus sign
        prefix = run[:i].strip()
        if prefix and not (prefix[-1] in ".," and run[i - 1].isspace()):
            continue  # only a new sentence or clause may start mid-run: '$5. 3 * 2 = 6'
        candidate = run[i:].strip()
        if _BINARY_RE.search(candidate) and not _VARIABLE_X_RE.search(candidate):
            try:
                safe_eval(candidate)
                return candidate
            except ValueError:
                pass
    return None


def check_arithmetic(text: str) -> list[dict]:
    """Recompute every '<<a*b=c>>' annotation and plain 'a * b = c' statement, in text order.

    Returns [{"expression", "claimed", "value", "ok"}]; unreadable expressions are skipped,
    so a check that is not ok is a slip, not a parsing failure.
    """
    found: list[tuple[int, dict | None]] = []
    annotated: set[int] = set()  # positions of the '=' inside annotations
    for m in ANNOTATION_RE.finditer(text):
        annotated.add(m.start(2) - 1)
        found.append((m.start(), _check(m.group(1), m.group(2))))
    for eq in (i for i, c in enumerate(text) if c == "="):
        if eq in annotated:
            continue
        claim = _CLAIM_RE.match(text, eq + 1)  # '48/2 = <<48/2=24>>24' has no claim here
        if claim and (expression := _lhs_expression(text, eq)):
            found.append((eq, _check(expression, claim.group(1))))
    return [c for _, c in sorted(found, key=lambda f: f[0]) if c is not None]


def has_arithmetic_slip(checks: list[dict]) -> bool:
    """True when any recomputed step disagrees with what the model wrote."""
    return any(not c["ok"] for c in checks)
