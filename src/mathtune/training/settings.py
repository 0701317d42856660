"""What the Trainer and PEFT are given: TRL's SFTConfig and the LoRA config, from a mathtune Config."""

from __future__ import annotations

from pathlib import Path

import torch

from mathtune.config import Config

# train.early_stopping_metric -> (the Trainer's metric_for_best_model, greater_is_better)
BEST_METRIC = {"eval_loss": ("eval_loss", False), "eval_exact_match": ("eval_exact_match_strict", True)}


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
        max_length=None,  # long examples are dropped in batches.tokenize, never truncated
        completion_only_loss=True,
        report_to=list(t.report_to) or "none",  # trackers.py checks the names and puts TensorBoard's files
        run_name=config.name,  # what the trackers call the run
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
