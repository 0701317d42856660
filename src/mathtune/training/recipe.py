"""LoRA fine-tuning on GSM8K with TRL's SFTTrainer, writing everything the report needs into the run directory.

What is ours: the data checks and split, the template, the run directory and its files, and a
per-example validation pass (the Trainer's evaluation only returns a batch-averaged loss, and the
report's outlier analysis needs each example's loss). Checkpointing, schedulers, early stopping,
logging, progress bars and distributed launch are the Trainer's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mathtune import data as data_module
from mathtune import speedups
from mathtune.config import Config
from mathtune.hardware import resolve_dtype
from mathtune.models import load_model, load_tokenizer
from mathtune.runfiles import write_json
from mathtune.training.batches import as_dataset, tokenize_split
from mathtune.training.callbacks import make_callbacks
from mathtune.training.result import train_result
from mathtune.training.rundir import (
    METRICS, check_run_dir, last_checkpoint, prepare_run_dir, read_metrics, save_adapter, save_merged, step_of,
    trim_metrics_after, write_run_record,
)
from mathtune.training.settings import lora_config, sft_config
from mathtune.training.trackers import check_installed, place_logs
from mathtune.training.trainer import MathTuneTrainer


def train(config: Config, overwrite: bool = False, resume: bool = False, merge: bool = False) -> dict:
    """Train a LoRA adapter as the config says; returns train_result.json's content."""
    from accelerate import PartialState
    from transformers import set_seed

    speedups.apply_process_settings()  # before the first large tensor (mathtune's command line applies them too)
    state = PartialState(cpu=not torch.cuda.is_available())  # cpu: gloo data parallelism when launched on CPUs
    run_dir = config.run_dir
    # A directory that may not be used, bad data, or a model (config, tokenizer, weights) that cannot be
    # loaded fail here, before the run directory is touched: even --overwrite keeps the old run.
    check_run_dir(run_dir, overwrite=overwrite, resume=resume)
    check_installed(config.train.report_to)
    dataset = data_module.load_dataset(config.data)
    train_problems, validation_problems = data_module.run_split(config.data, dataset)
    tokenizer = load_tokenizer(config.model.name, config.model.revision)
    train_examples, validation_examples, dropped = tokenize_split(
        train_problems, validation_problems, tokenizer, config.data.max_length)
    dtype = resolve_dtype(config.model.dtype)
    model = load_model(config.model.name, config.model.dtype, config.model.revision)
    if state.is_main_process:
        prepare_run_dir(run_dir, overwrite=overwrite, resume=resume)
        write_run_record(run_dir, config, dataset, train_problems, validation_problems)
        print(data_module.describe(dataset, train_problems, validation_problems), flush=True)
    state.wait_for_everyone()
    checkpoint, logged = resume_point(run_dir, resume, state)

    model.train()  # threads: Accelerate gives each CPU process its share of the cores
    set_seed(config.train.seed)  # the LoRA weights' starting values, before SFTTrainer wraps the model
    start = time.time() - (logged[-1]["elapsed_s"] if logged else 0)  # a resumed run's clock goes on
    trainer = MathTuneTrainer(
        model=model,
        args=sft_config(config, run_dir, dtype),
        train_dataset=as_dataset(train_examples),
        eval_dataset=as_dataset(validation_examples),
        processing_class=tokenizer,
        peft_config=lora_config(config),
        callbacks=make_callbacks(run_dir, start, config.train, logged),
        validation_examples=validation_examples,
        run_dir=run_dir,
        generation_problems=data_module.seeded_subset(validation_problems, config.eval.generate_subset,
                                                      config.eval.seed),
        eval_config=config.eval,
        max_tokens_per_pass=config.train.max_tokens_per_pass,
        speedups_flags=config.speedups,
    )
    place_logs(trainer.callback_handler.callbacks, run_dir)
    if checkpoint:
        trainer.restore_counters(checkpoint)
    result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    summary = train_result(trainer, result, config.train, elapsed=time.time() - start,
                           n_train_examples=len(train_examples), num_processes=state.num_processes, dtype=dtype,
                           dropped=dropped, resumed_from=checkpoint)

    trainer.model.get_base_model().set_attn_implementation("sdpa")  # what a saved or merged model declares
    if trainer.accelerator.is_main_process:
        save_adapter(trainer, run_dir / "adapter")
        if merge:
            save_merged(trainer.model, tokenizer, run_dir / "merged")
        write_json(run_dir / "train_result.json", summary)
    state.wait_for_everyone()
    return summary


def resume_point(run_dir: Path, resume: bool, state) -> tuple[Path | None, list[dict]]:
    """(the checkpoint to go on from or None, the metrics records kept): records logged after the
    checkpoint are dropped, since the resumed run logs them again."""
    checkpoint = last_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None and (run_dir / METRICS).exists():
        print(f"No checkpoint in {run_dir}/checkpoints yet: training starts from the beginning.", flush=True)
    if state.is_main_process:
        trim_metrics_after(run_dir, step_of(checkpoint.name) if checkpoint else 0)
    state.wait_for_everyone()
    return checkpoint, read_metrics(run_dir)
