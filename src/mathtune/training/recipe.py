"""LoRA fine-tuning on GSM8K with TRL's SFTTrainer, writing everything the report needs into the run directory.

What is ours: the data checks and split, the template, the run directory and its files, and a
per-example validation pass (the Trainer's evaluation only returns a batch-averaged loss, and the
report's outlier analysis needs each example's loss). Checkpointing, schedulers, early stopping,
logging, progress bars and distributed launch are the Trainer's.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from mathtune import data as data_module
from mathtune import evaluate as evaluation
from mathtune import speedups
from mathtune.config import Config
from mathtune.hardware import hardware_name, resolve_dtype
from mathtune.model_cache import float32_original
from mathtune.models import load_model, load_tokenizer
from mathtune.speedups.memory import release_free_heap
from mathtune.runfiles import append_jsonl, read_json, read_jsonl, write_json, write_text

COUNTERS = "mathtune_counters.json"  # in each checkpoint: what restore_counters reads
# what TRL's padding-free collator puts in a batch (split_packed_row cuts nothing else)
PACKED_ROW_KEYS = {"input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
                   "max_length_q", "max_length_k"}
# train.early_stopping_metric -> (the Trainer's metric_for_best_model, greater_is_better)
BEST_METRIC = {"eval_loss": ("eval_loss", False), "eval_exact_match": ("eval_exact_match_strict", True)}


class RunDirError(ValueError):
    """The output directory holds another run; the message says how to proceed."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite, or blew up; the message names the step and the last good checkpoint."""


# --- the run directory --------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, overwrite: bool = False, resume: bool = False) -> None:
    """Refuse to mix two runs in one directory unless the user asks for it."""
    holds_run = (run_dir / "config.yaml").exists()
    if holds_run and not (overwrite or resume):
        raise RunDirError(
            f"{run_dir} already holds a run. Pass --resume to continue it, --overwrite to replace it, "
            "or choose another --name / output_dir."
        )
    if holds_run and overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def environment_info(config: Config) -> dict:
    import accelerate
    import peft
    import transformers
    import trl

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "python": sys.version.split()[0],
        "packages": {
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "trl": trl.__version__, "accelerate": accelerate.__version__,
        },
        "hardware": hardware_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "seed": config.train.seed,
        "git_commit": commit,
        "command": sys.argv,
    }


# --- data ---------------------------------------------------------------------------------------


def prepare_data(config: Config) -> tuple[list[dict], list[dict], data_module.Dataset]:
    """Load, subset and split the training problems."""
    dataset = data_module.load_dataset(config.data)
    problems = data_module.seeded_subset(dataset.train, config.data.train_limit, config.data.seed)
    train, validation = data_module.split_train_validation(
        problems, config.data.validation_fraction, config.data.seed
    )
    return train, validation, dataset


def write_data_json(run_dir: Path, dataset: data_module.Dataset, train: list[dict], validation: list[dict]) -> None:
    """data.json: where the problems came from, and the ids of each side of the split."""
    write_json(run_dir / "data.json", {
        "source": dataset.source,
        "location": dataset.location,
        "train_records": len(dataset.train),
        "test_records": len(dataset.test),
        "skipped_invalid": dataset.skipped,
        "train_ids": [p["id"] for p in train],
        "validation_ids": [p["id"] for p in validation],
    })


def tokenize(problems: list[dict], tokenizer, max_length: int) -> tuple[list[dict], list[str]]:
    """Tokenized examples; those longer than max_length are dropped (never truncated: that would cut the answer)."""
    examples, dropped = [], []
    for problem in problems:
        example = data_module.tokenize_example(tokenizer, problem["question"], problem["answer"])
        if len(example["input_ids"]) > max_length:
            dropped.append(problem["id"])
            continue
        examples.append({**example, "id": problem["id"]})
    return examples, dropped


