"""The stop rules: hand-made texts with known results, and the trigger-character guarantee."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mathtune.stopping import HARNESS_UNTIL, STOP_RULES, StopRule

MATHTUNE, LM_EVAL = STOP_RULES["mathtune"], STOP_RULES["lm-eval"]


def test_the_rules_and_their_interface():
    assert set(STOP_RULES) == {"mathtune", "lm-eval"}
    for name, rule in STOP_RULES.items():
        assert isinstance(rule, StopRule) and rule.name == name
        assert isinstance(rule.trigger_chars, frozenset)
        with pytest.raises(dataclasses.FrozenInstanceError):
            rule.trigger_chars = frozenset()
    assert MATHTUNE.trigger_chars == {"\n", ":"} and LM_EVAL.trigger_chars == {":", ">"}


@pytest.mark.parametrize("text, done, cut", [
    ("She has 6 + 36 = 42.\n#### 42\n", True, "She has 6 + 36 = 42.\n#### 42\n"),
    ("She has 42.\n#### 4", False, "She has 42.\n#### 4"),
    ("#### 42", False, "#### 42"),
    ("#### \n", False, "#### \n"),  # no digit on the answer line
    ("So 42.\n#### -1,200.5\nQ", True, "So 42.\n#### -1,200.5\nQ"),
    ("So 42.\n\nQuestion: Tom has", True, "So 42."),
    ("So 42.\nQuestion:", True, "So 42."),
    ("So 42.\n\nQuestion", False, "So 42.\n\nQuestion"),
    ("The Question: is 2\n", False, "The Question: is 2\n"),
    ("It ends here.</s>", False, "It ends here.</s>"),
])
def test_mathtune_rule(text, done, cut):
    assert MATHTUNE.finished(text) is done
    assert MATHTUNE.cut(text) == cut


@pytest.mark.parametrize("text, done, cut", [
    ("She has 42.\n#### 42\n", False, "She has 42.\n#### 42\n"),  # an answer line is no stop
    ("She has 42.\n#### 42\n\nQuestion: Tom", True, "She has 42.\n#### 42\n\n"),
    ("The Question: is 2\n#### 2", True, "The "),  # anywhere, also mid-line
    ("So 42.\n\nQuestion", False, "So 42.\n\nQuestion"),
    ("question: lower case", False, "question: lower case"),
    ("#### 7</s>more", True, "#### 7"),
    ("#### 7<|im_end|>", True, "#### 7"),
    ("#### 7<|im_end|", False, "#### 7<|im_end|"),
    ("a</s>b\nQuestion: c", True, "a"),  # at the first of the stop strings, whichever comes first
    ("a\nQuestion: b</s>", True, "a\n"),
])
def test_lm_eval_rule(text, done, cut):
    assert LM_EVAL.finished(text) is done
    assert LM_EVAL.cut(text) == cut


def harness_cut(text: str) -> str:
    """lm-evaluation-harness's HF backend (postprocess_generated_text): split at each stop string in turn."""
    for term in HARNESS_UNTIL:
        text = text.split(term)[0]
    return text


PIECES = ["#### ", "####", "42", "-1,200.5", "7", " ", ".", "\n", "\n\n", "Question", "Question:", ":", "Q",
          "uestion", "</s", "</s>", ">", "<|im_end|", "<|im_end|>", "x", "$", "#"]


def random_texts(seed: int, n: int, max_pieces: int = 8):
    rng = random.Random(seed)
    for _ in range(n):
        yield "".join(rng.choice(PIECES) for _ in range(rng.randint(0, max_pieces)))


def counterexamples(rule: StopRule, trigger_chars: frozenset[str], n: int = 4000) -> list[tuple[str, str]]:
    """(t, s) where t is not finished, s holds no trigger char, and t + s is finished: what must not exist."""
    quiet = [p for p in PIECES if not set(p) & trigger_chars]
    rng = random.Random(1)
    found = []
    for t in random_texts(0, n):
        s = "".join(rng.choice(quiet) for _ in range(rng.randint(1, 4)))
        if not rule.finished(t) and rule.finished(t + s):
            found.append((t, s))
    return found


