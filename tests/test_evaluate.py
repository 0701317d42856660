"""Batched generation against `generate` under each stop rule, scoring, worked examples, and
predictions/scores files with resume."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from mathtune.evaluate import (
    EvalError, choose_fewshot_examples, evaluate_problems, generate_answers, harness_fewshot_examples, score_record,
    summarize,
)
from mathtune.generation import decode
from mathtune.models import load_model, load_tokenizer
from mathtune.stopping import STOP_RULES, StopRule

PROBLEMS = [
    {"id": f"test-{i}", "question": question, "answer": answer}
    for i, (question, answer) in enumerate([
        ("Tom has 3 apples and buys 4 more. How many apples does he have?", "3 + 4 = <<3+4=7>>7\n#### 7"),
        ("A box holds 12 eggs. How many eggs are in 5 boxes?", "12 * 5 = <<12*5=60>>60\n#### 60"),
        ("Sara reads 10 pages a day for 6 days, then 4 more pages. How many pages?",
         "10 * 6 = <<10*6=60>>60\n60 + 4 = <<60+4=64>>64\n#### 64"),
        ("A shirt costs $20 and is 25% off. What does it cost?",
         "20 * 0.25 = <<20*0.25=5>>5\n20 - 5 = <<20-5=15>>15\n#### 15"),
        ("Ann had 50 stickers and gave away 18. How many are left?", "50 - 18 = <<50-18=32>>32\n#### 32"),
        ("Six friends share 42 sweets equally. How many does each get?", "42 / 6 = <<42/6=7>>7\n#### 7"),
    ])
]
TRAIN = [{"id": f"train-{i}", "question": p["question"], "answer": p["answer"]} for i, p in enumerate(PROBLEMS)]
RECORD_FIELDS = {
    "id", "question", "gold", "gold_steps", "generation", "generated_tokens", "pred_strict", "pred_flexible",
    "correct_strict", "correct_flexible", "arithmetic", "arithmetic_slip", "time_s",
}


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny-random", dtype="float32"), load_tokenizer("tiny-random")


def run_eval(tiny, out_dir, problems, label="tiny-random", protocol="mathtune"):
    model, tokenizer = tiny
    return evaluate_problems(
        model, tokenizer, problems, out_dir, fewshot_examples=None, model_label=label,
        max_new_tokens=12, batch_size=4, progress=False, protocol=protocol,
    )


PROMPTS = [
    "Question: What is 2+2?\nAnswer:", "Question: A farmer has 17 cows and buys 5 more. How many?\nAnswer:",
    "Question: x\nAnswer:", "Q", "Question: Ann had 50 stickers and gave away 18.\nAnswer:",
]


def assert_batched_equals_generate(model, tokenizer, max_new: int = 30, rule=STOP_RULES["mathtune"]) -> list[int]:
    """Batched generation (2 batches, left padding) against generate on each prompt alone; the token counts."""
    ours = {i: (text, n) for i, text, n in generate_answers(model, tokenizer, PROMPTS, max_new, 3, False, rule)}

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    for i, prompt in enumerate(PROMPTS):
        inputs = tokenizer(prompt, return_tensors="pt")
        new = model.generate(**inputs, max_new_tokens=max_new, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        stop = next(k for k in range(1, len(new) + 1) if k == len(new) or rule.finished(text(new[:k])))  # EOS ends new
        assert ours[i] == (rule.cut(text(new[:stop])), stop), prompt
    return [n for _, n in ours.values()]


# A rule the random model meets: rows end on it (and are cut) at different steps, not only on stop ids.
ON_W = StopRule("on-w", (re.compile("w"),), (re.compile("w"),), frozenset("w"))


@pytest.mark.parametrize("rule", [*STOP_RULES.values(), ON_W], ids=[*STOP_RULES, "on-w"])
def test_batched_generation_equals_one_at_a_time_generate(tiny, monkeypatch, rule):
    model, tokenizer = tiny
    # Stop on EOS and on two characters the random model emits, so rows end at different steps.
    stop_ids = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("r"), tokenizer.convert_tokens_to_ids("8")]
    monkeypatch.setattr(model.generation_config, "eos_token_id", stop_ids)
    dropped = []
    close = decode._close_holes
    monkeypatch.setattr(decode, "_close_holes",
                        lambda kv, live, done, *rest: (dropped.append(len(done)), close(kv, live, done, *rest))[1])
    lengths = assert_batched_equals_generate(model, tokenizer, rule=rule)
    assert min(lengths) < 30 and len(set(lengths)) > 2  # rows really stopped at different steps
    assert dropped  # and finished rows left the batch


def test_batched_generation_of_a_lora_model_equals_generate(tiny):
    """A tuned model: LoRA in the body and on the output head (which takes the head's own forward)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj", "lm_head"], init_lora_weights=False)
    lora = get_peft_model(load_model("tiny-random", dtype="float32"), config).eval()
    assert_batched_equals_generate(lora, tiny[1])


def test_records_and_scores_of_known_generations():
    right = score_record(PROBLEMS[0], " 3 + 4 = 7\n#### 7\n", 9)
    slip = score_record(PROBLEMS[2], " 10 * 6 = 50\n50 + 4 = 54\n#### 54\n", 20)
    vague = score_record(PROBLEMS[1], " The boxes hold 60 eggs.", 7)
    assert (right["correct_strict"], right["correct_flexible"], right["arithmetic_slip"]) == (True, True, False)
    assert (slip["pred_strict"], slip["correct_strict"], slip["arithmetic_slip"]) == ("54", False, True)
    assert slip["arithmetic"][0] == {"expression": "10 * 6", "claimed": "50", "value": "60", "ok": False}
    assert (vague["pred_strict"], vague["pred_flexible"], vague["correct_flexible"]) == (None, "60", True)

    scores = summarize([right, slip, vague])
    assert (scores["strict"]["correct"], scores["flexible"]["correct"], scores["n"]) == (1, 2, 3)
    assert scores["arithmetic_slip_share"] == 0.5  # of the two wrong answers, one has a slip
    assert {k: (v["correct"], v["total"]) for k, v in scores["accuracy_by_steps"].items()} == {"1": (1, 2), "2": (0, 1)}


@pytest.mark.parametrize("generation, mathtune, lm_eval", [
    (" 3 + 4 = 7\n#### 7\n", ("7", "7", True, True), ("7", "7", True, True)),
    (" 3 + 4 = 7.0\n#### 7.0\n", ("7", "7", True, True), ("7.0", "7.0", False, False)),
    (" It is 7..", (None, "7", False, True), (None, "7.", False, False)),
    (" It is 7 ...", (None, "7", False, True), (None, "..", False, False)),  # the harness takes the last match
    (" It is $7.", (None, "7", False, True), (None, "7", False, True)),
    (" #### 07\n", ("7", "7", True, True), ("07", "07", False, False)),
    (" No idea.", (None, None, False, False), (None, None, False, False)),
])
def test_records_under_each_protocol(generation, mathtune, lm_eval):
    """pred_strict, pred_flexible, correct_strict, correct_flexible: mathtune's numbers or the harness's strings."""
    for protocol, expected in (("mathtune", mathtune), ("lm-eval", lm_eval)):
        record = score_record(PROBLEMS[0], generation, 5, protocol)
        assert (record["pred_strict"], record["pred_flexible"], record["correct_strict"],
                record["correct_flexible"]) == expected, protocol
        assert record["gold"] == "7" and set(record) == RECORD_FIELDS - {"time_s"}


def test_harness_fewshot_examples_are_its_seeded_draws_in_test_file_order():
    train = [{"id": f"train-{i}", "question": f"q{i}", "answer": f"#### {i}"} for i in range(30)]
    problems = [{"id": "test-3", "question": "a"}, {"id": "test-0", "question": "b"}]
    chosen = harness_fewshot_examples(train, problems, k=5)
    rng = random.Random(1234)  # lm-evaluation-harness: one Random(fewshot seed), one sample per test line in turn
    draws = [rng.sample(train, 5) for _ in range(4)]
    assert chosen == {"test-3": draws[3], "test-0": draws[0]}
    assert chosen["test-3"] != chosen["test-0"] and len({ex["id"] for ex in chosen["test-3"]}) == 5
    assert harness_fewshot_examples(train, problems, k=5, seed=7) != chosen
    # Not reproducible: a training line missing, or problems that are no test-file lines.
    assert harness_fewshot_examples(train[:3] + train[4:], problems, k=5) is None
    assert harness_fewshot_examples(train, [{"id": "train-3", "question": "a"}], k=5) is None
    assert harness_fewshot_examples(train, [{"id": "synthetic-7-0", "question": "a"}], k=5) is None


def test_each_problem_gets_its_own_examples_and_the_protocols_stop_rule(tmp_path, monkeypatch):
    from mathtune import evaluate

    seen = {}

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, stop_rule, speedups_flags):
        seen["prompts"], seen["rule"] = prompts, stop_rule
        for index in range(len(prompts)):
            yield index, " 7.0\n#### 7.0\n", 3

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    own = {p["id"]: [TRAIN[(i + 1) % 6]] for i, p in enumerate(PROBLEMS[:2])}
    scores = evaluate_problems(None, None, PROBLEMS[:2], tmp_path, fewshot_examples=own, model_label="m",
                               protocol="lm-eval")
    assert seen["rule"] is STOP_RULES["lm-eval"]
    assert [prompt.startswith(f"Question: {TRAIN[i + 1]['question']}") for i, prompt in enumerate(seen["prompts"])] \
        == [True, True]
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["fewshot_ids"] == {"test-0": ["train-1"], "test-1": ["train-2"]} and meta["shots"] == 1
    assert meta["protocol"] == scores["protocol"] == "lm-eval"
    assert scores["strict"]["correct"] == 0  # '7.0' is not the harness's '7' (nor '60')


