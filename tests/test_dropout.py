"""UniformDropout keeps each input with probability 1 - p, scales by 1 / (1 - p), and passes gradients the same way."""

import pytest
import torch

from mathtune.dropout import UniformDropout, use_uniform_dropout
from mathtune.models import TINY_RANDOM, load_model


def test_keeps_the_expected_share_and_scales_it():
    torch.manual_seed(0)
    dropout = UniformDropout(0.25).train()
    x = torch.ones(200_000, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.75, abs=0.005)
    assert torch.allclose(y[kept].detach(), torch.tensor(1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.75)


def test_eval_mode_and_p_zero_are_the_identity():
    x = torch.randn(10)
    assert UniformDropout(0.5).eval()(x) is x
    assert UniformDropout(0.0).train()(x) is x


def test_replaces_each_lora_dropout():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(
        r=4, lora_dropout=0.1, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"))
    assert use_uniform_dropout(model) == 3 * model.config.num_hidden_layers
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(isinstance(m, UniformDropout) for m in dropouts)