@pytest.mark.parametrize("name", ["mathtune", "lm-eval"])
def test_an_unfinished_text_finishes_only_with_a_trigger_char(name):
    rule = STOP_RULES[name]
    assert counterexamples(rule, rule.trigger_chars) == []
    # The check can fail: with a trigger char left out, appending text without the others finishes texts.
    for left_out in rule.trigger_chars:
        assert counterexamples(rule, rule.trigger_chars - {left_out}), left_out


@pytest.mark.parametrize("t, s", [
    ("So 42.\n#### 42", "0 apples"),  # the answer line grows, no newline yet
    ("So 42.\n\nQuestion", " Tom"),
    ("#### 7<|im_end|", "x"),
    ("#### 7</s", " >"),  # '>' is a trigger char, but ' >' completes no stop string
])
def test_hand_made_extensions_without_a_finishing_trigger(t, s):
    for rule in STOP_RULES.values():
        assert not rule.finished(t)
        if not set(s) & rule.trigger_chars:
            assert not rule.finished(t + s)


def test_the_trigger_char_completes_the_stop():
    assert not MATHTUNE.finished("#### 42") and MATHTUNE.finished("#### 42" + "\n")
    assert not MATHTUNE.finished("\nQuestion") and MATHTUNE.finished("\nQuestion" + ":")
    assert not LM_EVAL.finished("x Question") and LM_EVAL.finished("x Question" + ": y")
    assert not LM_EVAL.finished("7</s") and LM_EVAL.finished("7</s" + ">")


def test_lm_eval_cut_is_the_harness_cut_and_finished_means_something_is_cut():
    for text in random_texts(2, 3000):
        assert LM_EVAL.cut(text) == harness_cut(text), text
        assert LM_EVAL.finished(text) == (LM_EVAL.cut(text) != text), text


@pytest.mark.parametrize("rule, text, kept", [
    (MATHTUNE, "So 42.\n#### 42\nQuestion: more\n#### 7\n", "So 42.\n#### 42\n"),
    (MATHTUNE, "So 42.\n\nQuestion: more\n#### 7\n", "So 42."),
    (MATHTUNE, "#### 4", "#### 4"),
    (LM_EVAL, "So 42.\n#### 42\nQuestion: more</s>", "So 42.\n#### 42\n"),
    (LM_EVAL, "a</s>b Question: c", "a"),
])
def test_kept_stops_at_the_first_stop(rule, text, kept):
    assert rule.kept(text) == kept


def test_kept_is_the_cut_of_the_shortest_finished_prefix():
    for text in random_texts(4, 1500):
        for rule in STOP_RULES.values():
            finished = next((text[:n] for n in range(len(text) + 1) if rule.finished(text[:n])), text)
            assert rule.kept(text) == rule.cut(finished), (rule.name, text)


def stopped_at_a_string(text: str, strings: tuple[str, ...]) -> str:
    """What an engine that stops on strings returns, the string kept: up to the end of the first one."""
    ends = [text.find(s) + len(s) for s in strings if s in text]
    return text[: min(ends)] if ends else text


def test_stop_strings_finish_the_rule_and_keep_what_it_keeps():
    assert MATHTUNE.stop_strings == ("\nQuestion:",) and LM_EVAL.stop_strings == HARNESS_UNTIL
    for text in random_texts(5, 3000):
        for rule in STOP_RULES.values():
            stopped = stopped_at_a_string(text, rule.stop_strings)
            assert rule.kept(stopped) == rule.kept(text), (rule.name, text)
            if stopped != text:
                assert rule.finished(stopped), (rule.name, text)


def test_a_cut_is_a_prefix():
    for text in random_texts(3, 2000):
        for rule in STOP_RULES.values():
            assert text.startswith(rule.cut(text))
