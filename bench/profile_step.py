"""Where the time of one LoRA training step goes, on the packaged Gemma 3 270M.

One batch of GSM8K training problems (prompt masked, as `mathtune train` builds them) goes forward
and backward through the LoRA model, first as TRL's documented setup runs it, then with each of
mathtune's changes added in turn, so each line shows what one change buys. Then the parts of the
final step on their own. Each time is the median of --repeats runs after one warm-up.

    PYTHONPATH=src .venv/bin/python bench/profile_step.py --batch 4
    PYTHONPATH=src python bench/profile_step.py --random-shape gemma-2b --tokenizer DIR   # on a GPU

On a GPU the batch goes to the GPU, each time waits for the GPU to finish, and --trace FILE writes
the operator table of the last step from torch.profiler (time on the CPU and on the GPU per operator).
The lines add the changes `mathtune train` makes on a CPU; on CUDA it instead keeps TRL's head,
torch's dropout and PEFT's LoRA forward, and turns cuDNN's attention off (mathtune.speedups.memory.prefer_shape_agnostic_attention),
which this script leaves on: compare GPU setups with bench_train.py.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time
from pathlib import Path

import torch

from mathtune import speedups
from mathtune.config import LoraConfig
from mathtune.data import read_problems, seeded_subset, tokenize_example
from mathtune.hardware import resolve_dtype
from mathtune.model_cache import float32_original
from mathtune.models import PACKAGED_GEMMA, load_model, load_tokenizer, resolve_model_path
from mathtune.speedups.lm_loss import head_weight, loss_positions_head
from mathtune.speedups.packed_attention import NAME as PACKED_ATTENTION, use_packed_attention

DATA = Path(os.environ.get("MATHTUNE_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k")


def finished() -> None:
    """Wait for queued GPU work, so that the clock measures it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up
    finished()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        finished()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def padded_batch(examples: list[dict], pad_id: int) -> dict:
    """Right-padded rows with an attention mask, as TRL's default collator builds them."""
    width = max(len(e["input_ids"]) for e in examples)
    return {
        "input_ids": torch.tensor([e["input_ids"] + [pad_id] * (width - len(e["input_ids"])) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"]))
                                        for e in examples]),
        "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in examples]),
    }


def packed_batch(examples: list[dict]) -> dict:
    """One row, each example's positions counted from 0, as the padding-free collator builds it."""
    return {
        "input_ids": torch.tensor([sum((e["input_ids"] for e in examples), [])]),
        "position_ids": torch.tensor([sum((list(range(len(e["input_ids"]))) for e in examples), [])]),
        "labels": torch.tensor([sum(([-100] + e["labels"][1:] for e in examples), [])]),
    }


