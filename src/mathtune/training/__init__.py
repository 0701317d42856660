"""LoRA fine-tuning, read top to bottom from recipe.train().

recipe: the steps of a training run. trainer: MathTuneTrainer (TRL's SFTTrainer with a per-example
validation pass and exact match). callbacks: the divergence guard and the metrics writer.
batches: tokenized examples and packed rows cut into passes. settings: the Trainer's and LoRA's
configs. rundir: the run directory's files. result: train_result.json.
"""

from mathtune.training.callbacks import TrainingDiverged
from mathtune.training.recipe import train
from mathtune.training.rundir import RunDirError, check_run_dir, prepare_run_dir, write_run_record

__all__ = ["RunDirError", "TrainingDiverged", "check_run_dir", "prepare_run_dir", "train", "write_run_record"]