def test_evaluate_writes_predictions_and_scores(tiny, tmp_path):
    model, tokenizer = tiny
    examples = choose_fewshot_examples(TRAIN, k=2, seed=0)
    assert examples == choose_fewshot_examples(TRAIN, k=2, seed=0) and len(examples) == 2
    scores = evaluate_problems(
        model, tokenizer, PROBLEMS, tmp_path, fewshot_examples=examples, model_label="tiny-random",
        max_new_tokens=12, batch_size=4, progress=False,
    )
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(p["id"] for p in PROBLEMS)
    assert all(set(r) == RECORD_FIELDS for r in records)
    assert {r["id"]: (r["gold"], r["gold_steps"]) for r in records}["test-2"] == ("64", 2)
    assert all(1 <= r["generated_tokens"] <= 12 for r in records)

    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert scores["n"] == 6 and scores["shots"] == 2 and scores["model"] == "tiny-random"
    assert set(scores["strict"]) == {"correct", "total", "value", "ci95"} and scores["strict"]["total"] == 6
    assert set(scores["accuracy_by_steps"]) == {"1", "2"} and scores["accuracy_by_steps"]["2"]["total"] == 2
    assert scores["problems_per_s"] > 0 and scores["generated_tokens_per_s"] > 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["ids"] == [p["id"] for p in PROBLEMS] and meta["ids_sha256"] == scores["ids_sha256"]
    assert meta["fewshot_ids"] == [ex["id"] for ex in examples]