def split_packed_row(batch: dict, max_tokens: int) -> list[dict]:
    """A padding-free batch (one row of examples end to end) cut into pieces of consecutive whole
    examples of at most max_tokens tokens each (an example longer than that goes alone).

    Each piece carries what the collator gives a row of its own: position ids and labels sliced,
    sequence offsets and lengths for flash attention recomputed. A batch holding anything else is
    returned whole.
    """
    positions = batch.get("position_ids")
    if positions is None or positions.shape[0] != 1 or not set(batch) <= PACKED_ROW_KEYS:
        return [batch]
    starts = torch.nonzero(positions[0] == 0).flatten().tolist()
    ends = starts[1:] + [positions.shape[1]]
    groups, first = [], 0  # [first, last) example indices of each piece
    for index in range(1, len(starts) + 1):
        if index == len(starts) or ends[index] - starts[first] > max_tokens:
            groups.append((first, index))
            first = index
    pieces = []
    for first, last in groups:
        low, high = starts[first], ends[last - 1]
        lengths = [end - start for start, end in zip(starts[first:last], ends[first:last])]
        piece = {key: batch[key][:, low:high] for key in ("input_ids", "labels", "position_ids") if key in batch}
        if "seq_idx" in batch:
            piece["seq_idx"] = batch["seq_idx"][:, low:high] - first
        if "cu_seq_lens_q" in batch:
            offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=batch["cu_seq_lens_q"].dtype,
                                   device=batch["cu_seq_lens_q"].device)
            piece.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=max(lengths),
                         max_length_k=max(lengths))
        pieces.append(piece)
    return pieces


# --- the trainer --------------------------------------------------------------------------------


