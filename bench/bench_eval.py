"""Evaluation speed at full scale: one-at-a-time `model.generate` against `mathtune eval`.

The packaged Gemma 3 270M decodes greedily the same seeded GSM8K test problems (those `mathtune eval`
picks with eval.seed), base model, 8-shot:
  (a) the first 24 of them one at a time with `model.generate`, until EOS or max_new_tokens, each
      text then cut at the stop point, as a first script would;
  (b) `mathtune eval` (pipeline.run_evaluation) on all N (default 200): the few-shot prefix computed
      once, continuous batching, the stop check on the answer line (with --backend vllm, vLLM's
      engine instead, where it is installed);
  (c) the same N problems zero-shot, as a tuned model is asked (speed only);
  (d) after (a), `model.generate` on the same 24 all at once (left padding): how far generate agrees
      with itself when rows share a step (agreement only).
(a) runs in two halves, before and after (b), so that a drift of the machine's speed during the run
(shared hosts drift by a fifth within minutes) weighs on both sides alike.
It checks that (b)'s extracted answers equal (a)'s on the 24 and counts the texts identical up to
the stop point, and the same for (d). In bfloat16 the rows that share a step change the products'
rounding, so where a text parts from (a)'s it shows the token where they part and how far apart the
two tokens' logits are there in float32 (one forward of the packaged model in float32 over the
prompt and the shared text), with the range of those gaps: a near-tie that rounding can flip, or a
real difference. It prints problems/s and generated tokens/s for each, the fraction of the
machine's limit (FLOPs the work needs at least, over the matrix-multiply peak measured in this
run), the projected minutes for all 1,319 test problems, and last
`speedup=<x> problems_per_s=<y> agree=<a>/<b> full_test_min=<z>` (b over a; b; 8-shot).

    make bench-eval            # or: PYTHONPATH=src .venv/bin/python bench/bench_eval.py --n 200 [--backend vllm]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_train import matmul_peak_gflops

from mathtune import data as data_module
from mathtune import speedups
from mathtune.speedups import onednn_attention
from mathtune.answers import extract_answer
from mathtune.config import load_config
from mathtune.data import fewshot_prompt
from mathtune.evaluate import choose_fewshot_examples
from mathtune.hardware import cpu_facts, cpu_kind
from mathtune.models import PACKAGED_GEMMA, load_model, load_tokenizer
from mathtune.pipeline import evaluation_problems, run_evaluation
from mathtune.runfiles import read_jsonl
from mathtune.stopping import STOP_RULES

FULL_TEST = 1319
RULE = STOP_RULES["mathtune"]  # (a) and (d) run on past the stop point: compare what a decoder keeps


def one_at_a_time(model, tokenizer, prompts: list[str], max_new_tokens: int) -> tuple[list[list[int]], int, int]:
    """generate on each prompt alone; the generated ids of each, generated tokens and prompt tokens."""
    ids, generated, prompt_tokens = [], 0, 0
    for prompt in prompts:
        inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        ids.append(new.tolist())
        generated += len(new)
        prompt_tokens += inputs["input_ids"].shape[1]
    return ids, generated, prompt_tokens


def all_at_once(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """generate on all prompts in one left-padded batch: the texts (generate's own batching, for agreement)."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        inputs = tokenizer(prompts, return_tensors="pt", padding=True).to(model.device)
    finally:
        tokenizer.padding_side = side
    new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[:, inputs["input_ids"].shape[1]:]
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def parting(tokenizer, ids: list[int], text: str) -> tuple[int, int] | None:
    """Where `text` leaves the text of generate's `ids`, both up to the stop point: the first differing
    character and the index of the token of `ids` that holds it (the EOS that ends generate's text early,
    or len(ids) at max_new_tokens); None when the two are the same."""
    ours, other = RULE.kept(tokenizer.decode(ids, skip_special_tokens=True)), RULE.kept(text)
    if ours == other:
        return None
    char = len(os.path.commonprefix([ours, other]))
    for t in range(len(ids)):
        special = ids[t] in tokenizer.all_special_ids  # an EOS that ends generate's text early
        if special or len(tokenizer.decode(ids[: t + 1], skip_special_tokens=True)) > char:
            return char, t
    return char, len(ids)


def logit_gap(models: list, tokenizer, prompt: str, ids: list[int], text: str, where: tuple[int, int],
              back: int = 3, top: int = 20) -> tuple[str, float | None]:
    """Where `text` leaves generate's `ids`: generate's token there, the other text's, and the gap between
    their logits in each of `models` (one forward each over the prompt and generate's tokens); the
    message and the first model's gap (None where the other token is not found). where: parting()'s result.

    The other text's tokens are not kept, so its token is looked for: at the earliest of the `back` tokens
    before the parting one (a token boundary may differ: ' ' then '1' against ' <<'), the first of the
    first model's `top` largest logits, other than generate's, whose text continues the other text past
    the first differing character."""
    char, parted = where
    if parted == len(ids):
        return f"generate's text ends at max_new_tokens where the other goes on (character {char})", None
    first = max(0, parted - back)
    context = torch.tensor([tokenizer(prompt)["input_ids"] + ids[:parted]])
    with torch.no_grad():  # the logits that choose tokens first .. parted
        logits = [m(context.to(m.device), logits_to_keep=parted - first + 1).logits[0].float().cpu() for m in models]
    kept = RULE.kept(text)
    for t in range(first, parted + 1):
        start = len(tokenizer.decode(ids[:t], skip_special_tokens=True))
        rest = kept[start:]
        candidates = logits[0][t - first].topk(top).indices.tolist()
        for c in candidates:
            piece = tokenizer.decode([c], skip_special_tokens=True)
            ends_here = not rest and c in tokenizer.all_special_ids
            if c != ids[t] and (ends_here or continues_other(piece, start, rest, char, t == parted)):
                gaps = [(l[t - first, ids[t]] - l[t - first, c]).item() for l in logits]
                shown = ", ".join(f"{dtype_name(m)} {gap:+.3f}" for m, gap in zip(models, gaps))
                return (f"token {t}: generate {tokenizer.decode([ids[t]])!r}, the other {tokenizer.decode([c])!r} "
                        f"(rank {candidates.index(c) + 1} in {dtype_name(models[0])}); logit gap, generate's token "
                        f"less the other's: {shown}"), gaps[0]
    return (f"token {parted}: generate {tokenizer.decode([ids[parted]])!r}; the other text's token is not among "
            f"the {top} largest {dtype_name(models[0])} logits of tokens {first} to {parted}"), None


def continues_other(piece: str, start: int, rest: str, char: int, at_parting: bool) -> bool:
    """Whether a token whose text is `piece`, placed at character `start`, is the other text's token there.

    rest: the other text from `start`; char: the first character where the texts differ. The token must
    begin the rest and reach the difference: past it, or (at generate's parting token, which runs past
    it) exactly to it, where the other text has a token boundary that generate's longer token does not
    (' The' then ' total' against generate's ' They'). Earlier tokens ending at the difference are
    generate's own text in other pieces, not a choice."""
    if not piece or not rest.startswith(piece):
        return False
    end = start + len(piece)
    return end > char or (at_parting and end == char)


def dtype_name(model) -> str:
    return str(model.dtype).removeprefix("torch.")


def agreement(label: str, reference: list[str], texts: list[str]) -> int:
    """Prints and returns how many of `texts` keep the same strict answer as `reference`, with the same-text count."""
    same = sum(RULE.kept(a) == RULE.kept(b) for a, b in zip(reference, texts))
    agree = sum(extract_answer(RULE.kept(a)) == extract_answer(RULE.kept(b))
                for a, b in zip(reference, texts))
    print(f"{label}: same text up to the stop point: {same}/{len(texts)}; same strict answer: {agree}/{len(texts)}",
          flush=True)
    return agree


def flops_per_token(model) -> tuple[float, float]:
    """Matrix-product FLOPs of one token through the decoder (no attention scores) and through the LM head."""
    embedding = model.get_input_embeddings().weight
    decoder = sum(p.numel() for p in model.get_decoder().parameters()) - embedding.numel()
    return 2.0 * decoder, 2.0 * embedding.numel()


def report(label: str, n: int, seconds: float, generated: int, work_flops: float, peak: float) -> float:
    rate = n / seconds
    print(f"{label}: {n} problems in {seconds:.1f} s, {rate:.3f} problems/s, {generated / seconds:.1f} generated "
          f"tokens/s, {work_flops / seconds / 1e9:.1f} GFLOP/s = {work_flops / seconds / 1e9 / peak:.1%} of the "
          f"measured peak", flush=True)
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="problems for mathtune eval")
    parser.add_argument("--one-at-a-time", type=int, default=24, help="problems for model.generate")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 where the hardware has it, else float32")
    parser.add_argument("--backend", default="mathtune", help="what generates in (b) and (c): eval.backend")
    args = parser.parse_args()

    overrides = [f"model.name={PACKAGED_GEMMA}", f"model.dtype={args.dtype}", f"eval.limit={args.n}",
                 f"eval.shots={args.shots}", f"eval.max_new_tokens={args.max_new_tokens}",
                 f"eval.backend={args.backend}"]
    config = load_config("cpu-demo", overrides)
    config.eval.check_backend_installed()  # before (a)'s minutes, not after
    dataset = data_module.load_dataset(config.data)
    problems, train = evaluation_problems(config, dataset)
    examples = choose_fewshot_examples(train, args.shots, config.eval.seed)
    model, tokenizer = load_model(PACKAGED_GEMMA, args.dtype), load_tokenizer(PACKAGED_GEMMA)
    peak = matmul_peak_gflops(model.dtype, model.device.type)
    print(f"machine: {torch.cuda.get_device_name() if model.device.type == 'cuda' else 'CPU ' + cpu_kind(*cpu_facts(), os.environ.get('ONEDNN_MAX_CPU_ISA'))}, "
          f"{torch.get_num_threads()} threads", flush=True)
    kernel = speedups.decoding_attention(model, config.speedups)
    print("decoding's attention: " + (f"oneDNN {onednn_attention.version()}'s float32-result products "
                                      "(speedups.onednn_attention)" if kernel else "torch's kernel"), flush=True)
    decoder_flops, head_flops = flops_per_token(model)
    print(f"{len(problems)} GSM8K test problems (seed {config.eval.seed}), {args.shots}-shot, {model.dtype}, "
          f"{model.device}, max_new_tokens={args.max_new_tokens}, threads={torch.get_num_threads()}; "
          f"measured matrix-multiply peak {peak:.1f} GFLOP/s; per token {decoder_flops / 1e9:.3f} GFLOP decoder, "
          f"{head_flops / 1e9:.3f} GFLOP head", flush=True)

    first = problems[: args.one_at_a_time]
    prompts = [fewshot_prompt(p["question"], examples) for p in first]
    one_at_a_time(model, tokenizer, prompts[:1], 4)  # warm-up, so neither side pays for first-call setup
    halves = (prompts[: len(prompts) // 2], prompts[len(prompts) // 2 :])
    base_ids, generated, prompt_tokens, seconds = [], 0, 0, 0.0

    def run_half(half: list[str]) -> None:
        nonlocal generated, prompt_tokens, seconds
        start = time.perf_counter()
        ids, new_tokens, tokens = one_at_a_time(model, tokenizer, half, args.max_new_tokens)
        seconds += time.perf_counter() - start
        base_ids.extend(ids)
        generated, prompt_tokens = generated + new_tokens, prompt_tokens + tokens

    def mathtune_eval(label: str, shots: int, out: Path) -> tuple[float, dict]:
        scores = run_evaluation(config, dataset, out, PACKAGED_GEMMA, None, shots)
        records = {r["id"]: r for r in read_jsonl(out / "predictions.jsonl")}
        asked = [fewshot_prompt(p["question"], examples if shots else []) for p in problems]
        lengths = [len(ids) for ids in tokenizer(asked)["input_ids"]]
        shared = min(lengths) if shots else 0  # the common prefix, computed once: about the few-shot block
        new_tokens = sum(r["generated_tokens"] for r in records.values())
        work = (sum(lengths) - len(lengths) * shared) * decoder_flops + new_tokens * (decoder_flops + head_flops)
        return report(label, len(records), scores["elapsed_s"], new_tokens, work, peak), records

    rates = {}
    with tempfile.TemporaryDirectory() as tmp:
        run_half(halves[0])
        rates[args.shots], records = mathtune_eval(f"(b) mathtune eval, {args.shots}-shot", args.shots, Path(tmp) / "b")
        run_half(halves[1])
        work = prompt_tokens * decoder_flops + generated * (decoder_flops + head_flops)
        base_rate = report("(a) one at a time (generate), its two halves around (b)", len(first), seconds, generated,
                           work, peak)
        batched = all_at_once(model, tokenizer, prompts, args.max_new_tokens)
        ours = [records[p["id"]]["generation"] for p in first]
        base_texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in base_ids]
        agree = agreement("(b) against (a)", base_texts, ours)
        agreement(f"(d) generate, all {len(first)} at once, against (a)", base_texts, batched)
        models = [load_model(PACKAGED_GEMMA, "float32"), model] if model.dtype != torch.float32 else [model]
        for label, texts in (("(b)", ours), ("(d)", batched)):
            gaps = []
            for i, (prompt, ids, text) in enumerate(zip(prompts, base_ids, texts)):
                where = parting(tokenizer, ids, text)
                if where is not None:
                    message, gap = logit_gap(models, tokenizer, prompt, ids, text, where)
                    gaps.append(abs(gap) if gap is not None else float("inf"))
                    print(f"{label} problem {i}, {message}", flush=True)
            if gaps:
                print(f"{label}: {len(gaps)} of {len(texts)} texts part from (a)'s, where the two tokens' "
                      f"{dtype_name(models[0])} logits are {min(gaps):.3f} to {max(gaps):.3f} apart "
                      f"(median {statistics.median(gaps):.3f})", flush=True)
        del model, models
        rates[0], _ = mathtune_eval("(c) mathtune eval, 0-shot", 0, Path(tmp) / "c")
    for shots, rate in rates.items():
        print(f"projected for all {FULL_TEST} test problems, {shots}-shot: {FULL_TEST / rate / 60:.1f} min")
    print(f"speedup={rates[args.shots] / base_rate:.1f} problems_per_s={rates[args.shots]:.2f} "
          f"agree={agree}/{len(first)} full_test_min={FULL_TEST / rates[args.shots] / 60:.1f}")


if __name__ == "__main__":
    main()
