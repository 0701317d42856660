"""mathtune: LoRA fine-tuning of open language models on GSM8K, with an honest, computed report."""

__version__ = "0.1.0"
