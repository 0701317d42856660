"""Training speed and memory: `mathtune train` against the TRL setup a user writes from TRL's documentation.

Both train the same model with the same LoRA configuration (mathtune's defaults) on the same GSM8K
training problems, in the same order, with the same batch size, learning rate, schedule and number
of optimizer steps, each in its own process:

(a) TRL: SFTTrainer + PEFT LoraConfig on a prompt/completion dataset, TRL's defaults kept (padded
    batches, gradient checkpointing, TRL's LM head over every position on a CPU, max_length 1024),
    except the dtype: both sides take what mathtune's `dtype: auto` picks for the machine (TRL's
    default bf16 is emulated, and slow, on a CPU without AVX-512 BF16), or --dtype for both.
(b) `mathtune train` (mathtune.cli.main), with its defaults.

Then another process scores both adapters the same way: the mean token loss on the training problems,
dropout off. `loss_delta` is the difference (b) - (a); the two must agree within --tolerance
(relative), the only differences being the dropout masks (padded and packed batches draw them
differently) and the order of floating-point sums. Another trains (b) on half the problems
for the cost-growth check. Time is the Trainer's own train_runtime (model loading excluded); memory
is each process's peak resident set (ru_maxrss), and peak GPU memory on a GPU.

MFU: model FLOPs per second over the machine's matrix-multiply peak, measured here first (the best
of several shapes, in the run's dtype). Model FLOPs per training token: 2 x decoder weights forward,
2 x decoder weights backward (the frozen weights need no weight gradient) and 6 x LoRA weights, plus
4 x vocab x hidden per loss-bearing token for the LM head (forward, and backward to the hidden
state); attention scores are left out (under 2% at GSM8K lengths).

The last line reads `speedup=<x> memory_ratio=<y> loss_delta=<z>`.

    PYTHONPATH=src .venv/bin/python bench/bench_train.py             # Gemma 3 270M, 64 problems
    PYTHONPATH=src python bench/bench_train.py --random-shape gemma-2b --tokenizer DIR   # on a GPU

`--random-shape gemma-2b` trains a randomly initialised model with Gemma-2B's architecture and
shape (GemmaForCausalLM: 18 layers, hidden 2048, MLP 16384, 8 query heads and 1 key/value head of
256) instead: throughput needs no trained weights. Its vocabulary is the tokenizer's (Gemma 3's
262,144 words with the packaged tokenizer, 2.4% more than Gemma-2B's 256,000), so the text is
tokenized as Gemma tokenizes it. It is meant for a GPU (2.5 billion weights).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mathtune.data import format_completion, format_prompt, read_problems, seeded_subset, tokenize_example
from mathtune.hardware import cpu_facts, cpu_kind, resolve_dtype
from mathtune.model_cache import save_model_dir
from mathtune.models import PACKAGED_GEMMA, load_model, load_tokenizer, resolve_model_path

DATA = Path(os.environ.get("MATHTUNE_DATA") or Path(__file__).resolve().parents[1].parent / "shared/data/gsm8k")
SEED = 42
VALIDATION_FRACTION = 0.1  # mathtune holds out ceil(10%) of what it is given; it is given that much more
# google/gemma-2b's config.json, less its vocabulary size (the tokenizer's is used)
GEMMA_2B_SHAPE = dict(
    hidden_size=2048, intermediate_size=16384, num_hidden_layers=18, num_attention_heads=8,
    num_key_value_heads=1, head_dim=256, max_position_embeddings=8192, hidden_activation="gelu_pytorch_tanh",
    rms_norm_eps=1e-6, rope_theta=10000.0,
)


# --- the two sides, each run in its own process --------------------------------------------------


def train_with_trl(args, problems: list[dict], out: Path, name: str = "trl") -> dict:
    """(a): SFTTrainer as TRL's documentation shows it, on a prompt/completion dataset."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, set_seed
    from trl import SFTConfig, SFTTrainer

    from mathtune.config import load_config

    config = load_config("cpu-demo")
    dtype = resolve_dtype(args.dtype)
    # as the documentation loads it: without mathtune.models.load_tokenizer's freeing of the construction copies
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    model = load_model(args.model, args.dtype)
    dataset = Dataset.from_list(
        [{"prompt": format_prompt(p["question"]), "completion": format_completion(p["answer"])} for p in problems]
    )
    training_args = SFTConfig(
        output_dir=str(out / name), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_size,
        learning_rate=config.train.learning_rate, lr_scheduler_type=config.train.lr_scheduler,
        max_grad_norm=config.train.max_grad_norm, logging_steps=1, save_strategy="no", report_to="none",
        seed=SEED, data_seed=SEED, bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(),
    )
    set_seed(SEED)  # the LoRA weights start where mathtune's do
    trainer = SFTTrainer(
        model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
        peft_config=LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                               target_modules=config.lora.target_modules, task_type="CAUSAL_LM"),
    )
    result = trainer.train()
    trainer.save_model(str(out / f"{name}-adapter"))
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {
        "train_runtime_s": result.metrics["train_runtime"], "steps": trainer.state.global_step,
        "counted_tokens": trainer._total_train_tokens, "last_step_loss": losses[-1],
        "inherited": {key: getattr(training_args, key) for key in
                      ("gradient_checkpointing", "padding_free", "max_length", "completion_only_loss")},
        "adapter": str(out / f"{name}-adapter"),
    }


