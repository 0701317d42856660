"""Where the time of one LoRA training step goes, part by part, on the packaged Gemma 3 270M.

One batch of GSM8K training problems (prompt masked, as `mathtune train` builds them) goes through
the decoder and the LM head, forward and backward, in the ways a step can be run: padded or packed
(padding-free) batches, with or without gradient checkpointing, TRL's fused LM head over every
position or ours over the loss-bearing positions only. Each line gives the median of --repeats runs.

    PYTHONPATH=src .venv/bin/python bench/profile_step.py --batch 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from mathtune.config import LoraConfig
from mathtune.data import read_problems, seeded_subset, tokenize_example
from mathtune.lm_loss import loss_positions_head
from mathtune.models import PACKAGED_GEMMA, load_model, load_tokenizer, resolve_dtype

DATA = Path(os.environ.get("MATHTUNE_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k")


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def padded_batch(examples: list[dict], pad_id: int) -> dict:
    width = max(len(e["input_ids"]) for e in examples)
    def pad(seq, value):
        return seq + [value] * (width - len(seq))
    return {
        "input_ids": torch.tensor([pad(e["input_ids"], pad_id) for e in examples]),
        "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in examples]),
        "labels": torch.tensor([pad(e["labels"], -100) for e in examples]),
    }


def packed_batch(examples: list[dict]) -> dict:
    """One row, each example's positions starting at 0: the decoder masks attention across examples."""
    return {
        "input_ids": torch.tensor([sum((e["input_ids"] for e in examples), [])]),
        "position_ids": torch.tensor([sum((list(range(len(e["input_ids"]))) for e in examples), [])]),
        "labels": torch.tensor([sum(([-100] + e["labels"][1:] for e in examples), [])]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=PACKAGED_GEMMA)
    args = parser.parse_args()

    from peft import LoraConfig as PeftLoraConfig, get_peft_model
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = load_tokenizer(args.model)
    problems = seeded_subset(read_problems(DATA / "train.jsonl", "train")[0], args.batch, seed=0)
    examples = [tokenize_example(tokenizer, p["question"], p["answer"]) for p in problems]
    model = load_model(args.model, "auto")
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what TRL's SFTTrainer installs
    lora = LoraConfig()
    model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                 target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    model.train()
    causal_lm = model.get_base_model()
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    padded, packed = padded_batch(examples, tokenizer.pad_token_id), packed_batch(examples)
    n_real = sum(len(e["input_ids"]) for e in examples)
    n_loss = int((packed["labels"][:, 1:] != -100).sum())
    print(f"model {args.model} dtype {resolve_dtype('auto')}, threads {torch.get_num_threads()}; batch of "
          f"{args.batch}: {n_real} tokens ({padded['input_ids'].numel()} padded), {n_loss} loss-bearing")

    def decoder_forward(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return decoder(**inputs, use_cache=False).last_hidden_state

    def ours(batch):
        return loss_positions_head(decoder_forward(batch), batch["labels"], head)

    def trls(batch):
        return model(**batch, fused_lm_head=True)

    def step(forward, batch, checkpointing=False):
        def run():
            if checkpointing:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            out = forward(batch)
            loss = out.losses.sum() if hasattr(out, "losses") else -out.log_probs.sum()
            loss.backward()
            if checkpointing:
                model.gradient_checkpointing_disable()
        return run

    rows = [
        ("decoder forward, padded", lambda: decoder_forward(padded)),
        ("decoder forward, packed", lambda: decoder_forward(packed)),
        ("decoder forward+backward, packed", lambda: decoder_forward(packed).sum().backward()),
        ("TRL head forward, all padded positions",
         lambda: trls(padded) if False else None),  # replaced below: needs hidden states, timed through the model
        ("step: TRL head, padded, checkpointing (TRL defaults)", step(trls, padded, checkpointing=True)),
        ("step: TRL head, padded", step(trls, padded)),
        ("step: TRL head, packed", step(trls, packed)),
        ("step: our head, packed", step(ours, packed)),
        ("step: our head, padded", step(ours, padded)),
    ]
    hidden = decoder_forward(packed).detach()
    labels = packed["labels"]
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).requires_grad_()
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def trl_head_all_positions():
        log_probs, *_ = ChunkedLogProbFunction.apply(
            flat, head.weight, None, labels[:, 1:].clamp(min=0).reshape(-1), 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE,
            None, 1.0, ("entropy", "is_top1"))
        log_probs.sum().backward()

    def our_head_loss_positions():
        h = hidden.clone().requires_grad_()
        loss_positions_head(h, labels, head).losses.sum().backward()

    rows[3] = ("head forward+backward: TRL, every position (as on CPU)", trl_head_all_positions)
    rows.insert(4, ("head forward+backward: ours, loss-bearing positions", our_head_loss_positions))
    for label, run in rows:
        seconds = median_seconds(run, args.repeats)
        model.zero_grad(set_to_none=True)
        print(f"{label:58s} {seconds:7.2f} s  {n_real / seconds:7.1f} tokens/s", flush=True)


if __name__ == "__main__":
    main()