def test_resume_skips_done_problems_and_drops_a_torn_line(tiny, tmp_path, capsys):
    run_eval(tiny, tmp_path, PROBLEMS[:3])
    predictions = tmp_path / "predictions.jsonl"
    with predictions.open("a") as handle:  # a crash halfway through writing the fourth record
        handle.write(json.dumps({"id": "test-3", "question": PROBLEMS[3]["question"], "generation": "abc"})[:40])

    scores = run_eval(tiny, tmp_path, PROBLEMS)
    assert "torn last line" in capsys.readouterr().err
    assert scores["generated_problems"] == 3 and scores["n"] == 6
    ids = [json.loads(line)["id"] for line in predictions.read_text().splitlines()]
    assert sorted(ids) == sorted(p["id"] for p in PROBLEMS)  # each once, the torn one regenerated

    assert run_eval(tiny, tmp_path, PROBLEMS)["generated_problems"] == 0


@pytest.mark.parametrize("label, problems, message", [
    ("another-model", PROBLEMS, "another evaluation"),
    ("tiny-random", [{**p, "question": p["question"] + " Explain."} for p in PROBLEMS], "not in this problem set"),
])
def test_predictions_of_another_evaluation_are_refused_untouched(tiny, tmp_path, label, problems, message):
    run_eval(tiny, tmp_path, PROBLEMS[:2])
    before = (tmp_path / "predictions.jsonl").read_bytes(), (tmp_path / "meta.json").read_bytes()
    with pytest.raises(EvalError, match=message) as error:
        run_eval(tiny, tmp_path, problems, label=label)
    assert "predictions.jsonl" in str(error.value) and "another output directory" in str(error.value)
    assert ((tmp_path / "predictions.jsonl").read_bytes(), (tmp_path / "meta.json").read_bytes()) == before


