"""Attention's backward in `mathtune train`'s step: the CPU flash kernel's against dense products, side by side.

mathtune.speedups.packed_attention runs attention one example at a time; its backward goes through
`dense_backward` for examples up to DENSE_BACKWARD_MAX tokens and through the CPU flash-attention
kernel's own backward above that. This runs whole training steps (forward and backward, mathtune's
patches, the packaged Gemma 3 270M) on --batches distinct batches of --batch GSM8K training
problems, each batch once with each backward, alternating which goes first, so that both meet the
same shapes and the same spells of a shared host. It prints each side's total and the ratio, and
first how close each side's bfloat16 gradients come to float64 ones, on one layer's attention of
random inputs of the first batch's example lengths (Gemma 3 270M's 4 query heads, 1 key/value head).

    PYTHONPATH=src .venv/bin/python bench/bench_attention_backward.py --batch 8 --batches 12
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch

from profile_step import DATA, PACKED_ATTENTION, Profile, packed_batch  # bench/ is this script's import path

from mathtune import speedups
from mathtune.data import read_problems, seeded_subset, tokenize_example
from mathtune.hardware import cpu_facts, cpu_kind
from mathtune.model_cache import float32_original
from mathtune.models import PACKAGED_GEMMA, load_tokenizer
from mathtune.speedups import packed_attention
from mathtune.speedups.lm_loss import head_weight


def accuracy(sizes: list[int], heads: int = 4, kv_heads: int = 1, head_dim: int = 256) -> None:
    """Relative error (Frobenius) of each side's bfloat16 output and gradients against float64."""
    generator = torch.Generator().manual_seed(0)
    length = sum(sizes)
    inputs = [torch.randn(1, h, length, head_dim, generator=generator, dtype=torch.float64)
              for h in (heads, kv_heads, kv_heads)]
    grad = torch.randn(1, length, heads, head_dim, generator=generator, dtype=torch.float64)

    def run(dtype, dense_max):
        packed_attention.DENSE_BACKWARD_MAX = dense_max
        q, k, v = (t.detach().to(dtype).clone().requires_grad_() for t in inputs)
        out = packed_attention.ExampleFlashAttention.apply(q, k, v, sizes, head_dim ** -0.5)
        out.backward(grad.to(dtype))
        return [t.detach().double() for t in (out, q.grad, k.grad, v.grad)]

    dense_max = packed_attention.DENSE_BACKWARD_MAX
    reference = run(torch.float64, 0)
    print(f"bfloat16 against float64 (relative error of output, query, key and value gradients), {len(sizes)} examples:")
    for side, limit in (("flash kernel's backward", 0), ("dense_backward", dense_max)):
        errors = [float((ours - ref).norm() / ref.norm()) for ours, ref in zip(run(torch.bfloat16, limit), reference)]
        print(f"  {side:24s} " + " ".join(f"{e:.4f}" for e in errors))
    packed_attention.DENSE_BACKWARD_MAX = dense_max


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="problems per batch (the gemma-3-270m-gsm8k preset's)")
    parser.add_argument("--batches", type=int, default=12, help="distinct batches, each run once per side")
    parser.add_argument("--model", default=PACKAGED_GEMMA)
    args = parser.parse_args()
    speedups.apply_process_settings()  # as mathtune train, before the first product
    print(f"machine: CPU {cpu_kind(*cpu_facts(), os.environ.get('ONEDNN_MAX_CPU_ISA'))}")
    profile = Profile(argparse.Namespace(batch=args.batch, repeats=1, model=args.model))
    packed_attention.use_packed_attention(profile.causal_lm)
    speedups.apply(profile.model, speedups.Flags(packed_attention=False, loss_head=False))  # the CPU patches
    weight = head_weight(profile.causal_lm, float32_original(profile.causal_lm, profile.head.weight))
    loss_of = functools.partial(profile.our_head, weight=weight)

    tokenizer = load_tokenizer(args.model)
    problems = seeded_subset(read_problems(DATA / "train.jsonl", "train")[0], args.batch * args.batches, seed=1)
    examples = [tokenize_example(tokenizer, p["question"], p["answer"]) for p in problems]
    batches = [packed_batch(examples[i : i + args.batch]) for i in range(0, len(examples), args.batch)]

    accuracy([len(e["input_ids"]) for e in examples[: args.batch]])
    sides = {"kernel": 0, "dense": packed_attention.DENSE_BACKWARD_MAX}
    seconds = dict.fromkeys(sides, 0.0)
    tokens = 0
    for index, batch in enumerate(batches):
        tokens += batch["input_ids"].numel()
        for side in sorted(sides, reverse=index % 2 == 1):
            packed_attention.DENSE_BACKWARD_MAX = sides[side]
            run = profile.step(loss_of, batch, attention=PACKED_ATTENTION)
            start = time.perf_counter()
            run()
            seconds[side] += time.perf_counter() - start
    packed_attention.DENSE_BACKWARD_MAX = sides["dense"]
    print(f"{len(batches)} batches of {args.batch} problems, {tokens} tokens, each batch once per side:")
    for side, label in (("kernel", "flash kernel's backward"), ("dense", "dense_backward")):
        print(f"  {label:24s} {seconds[side]:7.1f} s  {tokens / seconds[side]:6.1f} tokens/s")
    print(f"ratio kernel/dense: {seconds['kernel'] / seconds['dense']:.3f}")


if __name__ == "__main__":
    main()