def written_by_this_benchmark(run_dir: Path) -> bool:
    """Whether run_dir is a run this script started: its environment.json records this script as the command.
    `mathtune train --overwrite` replaces only directories that carry the current marker of a mathtune
    run, so a run written by an older mathtune would otherwise stop the benchmark."""
    try:
        command = json.loads((run_dir / "environment.json").read_text()).get("command") or []
    except (OSError, ValueError, AttributeError):
        return False
    return bool(command) and Path(str(command[0])).name == Path(__file__).name


def train_with_mathtune(args, problems: list[dict], out: Path, name: str) -> dict:
    """(b): `mathtune train` on a GSM8K directory holding the problems plus the validation share it holds out."""
    from mathtune.cli import main as mathtune_main
    from mathtune.runfiles import read_json, read_jsonl

    data_dir = out / f"data-{name}"
    data_dir.mkdir(parents=True, exist_ok=True)
    if written_by_this_benchmark(out / name):  # an earlier run of this benchmark, maybe by an older mathtune
        shutil.rmtree(out / name)
    for split, rows in (("train", problems), ("test", problems[:1])):
        (data_dir / f"{split}.jsonl").write_text(
            "".join(json.dumps({"question": p["question"], "answer": p["answer"]}) + "\n" for p in rows))
    code = mathtune_main([
        "train", "--preset", "cpu-demo", "--data", str(data_dir), "--output-dir", str(out), "--name", name,
        "--overwrite", "--set", f"model.name={args.model}", "--set", "data.source=gsm8k",
        "--set", "data.train_limit=null", "--set", f"data.validation_fraction={VALIDATION_FRACTION}",
        "--set", "data.max_length=1024", "--set", f"train.epochs={args.epochs}",
        "--set", f"train.batch_size={args.batch_size}", "--set", "train.logging_steps=1",
        "--set", "train.eval_steps=1000000", "--set", "train.early_stopping_patience=null",
        "--set", "eval.generate_every=0",
        "--set", f"train.seed={SEED}", "--set", f"data.seed={SEED}", "--set", f"model.dtype={args.dtype}",
        *[option for setting in args.mathtune_set for option in ("--set", setting)],
    ])
    if code != 0:
        raise SystemExit(f"mathtune train failed with exit code {code}")
    run_dir = out / name
    result = read_json(run_dir / "train_result.json")
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "train"]
    return {  # the Trainer validates once at the end; (a) has no validation set, so that time is left out
        "train_runtime_s": result["train_runtime_s"] - result["eval_s"], "steps": result["steps_done"],
        "counted_tokens": result["train_tokens"], "last_step_loss": losses[-1],
        "train_ids": read_json(run_dir / "data.json")["train_ids"], "adapter": str(run_dir / "adapter"),
    }