class Profile:
    """The LoRA model, its two batches, and how to time a step of it."""

    def __init__(self, args):
        from peft import LoraConfig as PeftLoraConfig, get_peft_model
        from trl.trainer.utils import add_fused_lm_head

        tokenizer = load_tokenizer(args.model)
        problems = seeded_subset(read_problems(DATA / "train.jsonl", "train")[0], args.batch, seed=0)
        examples = [tokenize_example(tokenizer, p["question"], p["answer"]) for p in problems]
        model = load_model(args.model, "auto")
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what TRL's SFTTrainer installs
        lora = LoraConfig()
        self.model = get_peft_model(model, PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                          target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        self.model.train()
        self.causal_lm = self.model.get_base_model()
        self.decoder, self.head = self.causal_lm.get_decoder(), self.causal_lm.get_output_embeddings()
        self.padded = {k: v.to(model.device) for k, v in padded_batch(examples, tokenizer.pad_token_id).items()}
        self.packed = {k: v.to(model.device) for k, v in packed_batch(examples).items()}
        self.n_tokens = sum(len(e["input_ids"]) for e in examples)
        self.repeats = args.repeats
        n_loss = int((self.packed["labels"][:, 1:] != -100).sum())
        print(f"model {args.model}, dtype {str(resolve_dtype('auto')).removeprefix('torch.')}, "
              f"{torch.get_num_threads()} threads; {args.batch} problems: {self.n_tokens} tokens "
              f"({self.padded['input_ids'].numel()} with padding), {n_loss} loss-bearing")

    def autocast(self):
        """The Trainer's bf16 (both setups) runs the forward pass under autocast."""
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16,
                              enabled=self.head.weight.dtype == torch.bfloat16)

    def trl_head(self, batch):
        return -self.model(**batch, fused_lm_head=True).log_probs.sum()

    def our_head(self, batch, weight=None):
        hidden = self.decoder(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).last_hidden_state
        return loss_positions_head(hidden, batch["labels"], self.head.weight if weight is None else weight).losses.sum()

    def step(self, loss_of, batch, checkpointing=False, attention="sdpa"):
        def run():
            self.causal_lm.set_attn_implementation(attention)
            if checkpointing:
                self.model.gradient_checkpointing_enable({"use_reentrant": False})
            with self.autocast():
                loss = loss_of(batch)
            loss.backward()
            if checkpointing:
                self.model.gradient_checkpointing_disable()
            self.model.zero_grad(set_to_none=True)
        return run

    def show(self, label, run):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        seconds = median_seconds(run, self.repeats)
        gpu = f"  peak GPU {torch.cuda.max_memory_allocated() / 2**30:6.2f} GB" if torch.cuda.is_available() else ""
        print(f"{label:64s} {seconds:7.3f} s  {self.n_tokens / seconds:7.1f} tokens/s{gpu}", flush=True)
        return seconds


# mathtune's CPU patches, one line each, in speedups.apply's order
CPU_PATCHES = {"uniform_dropout": "LoRA dropout masks from 16-bit words", "fused_lora": "LoRA branch as one function",
               "gated_mlp": "gated MLP as one function (gate and up recomputed)",
               "compact_weights": "frozen base weights compact", "rms_norm": "RMS norms keeping only their output"}


