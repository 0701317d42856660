"""When a greedy generation stops, and what of its text is kept: one StopRule per evaluation protocol.

A rule looks only at the decoded text of one row, so a decoder asks `rule.finished(text)` after
each new token and keeps `rule.cut(text)` once the row ends (on a stop rule, an EOS token or
max_new_tokens alike). The model's EOS ids are the decoder's business, not the rule's.

`trigger_chars` lets a decoder skip most of those checks. Its guarantee: for a text t with
`finished(t)` False and an appended piece s that holds none of the trigger characters,
`finished(t + s)` is False too. It holds because every pattern a rule stops on ends in one of
them (the `\\n` closing a `#### N` line, the `:` of `Question:`, the last character of each stop
string): a match in t + s that is not in t must end inside s. It is a statement about strings
that grow by appending; a decoder that re-decodes all of a row's tokens (where a token may change
how the text before it decodes) checks the new tail, from where the old text and the new one
first differ.

- "mathtune": stop at a completed `#### N` line (a newline after it) or when the model starts
  a new question on a line of its own; keep the text before that new question.
- "lm-eval": lm-evaluation-harness's `gsm8k` task: `until` is `Question:` (anywhere, also
  mid-line), `</s>` and `<|im_end|>`; the text is cut at the first occurrence of each in turn,
  as the harness's Hugging Face backend cuts its output. A completed `#### N` line is no stop.
See docs/answers.md for where the protocols differ.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ANSWER_DONE = re.compile(r"####[^\n]*\d[^\n]*\n")  # a `#### N` line ended by a newline
NEW_QUESTION = re.compile(r"\n+Question:")
HARNESS_UNTIL = ("Question:", "</s>", "<|im_end|>")  # lm-evaluation-harness gsm8k.yaml, generation_kwargs.until


@dataclass(frozen=True)
class StopRule:
    """A protocol's stop rule: `finished(text)`, `cut(text)` and `trigger_chars` (see the module docstring)."""

    name: str
    stop_on: tuple[re.Pattern, ...]  # the text is finished once any of these matches
    cut_at: tuple[re.Pattern, ...]  # the kept text ends before the first match of each, applied in turn
    trigger_chars: frozenset[str]  # every match of a stop_on pattern ends in one of these
    # literal strings for an engine that stops on strings only (vLLM's `stop`, the string kept in its
    # output): each finishes the rule where it ends, so `kept` of a text that stopped at one is `kept`
    # of the whole; the rule may finish earlier, on patterns no string expresses (`#### N` lines)
    stop_strings: tuple[str, ...] = ()

    def finished(self, text: str) -> bool:
        """True once generation must stop on this decoded text."""
        return any(pattern.search(text) for pattern in self.stop_on)

    def kept(self, text: str) -> str:
        """What a decoder that stops at once keeps of a text that ran on past its stop point (a whole
        `generate` output, say): the text up to the end of its first stop match, then cut. The first
        match of each pattern is its earliest-ending one for these rules (literal strings; patterns that
        cannot cross the newline they end on), so this is the shortest finished prefix."""
        ends = [match.end() for match in (pattern.search(text) for pattern in self.stop_on) if match]
        return self.cut(text[: min(ends)] if ends else text)

    def cut(self, text: str) -> str:
        """The text kept: up to (not including) the stop point, the whole text when there is none."""
        for pattern in self.cut_at:
            match = pattern.search(text)
            if match:
                text = text[: match.start()]
        return text


def _until(strings: tuple[str, ...]) -> tuple[re.Pattern, ...]:
    return tuple(re.compile(re.escape(s)) for s in strings)


STOP_RULES: dict[str, StopRule] = {
    "mathtune": StopRule(
        "mathtune", (ANSWER_DONE, NEW_QUESTION), (NEW_QUESTION,), frozenset("\n:"), ("\nQuestion:",)
    ),
    "lm-eval": StopRule(
        "lm-eval", _until(HARNESS_UNTIL), _until(HARNESS_UNTIL), frozenset(s[-1] for s in HARNESS_UNTIL),
        HARNESS_UNTIL,
    ),
}

