"""Evaluation: fast batched greedy generation, predictions.jsonl that survives a crash, and scores.json.

Generation is mathtune.generation's batched greedy decoding rather than `model.generate`: generate
keeps finished rows in the batch until the longest one ends, recomputes the few-shot examples for
every prompt, and has no per-row stop on a completed `#### N` line, so a base model that goes on to
invent the next question would run to max_new_tokens every time. Here each row stops as soon as the
protocol's stop rule (mathtune.stopping) says so and hands its slot to the next problem. The
protocol (`mathtune` or `lm-eval`) also decides the scoring, see docs/answers.md.
"""

from __future__ import annotations

import hashlib
import random
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm.auto import tqdm

from mathtune.report.stats import NotComputable, accuracy, accuracy_by_steps, arithmetic_slip_share
from mathtune.answers import (
    check_arithmetic, count_reasoning_steps, extract_answer, gold_answer, harness_answer, harness_correct,
    has_arithmetic_slip, is_correct,
)
from mathtune.config import EVAL_BACKENDS
from mathtune.data import fewshot_prompt, format_prompt, seeded_subset
from mathtune.generation import greedy_decode, vllm_engine
from mathtune.hardware import hardware_name
from mathtune.runfiles import append_jsonl, read_json, read_jsonl, write_json
from mathtune.speedups import Flags, decoding_attention
from mathtune.stopping import STOP_RULES, StopRule

HARNESS_FEWSHOT_SEED = 1234  # lm-evaluation-harness's default fewshot_random_seed


class EvalError(ValueError):
    """An output directory that holds another evaluation; the message names the file and says what to do."""


# --- generation ---------------------------------------------------------------------------------


def stop_token_ids(model, tokenizer) -> set[int]:
    """The ids `generate` stops on: the generation config's EOS ids (Gemma has two), else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos}


_TRIGGERS: dict[tuple, frozenset[int]] = {}


def trigger_ids(tokenizer, chars: frozenset[str]) -> frozenset[int]:
    """The ids whose text holds one of `chars`: only such a token can complete a stop pattern, so the
    row's text is decoded and checked after these alone. Decoding the whole vocabulary takes seconds,
    so it is done once per tokenizer."""
    key = (tokenizer.name_or_path, len(tokenizer), tuple(sorted(chars)))
    if key not in _TRIGGERS:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        _TRIGGERS[key] = frozenset(i for i, text in enumerate(texts) if any(c in text for c in chars))
    return _TRIGGERS[key]


def generate_answers(
    model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int | None = None,
    progress: bool = True, stop_rule: StopRule = STOP_RULES["mathtune"], speedups_flags: Flags = Flags(),
) -> Iterator[tuple[int, str, int]]:
    """Greedy generations as (prompt index, text, generated token count), in the order they finish.

    The text is what one-at-a-time `generate(do_sample=False)` gives, ended and cut by stop_rule; the
    prompts' common prefix (the few-shot examples) is computed once and rows are batched continuously
    (mathtune.generation). batch_size: rows decoded at once, None to choose from the model and memory.
    speedups_flags: the config's `speedups` (its onednn_attention flag picks decoding's attention kernel).
    """
    if not prompts:  # nothing to do: the model is not touched (it may not even be loaded)
        return
    token_lists = tokenizer(prompts)["input_ids"]

    def done(ids: list[int]) -> bool:
        return stop_rule.finished(tokenizer.decode(ids, skip_special_tokens=True))

    with tqdm(total=len(prompts), unit="problem", desc="generating", disable=not progress) as bar:
        for index, ids in greedy_decode(
            model, token_lists, max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(model, tokenizer),
            finished=done, triggers=trigger_ids(tokenizer, stop_rule.trigger_chars), slots=batch_size,
            attention=decoding_attention(model, speedups_flags),
        ):
            bar.update()
            yield index, stop_rule.cut(tokenizer.decode(ids, skip_special_tokens=True)), len(ids)


def vllm_answers(
    engine, prompts: list[str], max_new_tokens: int = 256, progress: bool = True,
    stop_rule: StopRule = STOP_RULES["mathtune"],
) -> Iterator[tuple[int, str, int]]:
    """generate_answers through a vLLM engine: (prompt index, text, generated token count), the text
    what stop_rule keeps of the engine's (which runs on to a stop string, EOS or max_new_tokens)."""
    with tqdm(total=len(prompts), unit="problem", desc="generating (vLLM)", disable=not progress) as bar:
        for index, text, n_tokens in vllm_engine.generate(engine, prompts, max_new_tokens, stop_rule.stop_strings):
            bar.update()
            yield index, stop_rule.kept(text), n_tokens


# --- evaluation ---------------------------------------------------------------------------------