def score_adapters(args, problems: list[dict], adapters: list[str]) -> dict:
    """Mean token loss of each adapter on the training problems (eval mode), and the model's weight counts."""
    tokenizer = load_tokenizer(args.model)
    examples = [tokenize_example(tokenizer, p["question"], p["answer"]) for p in problems]
    losses = []
    for adapter in adapters:
        model = load_model(args.model, args.dtype, adapter=adapter)
        loss_sum, n_tokens = 0.0, 0
        with torch.no_grad():
            for example in examples:
                ids = torch.tensor([example["input_ids"]], device=model.device)
                labels = torch.tensor([example["labels"]], device=model.device)
                n = int((labels[:, 1:] != -100).sum())
                loss_sum += float(model(input_ids=ids, labels=labels).loss) * n
                n_tokens += n
        losses.append(loss_sum / n_tokens)
    base = model.get_base_model()
    text = base.config.get_text_config()
    return {
        "losses": losses,
        "decoder_params": sum(p.numel() for n, p in base.named_parameters() if ".layers." in n and "lora_" not in n),
        "lora_params": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n),
        "vocab": text.vocab_size, "hidden": text.hidden_size,
    }


def child(args) -> None:
    """One side, in this process; writes its result and this process's peak memory to --result."""
    out = Path(args.work)
    problems = json.loads((out / args.problems_file).read_text())
    if args.side in ("trl", "trl-no-cudnn"):
        if args.side == "trl-no-cudnn":  # (a) with only mathtune's attention-backend choice added
            torch.backends.cuda.enable_cudnn_sdp(False)
        result = train_with_trl(args, problems, out, args.side)
    elif args.side == "mathtune":
        result = train_with_mathtune(args, problems, out, args.name)
    elif args.side == "prepare":  # the model directories both sides load, made before either is measured
        result = {"model_dirs": [resolve_model_path(args.model, dtype)
                                 for dtype in (torch.float32, resolve_dtype(args.dtype))]}
    else:
        result = score_adapters(args, problems, args.adapters)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    Path(args.result).write_text(json.dumps(result))


# --- the parent: runs the sides, prints the comparison ------------------------------------------


def matmul_peak_gflops(dtype: torch.dtype, device: str, seconds: float = 1.0) -> float:
    """The best matrix-multiply rate of a few square and model-shaped products on this machine."""
    shapes = [(2048, 2048, 2048), (1024, 1024, 1024), (512, 640, 2048), (640, 262144, 128)]
    if device == "cuda":
        shapes += [(8192, 8192, 8192), (4096, 2048, 16384)]
    best = 0.0
    for m, k, n in shapes:
        a = torch.randn(m, k, dtype=dtype, device=device)
        b = torch.randn(k, n, dtype=dtype, device=device)
        a @ b
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(10):  # then wait, so that a GPU's queue never runs far ahead of the clock
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            runs += 10
        best = max(best, 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9)
    return best


def random_model_dir(shape: str, tokenizer_dir: str, work: Path, dtype: str = "auto") -> str:
    """A randomly initialised model of a named shape, saved with a tokenizer under `work`, for throughput runs."""
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

    target = work / f"{shape}-shape"
    if (target / "config.json").exists():
        return str(target)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GemmaConfig(**GEMMA_2B_SHAPE, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = GemmaForCausalLM(config).to(resolve_dtype(dtype))
    print(f"built a random {shape}-shape model: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B weights, "
          f"vocabulary {len(tokenizer)}", flush=True)
    return str(save_model_dir(model, tokenizer, target))


def run_child(args, side: str, problems_file: str, *extra: str) -> dict:
    result = Path(args.work) / f"result-{side}-{Path(problems_file).stem}.json"
    command = [sys.executable, __file__, "--side", side, "--work", args.work, "--model", args.model,
               "--problems-file", problems_file, "--result", str(result), "--epochs", str(args.epochs),
               "--batch-size", str(args.batch_size), "--dtype", args.dtype,
               *[f"--mathtune-set={s}" for s in args.mathtune_set], *extra]
    print(f"... {side} on {problems_file}", flush=True)
    paths = [str(Path(__file__).resolve().parents[1] / "src"), os.environ.get("PYTHONPATH")]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))})
    return json.loads(result.read_text())