def make_trainer_class():
    """SFTTrainer plus a per-example validation pass and exact match on a validation subset (the loss alone
    does not say whether answers come out right); built lazily so importing mathtune stays light."""
    from accelerate.utils import gather_object
    from trl import SFTTrainer

    class MathTuneTrainer(SFTTrainer):
        def __init__(self, *args, validation_examples, run_dir, generation_problems, eval_config,
                     max_tokens_per_pass=None, speedups_flags=speedups.Flags(), **kwargs):
            super().__init__(*args, **kwargs)
            self.max_tokens_per_pass = max_tokens_per_pass
            if max_tokens_per_pass and self.accelerator.num_processes > 1:
                # each process would run its own number of pieces, and every forward of a
                # DistributedDataParallel model is a collective operation: the processes would wait on each other
                print("warning: train.max_tokens_per_pass works in a single process; with "
                      f"{self.accelerator.num_processes} processes batches go through whole (lower "
                      "train.batch_size and raise train.gradient_accumulation_steps to save memory)",
                      file=sys.stderr, flush=True)
                self.max_tokens_per_pass = None
            self.piece_accuracy = None  # [correct, loss-bearing] summed over a split batch's pieces
            self.validation_examples = validation_examples
            self.run_dir = run_dir
            self.generation_problems = generation_problems
            self.eval_config = eval_config
            self.loss_tokens_seen = 0
            self.generate_seconds = 0.0
            self.eval_seconds = 0.0  # validation passes and exact match: part of the Trainer's train_runtime
            causal_lm = self.model.get_base_model()
            head = causal_lm.get_output_embeddings()
            original = float32_original(causal_lm, head.weight) if head is not None else None
            self.speedups = speedups.apply(self.model, speedups_flags, head_original=original)
            self.loss_head = "loss_head" in self.speedups

        def training_step(self, model, inputs, num_items_in_batch=None):
            """A batch longer than max_tokens_per_pass goes through forward and backward piece by piece.

            Every piece's loss is divided by the whole batch's loss-bearing tokens, so the gradients
            add up to the whole batch's (as with gradient accumulation), and the batch's token accuracy
            is logged once, over all its pieces (TRL's own head, where used, logs each piece's).
            """
            pieces = split_packed_row(inputs, self.max_tokens_per_pass) if self.max_tokens_per_pass else [inputs]
            if len(pieces) == 1:
                return super().training_step(model, inputs, num_items_in_batch)
            if num_items_in_batch is None:
                num_items_in_batch = int((inputs["labels"][:, 1:] != -100).sum())
            self.piece_accuracy = [0, 0] if self.loss_head else None
            loss = 0
            for piece in pieces:
                loss = loss + super().training_step(model, piece, num_items_in_batch)
            if self.piece_accuracy is not None:
                correct, counted = self.piece_accuracy
                self._metrics["train"]["mean_token_accuracy"].append(correct / counted if counted else 0.0)
                self.piece_accuracy = None
            return loss

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.loss_tokens_seen += int((inputs["labels"][:, 1:] != -100).sum())
            if not self.loss_head:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            outputs = model(**inputs, loss_head=True)
            n_loss = outputs.mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = outputs.losses.sum() / torch.as_tensor(n_loss).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages what was already a global mean
            self._log_step_metrics(outputs, inputs)
            return (loss, outputs) if return_outputs else loss

        def _log_step_metrics(self, outputs, inputs) -> None:
            """The token accuracy and token count TRL's compute_loss logs (TRL's entropy is not computed)."""
            mode = "train" if self.model.training else "eval"
            n_valid = self.accelerator.gather_for_metrics(outputs.mask.sum()).sum()
            n_correct = self.accelerator.gather_for_metrics(outputs.hits.sum()).sum()
            if mode == "train" and self.piece_accuracy is not None:  # one accuracy for the whole batch
                self.piece_accuracy[0] += int(n_correct)
                self.piece_accuracy[1] += int(n_valid)
            else:
                self._metrics[mode]["mean_token_accuracy"].append((n_correct / n_valid).item() if n_valid > 0 else 0.0)
            if mode == "train":  # padding-free rows hold no padding: every position is a token
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(
                    torch.tensor(inputs["input_ids"].numel(), device=self.accelerator.device)).sum())
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

        def loss_tokens_total(self) -> int:
            """Loss-bearing tokens seen so far by all processes (a collective: every process calls it)."""
            seen = torch.tensor(self.loss_tokens_seen, device=self.accelerator.device)
            return int(self.accelerator.reduce(seen, reduction="sum"))

        def log(self, logs, start_time=None):
            if "loss" in logs:
                logs["num_loss_tokens"] = self.loss_tokens_total()
            super().log(logs, start_time)

        def _save_checkpoint(self, model, trial):
            """Also keep the counters the Trainer does not, before it writes trainer_state.json (its last file).

            The heap's free pages go back first: saving the tokenizer builds its files in memory (70 MB
            for Gemma 3's), which would otherwise come on top of all the heap the steps left resident.
            """
            release_free_heap()
            counters = {"loss_tokens": self.loss_tokens_total(), "train_tokens": self._total_train_tokens,
                        "generate_s": self.generate_seconds, "eval_s": self.eval_seconds}
            if self.args.should_save:
                write_json(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}" / COUNTERS, counters)
            super()._save_checkpoint(model, trial)

        def restore_counters(self, checkpoint: Path) -> None:
            """Token counts and generation time go on from a checkpoint (each process's share sums to the total)."""
            saved = read_json(checkpoint / COUNTERS) or {}
            self.loss_tokens_seen = saved.get("loss_tokens", 0) if self.accelerator.is_main_process else 0
            self._total_train_tokens = saved.get("train_tokens", 0)
            self.generate_seconds = saved.get("generate_s", 0.0)
            self.eval_seconds = saved.get("eval_s", 0.0)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            """Token-weighted validation loss and accuracy, and each example's own, in one pass; exact match when due."""
            started = time.perf_counter()
            was_training = self.model.training
            self.model.eval()
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            mine = self.validation_examples[rank::world]
            rows = []
            batch_size = self.args.per_device_eval_batch_size
            with torch.no_grad():
                for start in range(0, len(mine), batch_size):
                    rows.extend(self._example_stats(mine[start : start + batch_size]))
            if world > 1:  # gather_object, not gather_for_metrics: the latter trims "duplicates" at epoch ends
                rows = gather_object(rows)
            n_tokens = sum(r["n_tokens"] for r in rows)
            metrics = {
                f"{metric_key_prefix}_loss": sum(r["loss_sum"] for r in rows) / max(n_tokens, 1),
                f"{metric_key_prefix}_mean_token_accuracy": sum(r["correct"] for r in rows) / max(n_tokens, 1),
            }
            if self.accelerator.is_main_process:
                step = self.state.global_step
                order = {e["id"]: i for i, e in enumerate(self.validation_examples)}
                for r in sorted(rows, key=lambda r: order[r["id"]]):
                    append_jsonl(self.run_dir / "example_losses.jsonl", {
                        "step": step, "id": r["id"],
                        "loss": r["loss_sum"] / r["n_tokens"], "token_accuracy": r["correct"] / r["n_tokens"],
                        "n_tokens": r["n_tokens"],
                    })
            every = self.eval_config.generate_every
            if every and (self.state.global_step // self.args.eval_steps) % every == 0:  # by step: resume-proof
                metrics.update(self._exact_match(metric_key_prefix))
            self.eval_seconds += time.perf_counter() - started
            self.log(metrics)
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            if was_training:
                self.model.train()
            return metrics

        def _exact_match(self, prefix: str) -> dict:
            """Greedy zero-shot answers to the generation subset, scored as `mathtune eval` scores them.

            Called in eval mode, where the decoding loop's use_cache=True holds although the Trainer
            turns the model's cache off for training. Each process answers its share of the problems.
            """
            rank, world = self.accelerator.process_index, self.accelerator.num_processes
            mine = self.generation_problems[rank::world]
            start = time.perf_counter()
            answers = evaluation.generate_answers(
                self.model, self.processing_class, [data_module.format_prompt(p["question"]) for p in mine],
                self.eval_config.max_new_tokens, self.eval_config.batch_size, progress=False,
            )
            scored = [evaluation.score_record(mine[i], text, n_tokens) for i, text, n_tokens in answers]
            rows = [(r["correct_strict"], r["correct_flexible"]) for r in scored]
            seconds = time.perf_counter() - start
            if world > 1:
                rows, seconds = gather_object(rows), max(gather_object([seconds]))
            self.generate_seconds += seconds
            return {
                f"{prefix}_exact_match_strict": sum(strict for strict, _ in rows) / len(rows),
                f"{prefix}_exact_match_flexible": sum(flexible for _, flexible in rows) / len(rows),
                f"{prefix}_exact_match_n": len(rows),
                f"{prefix}_generate_s": round(seconds, 3),
            }

        def _example_stats(self, examples: list[dict]) -> list[dict]:
            batch = self.data_collator([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples])
            batch = self._prepare_inputs(batch)
            # Per-token outputs are aligned with labels shifted by one; padding-free batches hold one
            # flattened row, so each example's tokens are a contiguous stretch of it.
            if self.loss_head:
                outputs = self.model(**batch, loss_head=True)
                losses, hits, mask = outputs.losses[0], outputs.hits[0], outputs.mask[0]
            else:
                outputs = self.model(**batch, fused_lm_head=True)
                losses, hits, mask = -outputs.log_probs[0], outputs.is_top1[0], outputs.label_mask[0]
            rows, offset = [], 0
            for example in examples:
                length = len(example["input_ids"])
                span = slice(offset, offset + length - 1)
                n = int(mask[span].sum())
                rows.append({
                    "id": example["id"], "n_tokens": n,
                    "loss_sum": float(losses[span].sum()), "correct": int(hits[span].sum()),
                })
                offset += length
            return rows

    return MathTuneTrainer


def make_callbacks(run_dir: Path, start_time: float, divergence_factor: float | None, logged: list[dict]):
    """The divergence guard, then the metrics.jsonl writer (so a NaN is never logged); `logged`: what a resume keeps."""
    from transformers import TrainerCallback

    class DivergenceGuard(TrainerCallback):
        """Stops at a NaN or infinite loss, or (with divergence_factor) a training loss above factor x its lowest.

        It raises in on_log, before the Trainer saves a checkpoint at that step, so every checkpoint is a good one.
        """

        def __init__(self):
            self.lowest = min((r["loss"] for r in logged if r["kind"] == "train"), default=math.inf)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            loss = logs.get("loss")
            problem = next((f"{k} became {logs[k]}" for k in ("loss", "eval_loss")
                            if k in logs and not math.isfinite(logs[k])), None)
            if not problem and loss is not None and divergence_factor and loss > divergence_factor * self.lowest:
                problem = (f"loss rose to {loss:.4g}, above train.divergence_factor={divergence_factor:g} x its "
                           f"lowest ({self.lowest:.4g})")
            if problem:
                raise TrainingDiverged(
                    f"training diverged: {problem} at step {state.global_step}; last good checkpoint: "
                    f"{last_checkpoint(run_dir) or 'none yet'}. Lower train.learning_rate (or raise "
                    "train.warmup_ratio, lower train.max_grad_norm) and start again with --overwrite or another --name."
                )
            if loss is not None:
                self.lowest = min(self.lowest, loss)

    class MetricsFile(TrainerCallback):
        """Appends each log record to metrics.jsonl, one writer only under data parallelism."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            kind = "eval" if any(k.startswith("eval_") for k in logs) else "train" if "loss" in logs else None
            if kind is None:
                return  # the end-of-training summary; train_result.json holds it
            record = {"kind": kind, "step": state.global_step, "epoch": state.epoch,
                      "elapsed_s": round(time.time() - start_time, 3)}
            record.update({k: v for k, v in logs.items() if k not in ("epoch", "step")})
            append_jsonl(run_dir / "metrics.jsonl", record)

    return [DivergenceGuard(), MetricsFile()]


def sft_config(config: Config, run_dir: Path, dtype: torch.dtype):
    from trl import SFTConfig

    t = config.train
    early_stopping = t.early_stopping_patience is not None
    metric, greater_is_better = BEST_METRIC[t.early_stopping_metric]
    return SFTConfig(
        output_dir=str(run_dir / "checkpoints"),
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float below 1 is a ratio of the training steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN (not averaged away), so the guard sees it
        eval_strategy="steps",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.eval_steps,
        save_total_limit=t.save_total_limit,
        load_best_model_at_end=early_stopping,
        metric_for_best_model=metric if early_stopping else None,
        greater_is_better=greater_is_better if early_stopping else None,
        seed=t.seed,
        data_seed=t.seed,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # Our defaults, not TRL's: checkpointing recomputes activations (slow, and unneeded at these
        # sizes), and padding-free batches spend no compute on padding.
        gradient_checkpointing=t.gradient_checkpointing,
        padding_free=True,
        max_length=None,  # long examples are dropped in tokenize(), never truncated
        completion_only_loss=True,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),  # also what makes a multi-process CPU launch use gloo
        dataloader_num_workers=0,
        save_only_model=False,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count goes on after a resume
        remove_unused_columns=True,
    )


def lora_config(config: Config):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
        bias=config.lora.bias, target_modules=config.lora.target_modules, task_type="CAUSAL_LM",
    )


def trim_metrics_after(run_dir: Path, step: int) -> None:
    """On resume, drop records logged after the checkpoint: the resumed run logs them again."""
    for name in ("metrics.jsonl", "example_losses.jsonl"):
        path = run_dir / name
        if path.exists():
            kept = [r for r in read_jsonl(path) if r["step"] <= step]
            write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole checkpoint: the Trainer writes trainer_state.json last, so a save cut short lacks it."""
    found = sorted(run_dir.glob("checkpoints/checkpoint-[0-9]*"), key=lambda c: _step_of(c.name), reverse=True)
    for checkpoint in found:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
            return checkpoint
        except (OSError, ValueError):
            print(f"warning: {checkpoint} is incomplete (its save was interrupted); skipping it", file=sys.stderr)
    return None


def train(config: Config, overwrite: bool = False, resume: bool = False, merge: bool = False) -> dict:
    """Train a LoRA adapter as the config says; returns train_result.json's content."""
    from accelerate import PartialState
    from datasets import Dataset as HFDataset

    speedups.apply_process_settings()  # before the first large tensor (mathtune's command line applies them too)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu: gloo data parallelism when launched on CPUs
    run_dir = config.run_dir
    # Bad data or a model that cannot be found fail here, before the run directory is touched.
    train_problems, validation_problems, dataset = prepare_data(config)
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    train_examples, dropped_train = tokenize(train_problems, tokenizer, config.data.max_length)
    validation_examples, dropped_val = tokenize(validation_problems, tokenizer, config.data.max_length)
    if not train_examples or not validation_examples:
        raise data_module.DataError(
            f"no example fits data.max_length={config.data.max_length} tokens on one side of the split; raise it"
        )
    if state.is_main_process:
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        import yaml

        write_text(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))
        write_json(run_dir / "environment.json", environment_info(config))
        write_data_json(run_dir, dataset, train_problems, validation_problems)
        print(f"Data: {dataset.source} ({dataset.location}); {len(train_problems)} training and "
              f"{len(validation_problems)} validation problems.", flush=True)
    state.wait_for_everyone()

    checkpoint = last_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None and (run_dir / "metrics.jsonl").exists():
        print(f"No checkpoint in {run_dir}/checkpoints yet: training starts from the beginning.", flush=True)
    if state.is_main_process:
        trim_metrics_after(run_dir, _step_of(checkpoint.name) if checkpoint else 0)
    state.wait_for_everyone()
    logged = read_jsonl(run_dir / "metrics.jsonl")  # what a resumed run goes on from

    dtype = resolve_dtype(config.model.dtype)
    model = load_model(config.model.name, config.model.dtype, config.model.revision)
    model.train()  # threads: Accelerate gives each CPU process its share of the cores

    from transformers import EarlyStoppingCallback, set_seed

    set_seed(config.train.seed)  # the LoRA weights' starting values, before SFTTrainer wraps the model

    start = time.time() - (logged[-1]["elapsed_s"] if logged else 0)  # a resumed run's clock goes on
    callbacks = make_callbacks(run_dir, start, config.train.divergence_factor, logged)
    if config.train.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.train.early_stopping_patience))
    trainer = make_trainer_class()(
        model=model,
        args=sft_config(config, run_dir, dtype),
        train_dataset=HFDataset.from_list([{k: e[k] for k in ("input_ids", "labels")} for e in train_examples]),
        eval_dataset=HFDataset.from_list([{k: e[k] for k in ("input_ids", "labels")} for e in validation_examples]),
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=callbacks,
        validation_examples=validation_examples,
        run_dir=run_dir,
        generation_problems=data_module.seeded_subset(validation_problems, config.eval.generate_subset, config.eval.seed),
        eval_config=config.eval,
        max_tokens_per_pass=config.train.max_tokens_per_pass,
        speedups_flags=config.speedups,
    )
    if checkpoint:
        trainer.restore_counters(checkpoint)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    elapsed = time.time() - start

    steps_planned = trainer.state.max_steps
    stopper = next((c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)), None)
    summary = {
        "wall_clock_s": round(elapsed, 1),
        "steps_done": trainer.state.global_step,
        "total_steps_planned": steps_planned,
        "steps_per_epoch": math.ceil(len(train_examples) / (config.train.batch_size * config.train.gradient_accumulation_steps * state.num_processes)),
        "epochs_done": trainer.state.epoch,
        "early_stopping_enabled": stopper is not None,
        "early_stopping_triggered": bool(stopper and trainer.state.global_step < steps_planned),
        "best_metric_name": trainer.args.metric_for_best_model if stopper else None,
        "best_metric": trainer.state.best_metric,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_step": _step_of(trainer.state.best_model_checkpoint),
        "kept": "best checkpoint" if stopper else "last step",
        "train_tokens": trainer._total_train_tokens,
        "train_loss_tokens": trainer.loss_tokens_total(),
        "tokens_per_s": round(trainer._total_train_tokens / elapsed, 2) if elapsed else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "eval_s": round(trainer.eval_seconds, 1),  # evaluations during training, part of train_runtime_s
        "generate_s": round(trainer.generate_seconds, 1),  # exact match at evaluations, part of eval_s
        "hardware": hardware_name(),
        "num_processes": state.num_processes,
        "dtype": str(dtype).removeprefix("torch."),
        "dropped_too_long": dropped_train + dropped_val,
        "resumed_from": str(checkpoint) if checkpoint else None,
    }
    trainer.model.get_base_model().set_attn_implementation("sdpa")  # what a saved or merged model declares
    if trainer.accelerator.is_main_process:
        save_adapter(trainer, run_dir / "adapter")
        if merge:
            merged = trainer.model.merge_and_unload()
            merged.save_pretrained(run_dir / "merged")
            tokenizer.save_pretrained(run_dir / "merged")
        write_json(run_dir / "train_result.json", summary)
    state.wait_for_everyone()
    return summary


def save_adapter(trainer, target: Path) -> None:
    """Save the adapter (the best one when early stopping kept it) under a temporary name, then rename."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    release_free_heap()  # as before a checkpoint
    trainer.model.save_pretrained(partial)
    trainer.processing_class.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)


def _step_of(checkpoint: str | None) -> int | None:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else None
