"""Evaluation speed: one-at-a-time `model.generate` against our batched `generate_answers`.

Both decode greedily the same zero-shot prompts of the first N GSM8K test problems on the packaged
Gemma 3 270M. The last line reads `speedup=<x> agree=<k>/<n>`: the ratio of problems per second,
and on how many problems the two give the same strict answer.

    PYTHONPATH=src .venv/bin/python bench/bench_eval.py --n 24
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from mathtune.answers import extract_answer
from mathtune.data import format_prompt, read_problems
from mathtune.evaluate import generate_answers
from mathtune.models import load_model, load_tokenizer
from mathtune.stopping import STOP_RULES

DATA = Path(os.environ.get("MATHTUNE_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k")


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[str], int]:
    """What a first script does: generate for each prompt alone until EOS or max_new_tokens."""
    texts, n_tokens = [], 0
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        texts.append(STOP_RULES["mathtune"].cut(tokenizer.decode(new, skip_special_tokens=True)))
        n_tokens += len(new)
    return texts, n_tokens


def batched(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> tuple[list[str], int]:
    texts, n_tokens = [""] * len(prompts), 0
    for index, text, n in generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size, progress=False):
        texts[index] = text
        n_tokens += n
    return texts, n_tokens


def timed(label: str, run) -> tuple[list[str], float]:
    """Runs `run`, prints its speed, returns its texts and problems per second."""
    start = time.perf_counter()
    texts, n_tokens = run()
    elapsed = time.perf_counter() - start
    n = len(texts)
    print(f"{label}: {n} problems in {elapsed:.1f}s, {n / elapsed:.3f} problems/s, "
          f"{n_tokens} generated tokens, {n_tokens / elapsed:.1f} tokens/s", flush=True)
    return texts, n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the hardware has it, else float32")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is steadier on a CPU shared with other jobs)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    problems = read_problems(DATA / "test.jsonl", "test")[0][: args.n]
    prompts = [format_prompt(p["question"]) for p in problems]
    model, tokenizer = load_model("gemma-3-270m", dtype=args.dtype), load_tokenizer("gemma-3-270m")
    print(f"{len(prompts)} problems, {model.dtype}, {model.device}, max_new_tokens={args.max_new_tokens}, "
          f"batch_size={args.batch_size}, threads={torch.get_num_threads()}", flush=True)
    one_at_a_time(model, tokenizer, prompts[:1], 4)  # warm-up, so neither side pays for first-call setup

    max_new = args.max_new_tokens
    base_texts, base_rate = timed("one at a time (generate)", lambda: one_at_a_time(model, tokenizer, prompts, max_new))
    ours_texts, ours_rate = timed(
        "batched (generate_answers)", lambda: batched(model, tokenizer, prompts, max_new, args.batch_size)
    )
    agree = sum(extract_answer(a) == extract_answer(b) for a, b in zip(base_texts, ours_texts))
    same = sum(a.startswith(b) for a, b in zip(base_texts, ours_texts))
    print(f"same text up to the stop point: {same}/{len(prompts)}")
    print(f"speedup={ours_rate / base_rate:.1f} agree={agree}/{len(prompts)}")


if __name__ == "__main__":
    main()