def token_counts(tokenizer, problems: list[dict]) -> tuple[int, int]:
    """All tokens and loss-bearing tokens of one pass over the problems, as mathtune tokenizes them."""
    examples = [tokenize_example(tokenizer, p["question"], p["answer"]) for p in problems]
    return (sum(len(e["input_ids"]) for e in examples),
            sum(sum(label != -100 for label in e["labels"][1:]) for e in examples))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=PACKAGED_GEMMA)
    parser.add_argument("--random-shape", choices=["gemma-2b"], help="a randomly initialised model of this shape")
    parser.add_argument("--tokenizer", help="tokenizer directory for --random-shape (default: the packaged Gemma's)")
    parser.add_argument("--problems", type=int, default=64, help="training problems (the same for both sides)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--tolerance", type=float, default=0.02, help="relative loss agreement required")
    parser.add_argument("--work", default="runs/bench-train")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="both sides' dtype (default: what mathtune's model.dtype auto picks here); float32 "
                             "measures a float32-only CPU's code path on any CPU")
    parser.add_argument("--mathtune-set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for (b), e.g. train.gradient_checkpointing=true (repeatable)")
    parser.add_argument("--side", choices=["prepare", "trl", "trl-no-cudnn", "mathtune", "score"], help=argparse.SUPPRESS)
    parser.add_argument("--problems-file", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args()


def write_problem_files(n_problems: int, work: Path) -> dict[str, int]:
    """full.json and half.json: what mathtune is given, the problems plus the share it holds out, so that
    (a) can then train on exactly the problems mathtune kept; returns each file's training problem count."""
    pool = seeded_subset(read_problems(DATA / "train.jsonl", "train")[0], 4 * n_problems, SEED)
    sizes = {"full": n_problems, "half": n_problems // 2}
    for label, n in sizes.items():
        given = next(g for g in range(n, len(pool)) if g - math.ceil(VALIDATION_FRACTION * g) == n)
        (work / f"{label}.json").write_text(json.dumps(pool[:given]))
    return sizes


def main() -> None:
    args = parse_args()
    if args.side:
        return child(args)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(args.dtype)
    print(f"machine: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU ' + cpu_kind(*cpu_facts(), os.environ.get('ONEDNN_MAX_CPU_ISA'))}, "
          f"{torch.get_num_threads()} threads, dtype {str(dtype).removeprefix('torch.')}", flush=True)
    peak = matmul_peak_gflops(dtype, device)
    print(f"measured matrix-multiply peak: {peak:.1f} GFLOP/s", flush=True)
    if args.random_shape:
        args.model = random_model_dir(args.random_shape, args.tokenizer or resolve_model_path(PACKAGED_GEMMA), work,
                                      args.dtype)

    sizes = write_problem_files(args.problems, work)
    # On a fresh machine the packaged model is converted once (about a minute and 2 GB of memory): in a process
    # of its own, so that neither side's time or peak memory counts it.
    run_child(args, "prepare", "full.json")
    fast = run_child(args, "mathtune", "full.json", "--name", "mathtune-full")
    given = json.loads((work / "full.json").read_text())  # mathtune's ids count the lines of the file it read
    kept = [given[int(i.rsplit("-", 1)[1])] for i in fast["train_ids"]]
    if len(kept) != args.problems:
        raise SystemExit(f"mathtune kept {len(kept)} training problems, not {args.problems}")
    (work / "kept.json").write_text(json.dumps(kept))
    slow = run_child(args, "trl", "kept.json")
    # On CUDA, mathtune turns cuDNN's attention off (mathtune.speedups.memory.prefer_shape_agnostic_attention);
    # (a) as documented keeps it, so this row shows what that choice alone gives TRL.
    no_cudnn = run_child(args, "trl-no-cudnn", "kept.json") if device == "cuda" else None
    half = run_child(args, "mathtune", "half.json", "--name", "mathtune-half")
    scored = run_child(args, "score", "kept.json", "--adapters", slow["adapter"], fast["adapter"])
    print_comparison(args, peak, kept, sizes, slow, fast, no_cudnn, half, scored)


def print_comparison(args, peak: float, kept: list[dict], sizes: dict, slow: dict, fast: dict,
                     no_cudnn: dict | None, half: dict, scored: dict) -> None:
    """Speed, MFU, memory and final loss of each side, the cost growth of (b), and the closing line."""
    tokenizer = load_tokenizer(args.model)
    tokens, loss_tokens = token_counts(tokenizer, kept)
    tokens, loss_tokens = tokens * args.epochs, loss_tokens * args.epochs
    flops_per_token = 4 * scored["decoder_params"] + 6 * scored["lora_params"]
    model_flops = flops_per_token * tokens + 4 * scored["vocab"] * scored["hidden"] * loss_tokens
    print(f"\n{args.problems} problems x {args.epochs:g} epoch(s): {tokens:.0f} tokens, {loss_tokens:.0f} "
          f"loss-bearing; {model_flops / 1e12:.2f} TFLOP of model FLOPs")
    print("(a) keeps TRL's defaults: " + ", ".join(f"{k}={v}" for k, v in slow["inherited"].items()))
    rows = {"(a) TRL documented setup": slow, "(b) mathtune train": fast}
    for (label, side), loss in zip(rows.items(), scored["losses"]):
        seconds = side["train_runtime_s"]
        side["final_loss"] = loss
        mfu = model_flops / seconds / 1e9 / peak
        gpu = f", peak GPU {side['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in side else ""
        print(f"{label:26s} {side['steps']} steps in {seconds:7.1f} s: {tokens / seconds:6.1f} tokens/s, "
              f"{loss_tokens / seconds:6.1f} loss-bearing tokens/s, MFU {mfu:.1%}; peak RSS "
              f"{side['peak_rss_gb']:.2f} GB{gpu}; final loss {loss:.4f} (last step {side['last_step_loss']:.4f}); "
              f"trainer counted {side['counted_tokens']} tokens")
    if no_cudnn:
        seconds = no_cudnn["train_runtime_s"]
        print(f"{'(a) with cuDNN attention off':26s} {no_cudnn['steps']} steps in {seconds:7.1f} s: "
              f"{tokens / seconds:6.1f} tokens/s, MFU {model_flops / seconds / 1e9 / peak:.1%}; peak GPU "
              f"{no_cudnn['peak_gpu_gb']:.2f} GB; last step loss {no_cudnn['last_step_loss']:.4f}; (b) is "
              f"{seconds / fast['train_runtime_s']:.2f}x as fast as this")
    speedup = slow["train_runtime_s"] / fast["train_runtime_s"]
    memory_ratio = fast["peak_rss_gb"] / slow["peak_rss_gb"]
    loss_delta = fast["final_loss"] - slow["final_loss"]
    print(f"speed ratio (b)/(a): {speedup:.2f}x; memory ratio (b)/(a): {memory_ratio:.2f}; loss (b)-(a): "
          f"{loss_delta:+.4f} ({abs(loss_delta) / slow['final_loss']:.2%} of (a); tolerance {args.tolerance:.0%}: "
          f"{'within' if abs(loss_delta) <= args.tolerance * slow['final_loss'] else 'OUTSIDE'})")
    if "peak_gpu_gb" in slow:
        print(f"GPU memory ratio (b)/(a): {fast['peak_gpu_gb'] / slow['peak_gpu_gb']:.2f}")
    per_epoch = {label: run["train_runtime_s"] / args.epochs for label, run in (("half", half), ("full", fast))}
    print(f"cost growth, mathtune train: {sizes['half']} problems {per_epoch['half']:.1f} s/epoch, peak RSS "
          f"{half['peak_rss_gb']:.2f} GB; {sizes['full']} problems {per_epoch['full']:.1f} s/epoch, peak RSS "
          f"{fast['peak_rss_gb']:.2f} GB: time x{per_epoch['full'] / per_epoch['half']:.2f} for x"
          f"{sizes['full'] / sizes['half']:.2f} the problems (x{fast['counted_tokens'] / half['counted_tokens']:.2f} "
          f"the tokens: {half['counted_tokens']} and {fast['counted_tokens']}), "
          f"memory x{fast['peak_rss_gb'] / half['peak_rss_gb']:.2f}")
    print(f"speedup={speedup:.2f} memory_ratio={memory_ratio:.2f} loss_delta={loss_delta:+.4f}")


if __name__ == "__main__":
    main()