def choose_fewshot_examples(train_problems: list[dict], k: int, seed: int) -> list[dict]:
    """The worked examples shown to a base model: a seeded sample of training problems, fixed per seed."""
    return seeded_subset(train_problems, k, seed)


def harness_fewshot_examples(
    train_file: list[dict], problems: list[dict], k: int, seed: int = HARNESS_FEWSHOT_SEED,
) -> dict[str, list[dict]] | None:
    """lm-evaluation-harness's worked examples for its gsm8k task, per problem id; None where they
    cannot be reproduced.

    The harness samples each test problem's own k examples from the whole training file with one
    `random.Random(seed)` that goes on from problem to problem in test-file order: the problem on
    line i gets the (i+1)-th `rng.sample(train, k)` (a single-process run, which with `--limit N`
    evaluates the first N lines). That needs train_file to be the whole GSM8K training file in file
    order (ids train-0, train-1, ...: none skipped) and every problem to be a test-file line (test-<i>).
    """
    if not train_file or any(p["id"] != f"train-{i}" for i, p in enumerate(train_file)):
        return None
    lines = {}
    for problem in problems:
        match = re.fullmatch(r"test-(\d+)", problem["id"])
        if match is None:
            return None
        lines[problem["id"]] = int(match.group(1))
    rng = random.Random(seed)
    draws = [rng.sample(train_file, k) for _ in range(max(lines.values(), default=-1) + 1)]
    return {problem_id: draws[line] for problem_id, line in lines.items()}


