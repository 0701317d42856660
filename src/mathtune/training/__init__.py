"""LoRA fine-tuning: the recipe `train()`, the trainer and its callbacks, and the run directory's files."""
