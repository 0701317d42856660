"""MathTuneTrainer: TRL's SFTTrainer plus a per-example validation pass and exact match during training.

The Trainer's own evaluation returns only a batch-averaged loss; the report's outlier analysis
needs each example's loss, and the loss alone does not say whether answers come out right, so
evaluation here writes each validation example's loss and, when due, scores greedy answers to a
validation subset. Training steps may be cut into passes (train.max_tokens_per_pass), and the
speedups are applied to the wrapped model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from accelerate.utils import gather_object
from trl import SFTTrainer

from mathtune import evaluate as evaluation
from mathtune import speedups
from mathtune.data import format_prompt
from mathtune.model_cache import float32_original
from mathtune.speedups.memory import release_free_heap
from mathtune.stopping import STOP_RULES
from mathtune.training.batches import split_packed_row
from mathtune.training.rundir import append_example_losses, read_counters, write_counters


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
        self.speedups_flags = speedups_flags
        self.loss_head = "loss_head" in self.speedups
        # What loading left free in the C heap (the tokenizer's parse, the weight checks) goes back now:
        # kept, its holes and the heap the steps add on top would both stay resident through training.
        release_free_heap()

    # --- training steps -------------------------------------------------------------------------

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

    # --- counters -------------------------------------------------------------------------------

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

        The heap's free pages go back first: saving the tokenizer builds its files in memory, which
        would otherwise come on top of all the heap the steps left resident.
        """
        release_free_heap()
        counters = {"loss_tokens": self.loss_tokens_total(), "train_tokens": self._total_train_tokens,
                    "generate_s": self.generate_seconds, "eval_s": self.eval_seconds}
        if self.args.should_save:
            write_counters(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}", counters)
        super()._save_checkpoint(model, trial)

    def restore_counters(self, checkpoint: Path) -> None:
        """Token counts and generation time go on from a checkpoint (each process's share sums to the total)."""
        saved = read_counters(checkpoint)
        self.loss_tokens_seen = saved.get("loss_tokens", 0) if self.accelerator.is_main_process else 0
        self._total_train_tokens = saved.get("train_tokens", 0)
        self.generate_seconds = saved.get("generate_s", 0.0)
        self.eval_seconds = saved.get("eval_s", 0.0)

    # --- evaluation -----------------------------------------------------------------------------

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Token-weighted validation loss and accuracy, and each example's own, in one pass; exact match when due."""
        started = time.perf_counter()
        was_training = self.model.training
        self.model.eval()
        rows = self._validation_rows()
        n_tokens = sum(r["n_tokens"] for r in rows)
        metrics = {
            f"{metric_key_prefix}_loss": sum(r["loss_sum"] for r in rows) / max(n_tokens, 1),
            f"{metric_key_prefix}_mean_token_accuracy": sum(r["correct"] for r in rows) / max(n_tokens, 1),
        }
        if self.accelerator.is_main_process:
            self._write_example_losses(rows)
        every = self.eval_config.generate_every
        if every and (self.state.global_step // self.args.eval_steps) % every == 0:  # by step: resume-proof
            metrics.update(self._exact_match(metric_key_prefix))
        self.eval_seconds += time.perf_counter() - started
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if was_training:
            self.model.train()
        return metrics

    def _validation_rows(self) -> list[dict]:
        """Each validation example's loss sum, correct tokens and token count; each process does its share."""
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = self.validation_examples[rank::world]
        rows = []
        batch_size = self.args.per_device_eval_batch_size
        with torch.no_grad():
            for start in range(0, len(mine), batch_size):
                rows.extend(self._example_stats(mine[start : start + batch_size]))
        if world > 1:  # gather_object, not gather_for_metrics: the latter trims "duplicates" at epoch ends
            rows = gather_object(rows)
        return rows

    def _write_example_losses(self, rows: list[dict]) -> None:
        """example_losses.jsonl: this evaluation's rows, in the validation examples' order."""
        step = self.state.global_step
        order = {e["id"]: i for i, e in enumerate(self.validation_examples)}
        append_example_losses(self.run_dir, [{
            "step": step, "id": r["id"],
            "loss": r["loss_sum"] / r["n_tokens"], "token_accuracy": r["correct"] / r["n_tokens"],
            "n_tokens": r["n_tokens"],
        } for r in sorted(rows, key=lambda r: order[r["id"]])])

    def _exact_match(self, prefix: str) -> dict:
        """Greedy zero-shot answers to the generation subset, stopped and scored as `mathtune eval` does
        under eval.protocol.

        Called in eval mode, where the decoding loop's use_cache=True holds although the Trainer
        turns the model's cache off for training. Each process answers its share of the problems.
        """
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        mine = self.generation_problems[rank::world]
        protocol = self.eval_config.protocol
        start = time.perf_counter()
        with speedups.for_generation(self.model, self.speedups_flags):  # on CPUs: LoRA merged, as eval runs it
            answers = evaluation.generate_answers(
                self.model, self.processing_class, [format_prompt(p["question"]) for p in mine],
                self.eval_config.max_new_tokens, self.eval_config.batch_size, progress=False,
                stop_rule=STOP_RULES[protocol], speedups_flags=self.speedups_flags,
            )
            scored = [evaluation.score_record(mine[i], text, n_tokens, protocol) for i, text, n_tokens in answers]
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