def test_generation_time_adds_up_across_interrupted_calls(tmp_path, monkeypatch):
    """Each problem takes 5 s on a fake clock; the first call dies after two, the second does the other four."""
    from mathtune import evaluate

    clock = [100.0]
    monkeypatch.setattr(evaluate.time, "perf_counter", lambda: clock[0])

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, stop_rule, speedups_flags,
                      die_after=None):
        for index in range(len(prompts)):
            if index == die_after:
                raise KeyboardInterrupt
            clock[0] += 5.0
            yield index, "It is 7.\n#### 7\n", 3

    monkeypatch.setattr(evaluate, "generate_answers", lambda *a: fake_generate(*a, die_after=2))
    with pytest.raises(KeyboardInterrupt):
        run_eval((None, None), tmp_path, PROBLEMS)
    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    scores = run_eval((None, None), tmp_path, PROBLEMS)
    assert scores["generated_problems"] == 4
    assert scores["elapsed_s"] == 30.0  # 6 problems x 5 s, not the second call's 20 s
    assert scores["problems_per_s"] == pytest.approx(6 / 30) and scores["generated_tokens_per_s"] == pytest.approx(18 / 30)
    assert run_eval((None, None), tmp_path, PROBLEMS)["elapsed_s"] == 30.0  # a finished evaluation adds nothing


def test_resuming_with_another_protocol_is_refused(tmp_path, monkeypatch):
    from mathtune import evaluate

    def fake_generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress, stop_rule, speedups_flags):
        for index in range(len(prompts)):
            yield index, "#### 7\n", 3

    monkeypatch.setattr(evaluate, "generate_answers", fake_generate)
    run_eval((None, None), tmp_path, PROBLEMS[:2])
    assert json.loads((tmp_path / "scores.json").read_text())["protocol"] == "mathtune"
    before = (tmp_path / "predictions.jsonl").read_bytes()
    with pytest.raises(EvalError, match="protocol: 'mathtune' there, 'lm-eval' now.*another output directory"):
        run_eval((None, None), tmp_path, PROBLEMS, protocol="lm-eval")
    assert (tmp_path / "predictions.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match="protocol must be one of"):
        run_eval((None, None), tmp_path / "other", PROBLEMS, protocol="harness")

    # meta.json written before there were protocols: a mathtune evaluation, resumed as one.
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["protocol"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert run_eval((None, None), tmp_path, PROBLEMS)["generated_problems"] == 4
    with pytest.raises(EvalError, match="protocol: 'mathtune' there, 'lm-eval' now"):
        run_eval((None, None), tmp_path, PROBLEMS, protocol="lm-eval")


def test_the_vllm_backend_keeps_what_the_stop_rule_keeps(tmp_path, monkeypatch):
    """vLLM runs on past a `#### N` line to its stop string; the record keeps the rule's text, and the
    evaluation is marked as vLLM's and refused to the other backend on resume."""
    from mathtune import evaluate

    asked = []
    engine_texts = [" 3 + 4 = 7\n#### 7\nThe next\n\nQuestion:", " 12 * 5 = 60\n#### 60\n", " no answer"]

    def fake_generate(engine, prompts, max_new_tokens, stop):
        asked.append((engine, len(prompts), max_new_tokens, stop))
        for index, text in enumerate(engine_texts[: len(prompts)]):
            yield index, text, len(text)

    monkeypatch.setattr(evaluate.vllm_engine, "generate", fake_generate)
    scores = evaluate_problems("engine", None, PROBLEMS[:3], tmp_path, fewshot_examples=None, model_label="m",
                               max_new_tokens=40, progress=False, backend="vllm")
    assert asked == [("engine", 3, 40, ("\nQuestion:",))]
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == [" 3 + 4 = 7\n#### 7\n", " 12 * 5 = 60\n#### 60\n", " no answer"]
    assert [r["correct_strict"] for r in records] == [True, True, False]
    assert [r["generated_tokens"] for r in records] == [len(t) for t in engine_texts]
    assert scores["backend"] == "vllm" and json.loads((tmp_path / "meta.json").read_text())["backend"] == "vllm"
    with pytest.raises(EvalError, match="backend: 'vllm' there, 'mathtune' now"):
        evaluate_problems(None, None, PROBLEMS, tmp_path, fewshot_examples=None, model_label="m",
                          max_new_tokens=40, progress=False)
    with pytest.raises(ValueError, match="backend must be one of"):
        evaluate_problems(None, None, PROBLEMS, tmp_path / "other", fewshot_examples=None, model_label="m",
                          backend="sglang")