def whole_steps(p: Profile, trace: str | None):
    """Whole steps from TRL's documented setup to mathtune's, each line adding one change; returns mathtune's loss."""
    packed = functools.partial(p.step, batch=p.packed, attention=PACKED_ATTENTION)
    print("\nwhole steps (forward + backward), each line adding one change to the one above:")
    use_packed_attention(p.causal_lm)  # registers the function; each step sets the implementation it uses
    first = p.show("TRL defaults: padded, checkpointing, TRL's head on every position",
                   p.step(p.trl_head, p.padded, checkpointing=True))
    p.show("  without gradient checkpointing", p.step(p.trl_head, p.padded))
    p.show("  padding-free row (SDPA with a block-diagonal mask)", p.step(p.trl_head, p.packed))
    p.show("  attention one example at a time", packed(p.trl_head))
    p.show("  our head on loss-bearing positions", packed(p.our_head))
    only = {name: False for name in speedups.Flags.__dataclass_fields__}
    loss_of = p.our_head
    for name, label in CPU_PATCHES.items():
        if name == "gated_mlp":  # the head as mathtune train reads it; the weight itself where nothing is compact
            weight = head_weight(p.causal_lm, float32_original(p.causal_lm, p.head.weight))
            loss_of = functools.partial(p.our_head, weight=weight)
            kind = "is (not compact here)" if weight is p.head.weight else type(weight).__name__
            p.show(f"  head weight as {kind}", packed(loss_of))
        changed = speedups.apply(p.model, speedups.Flags(**{**only, name: True}))[name]
        last = p.show(f"  {label} ({changed} modules)", packed(loss_of))
    print("  (the line above is mathtune train on a CPU)")
    print(f"ratio: {first / last:.2f}x")
    p.show("  (the same with gradient checkpointing)", packed(loss_of, checkpointing=True))
    if trace:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        mathtune_step = packed(loss_of)
        with profile(activities=activities) as recorded:
            mathtune_step()
            finished()
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        Path(trace).write_text(recorded.key_averages().table(sort_by=sort, row_limit=40) + "\n\n"
                               + recorded.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    return weight


def parts(p: Profile, weight) -> None:
    """The decoder and the two heads on their own."""
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    print("\nparts of mathtune's step:")
    p.causal_lm.set_attn_implementation(PACKED_ATTENTION)
    inputs = {k: v for k, v in p.packed.items() if k != "labels"}

    def decoder_forward():
        with p.autocast():
            return p.decoder(**inputs, use_cache=False).last_hidden_state

    p.show("decoder forward", decoder_forward)
    p.show("decoder forward + backward", lambda: decoder_forward().sum().backward())
    hidden = decoder_forward().detach()

    def trl_head_alone():
        flat = hidden[:, :-1].reshape(-1, hidden.shape[-1]).requires_grad_()
        targets = p.packed["labels"][:, 1:].clamp(min=0).reshape(-1)
        log_probs, *_ = ChunkedLogProbFunction.apply(flat, p.head.weight, None, targets, 1.0,
                                                     _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("entropy", "is_top1"))
        log_probs.sum().backward()

    def our_head_alone():
        loss_positions_head(hidden.clone().requires_grad_(), p.packed["labels"], weight).losses.sum().backward()

    p.show("LM head forward + backward: TRL's, every position (as on a CPU)", trl_head_alone)
    p.show("LM head forward + backward: ours, loss-bearing positions", our_head_alone)
    keep_masks_side_by_side(p)


def keep_masks_side_by_side(p: Profile) -> None:
    """The LoRA keep-masks applied as a step applies them (each LoRA input, forward and backward), with
    torch.where (mathtune up to 54be717) and as a 0/1 factor (mathtune.speedups.dropout.as_factor)."""
    from mathtune.speedups.dropout import as_factor

    config = p.causal_lm.config.get_text_config()
    tokens, width, dtype = p.n_tokens, config.hidden_size, p.causal_lm.dtype
    attention = config.num_attention_heads * config.head_dim
    widths = [width] * 5 + [attention, config.intermediate_size]  # q, k, v, gate, up read the hidden state
    inputs = [torch.randn(tokens, w, dtype=dtype) for w in widths]
    masks = [torch.rand(tokens, w) >= 0.1 for w in widths]

    def apply(mask_with):
        def run():
            for _ in range(config.num_hidden_layers):
                for x, keep in zip(inputs, masks):
                    mask_with(x, keep), mask_with(x, keep)  # forward, and backward on a gradient of x's shape
        return run

    where = p.show("keep-masks, one step's: torch.where", apply(lambda x, keep: torch.where(keep, x, 0.0)))
    factor = p.show("keep-masks, one step's: times as_factor", apply(lambda x, keep: x * as_factor(keep, x.dtype)))
    print(f"keep-masks: as_factor {where / factor:.2f}x as fast as torch.where")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model", default=PACKAGED_GEMMA)
    parser.add_argument("--random-shape", choices=["gemma-2b"], help="a randomly initialised model of this shape")
    parser.add_argument("--tokenizer", help="tokenizer directory for --random-shape (default: the packaged Gemma's)")
    parser.add_argument("--work", default="runs/bench-train", help="where --random-shape saves its model")
    parser.add_argument("--keep-masks-only", action="store_true", help="only the keep-masks' side-by-side")
    parser.add_argument("--trace", help="write torch.profiler's operator table of mathtune's step here")
    args = parser.parse_args()
    speedups.memory.bound_matmul_cache()  # as mathtune train, before the first product
    if args.random_shape:
        from bench_train import random_model_dir  # bench/ is this script's import path

        args.model = random_model_dir(args.random_shape, args.tokenizer or resolve_model_path(PACKAGED_GEMMA),
                                      Path(args.work))
    profile = Profile(args)
    if args.keep_masks_only:
        return keep_masks_side_by_side(profile)
    parts(profile, whole_steps(profile, args.trace))


if __name__ == "__main__":
    main()
