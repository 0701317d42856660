"""Batched greedy generation for evaluation: a shared few-shot prefix and continuous batching."""

from mathtune.generation.decode import greedy_decode
from mathtune.generation.shared_prefix import UnsupportedModel

__all__ = ["greedy_decode", "UnsupportedModel"]