def ids_sha256(ids: list[str]) -> str:
    """A fingerprint of a problem set, independent of order, to check that two evaluations are comparable."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def score_record(problem: dict, generation: str, generated_tokens: int, protocol: str = "mathtune") -> dict:
    """One predictions.jsonl record (fields as in docs/run-directory.md).

    mathtune: answers as normalised numbers, compared as values; lm-eval: answers as the harness's
    gsm8k task reads them, compared as strings (harness_answer, harness_correct).
    """
    gold = gold_answer(problem["answer"])
    if protocol == "lm-eval":
        strict, flexible = harness_answer(generation, "strict"), harness_answer(generation, "flexible")
        correct = harness_correct(strict, problem["answer"]), harness_correct(flexible, problem["answer"])
    else:
        strict, flexible = extract_answer(generation, "strict"), extract_answer(generation, "flexible")
        correct = is_correct(strict, gold), is_correct(flexible, gold)
    checks = check_arithmetic(generation)
    return {
        "id": problem["id"], "question": problem["question"], "gold": gold,
        "gold_steps": count_reasoning_steps(problem["answer"]),
        "generation": generation, "generated_tokens": generated_tokens,
        "pred_strict": strict, "pred_flexible": flexible,
        "correct_strict": correct[0], "correct_flexible": correct[1],
        "arithmetic": checks, "arithmetic_slip": has_arithmetic_slip(checks),
    }


def _check_same_evaluation(out_dir: Path, meta: dict, problems: list[dict]) -> list[dict]:
    """The records already in out_dir, after checking they come from this model, template and problem set."""
    predictions = out_dir / "predictions.jsonl"
    if not predictions.exists():
        return []
    advice = "Use another output directory, or delete the file to evaluate again."
    old_meta = read_json(out_dir / "meta.json")
    if old_meta is None:
        raise EvalError(f"{predictions} has no meta.json beside it, so it cannot be resumed safely. {advice}")
    settings = ("model", "adapter", "protocol", "backend", "shots", "fewshot_ids", "max_new_tokens")
    old_meta = {"protocol": "mathtune", "backend": "mathtune"} | old_meta  # written before protocols, backends
    differ = [f"{k}: {old_meta.get(k)!r} there, {meta[k]!r} now" for k in settings if old_meta.get(k) != meta[k]]
    if differ:
        raise EvalError(f"{predictions} belongs to another evaluation ({'; '.join(differ)}). {advice}")
    records = read_jsonl(predictions, repair=True)
    questions = {p["id"]: p["question"] for p in problems}
    foreign = [r["id"] for r in records if questions.get(r["id"]) != r["question"]]
    if foreign:
        raise EvalError(
            f"{predictions} holds problems that are not in this problem set ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}). {advice}"
        )
    return records


def evaluate_problems(
    model, tokenizer, problems: list[dict], out_dir: Path, *,
    fewshot_examples: list[dict] | dict[str, list[dict]] | None, model_label: str, adapter: str | None = None,
    split: str = "test", max_new_tokens: int = 256, batch_size: int | None = None, progress: bool = True,
    load: Callable[[], tuple] | None = None, protocol: str = "mathtune", backend: str = "mathtune",
    speedups_flags: Flags = Flags(),
) -> dict:
    """Generate for every problem not yet in out_dir/predictions.jsonl, then write and return scores.json.

    fewshot_examples: the same worked examples for every problem (a list), or each problem's own
    (a dict by problem id, as harness_fewshot_examples gives). protocol (`mathtune`, `lm-eval`) picks
    the stop rule (mathtune.stopping.STOP_RULES) and the scoring (score_record). backend: `mathtune`
    (mathtune.generation) or `vllm` (model is then a vLLM engine and tokenizer is not used).
    speedups_flags: the config's `speedups`, passed to generate_answers.
    Records are appended and flushed as problems finish, so an interrupted evaluation resumes
    where it stopped; a directory that holds another model's, protocol's or problem set's predictions
    is refused. With load, the model and tokenizer come from load() (model and tokenizer given as
    None), called only when some problem is left to generate: a finished evaluation is scored again
    without loading a model. Each record keeps its share of the generation time (`time_s`), so the
    time of calls cut short counts.
    """
    if protocol not in STOP_RULES:
        raise ValueError(f"protocol must be one of {list(STOP_RULES)}, got {protocol!r}")
    if backend not in EVAL_BACKENDS:
        raise ValueError(f"backend must be one of {list(EVAL_BACKENDS)}, got {backend!r}")
    out_dir = Path(out_dir)
    ids = [p["id"] for p in problems]
    if isinstance(fewshot_examples, dict):
        examples = {i: fewshot_examples[i] for i in ids}
        shots = len(next(iter(examples.values()), []))
        fewshot_ids = {i: [ex["id"] for ex in shown] for i, shown in examples.items()}
    else:
        examples = {i: fewshot_examples or [] for i in ids}
        shots, fewshot_ids = len(fewshot_examples or []), [ex["id"] for ex in fewshot_examples or []]
    meta = {
        "model": model_label, "adapter": adapter, "split": split, "protocol": protocol, "backend": backend,
        "shots": shots, "fewshot_ids": fewshot_ids, "max_new_tokens": max_new_tokens,
        "ids_sha256": ids_sha256(ids), "ids": ids,
    }
    records = {r["id"]: r for r in _check_same_evaluation(out_dir, meta, problems)}
    write_json(out_dir / "meta.json", meta)

    todo = [p for p in problems if p["id"] not in records]
    if todo and load is not None:
        model, tokenizer = load()
    prompts = [
        fewshot_prompt(p["question"], examples[p["id"]]) if examples[p["id"]] else format_prompt(p["question"])
        for p in todo
    ]
    last = time.perf_counter()
    if backend == "vllm":
        answers = vllm_answers(model, prompts, max_new_tokens, progress, STOP_RULES[protocol])
    else:
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress,
                                   STOP_RULES[protocol], speedups_flags)
    for index, text, n_tokens in answers:
        now = time.perf_counter()
        record = score_record(todo[index], text, n_tokens, protocol) | {"time_s": round(now - last, 4)}
        last = now
        append_jsonl(out_dir / "predictions.jsonl", record)
        records[record["id"]] = record

    scores = {
        key: meta[key]
        for key in ("model", "adapter", "split", "protocol", "backend", "shots", "ids_sha256", "max_new_tokens")
    } | summarize([records[i] for i in ids]) | {"generated_problems": len(todo)} | generation_speed(
        [records[i] for i in ids]) | {"hardware": hardware_name()}
    write_json(out_dir / "scores.json", scores)
    return scores


def generation_speed(records: list[dict]) -> dict:
    """elapsed_s: the generation time of all the records, summed over every call that made them
    (a record written before `time_s` was kept counts 0); problems and tokens per second over it."""
    elapsed = sum(r.get("time_s", 0) for r in records)
    tokens = sum(r["generated_tokens"] for r in records)
    return {
        "elapsed_s": round(elapsed, 2),
        "problems_per_s": len(records) / elapsed if elapsed else None,
        "generated_tokens_per_s": tokens / elapsed if elapsed else None,
    }


def summarize(records: list[dict]) -> dict:
    """The scores.json figures computed from predictions, with the report's definitions (mathtune.report.definitions)."""
    slips = _unless_not_computable(arithmetic_slip_share, records)
    return {
        "n": len(records),
        "strict": accuracy(sum(r["correct_strict"] for r in records), len(records)),
        "flexible": accuracy(sum(r["correct_flexible"] for r in records), len(records)),
        "arithmetic_slip_share": slips["value"] if slips else None,
        "accuracy_by_steps": {
            str(row.pop("steps")): row for row in _unless_not_computable(accuracy_by_steps, records) or []
        },
    }


def _unless_not_computable(function, records: list[dict]):
    try:
        return function(records)
    except NotComputable:
        return None
