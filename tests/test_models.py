"""Model-loading helpers: the early model check and the attention backend chosen on CUDA."""

import pytest
import torch

from mathtune.models import TINY_RANDOM, ModelError, check_model, prefer_shape_agnostic_attention


def test_check_model_passes_a_model_and_names_what_to_do_for_a_missing_one(tmp_path):
    check_model(TINY_RANDOM)
    with pytest.raises(ModelError, match="has no config.json"):
        check_model(str(tmp_path))


def test_on_cuda_attention_never_uses_cudnn(monkeypatch):
    """cuDNN's SDPA builds a plan per new sequence length; on CUDA mathtune turns it off."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        prefer_shape_agnostic_attention()
        assert torch.backends.cuda.cudnn_sdp_enabled()  # nothing to change without CUDA
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        prefer_shape_agnostic_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)
