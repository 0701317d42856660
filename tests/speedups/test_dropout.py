"""UniformDropout keeps each input with probability 1 - p' (p rounded to 1/65,536), scales by 1 / (1 - p'), and passes
gradients the same way."""

import pytest
import torch

from mathtune.speedups.dropout import (UniformDropout, as_factor, dropped_share, keep_mask, pack_mask, unpack_mask,
                                       use_uniform_dropout)
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


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_every_word_of_a_draw_drops_with_the_same_probability(p):
    """Each int64 draw decides four entries, one per 16-bit word; a biased word (an int64 drawn with
    its top bit always 0 gives one) would show in its column."""
    torch.manual_seed(1)
    dropped = ~keep_mask(torch.Size([4 * 500_000]), p).view(-1, 4)
    share = dropped_share(p)
    tolerance = 5 * (share * (1 - share) / 500_000) ** 0.5
    for column in dropped.float().mean(dim=0).tolist():
        assert column == pytest.approx(share, abs=tolerance)


def test_the_scale_keeps_the_expectation_exact_and_p_is_rounded_to_a_word():
    assert dropped_share(0.25) == 0.25
    assert dropped_share(0.1) == 6554 / 65536
    assert dropped_share(0.9999999) == 65535 / 65536  # never every input
    torch.manual_seed(2)
    y = UniformDropout(0.1).train()(torch.ones(4_000_000))
    assert y.mean().item() == pytest.approx(1.0, abs=5 * (0.1 / 0.9 / 4_000_000) ** 0.5)


def test_masks_follow_the_seed():
    torch.manual_seed(3)
    first = keep_mask(torch.Size([7, 11]), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(torch.Size([7, 11]), 0.3), first)
    assert not torch.equal(keep_mask(torch.Size([7, 11]), 0.3), first)


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


@pytest.mark.parametrize("shape", [(3, 640), (5, 7), (1,), (0, 8), (1000, 2048)])
def test_a_mask_packs_into_an_eighth_of_the_bytes_and_back(shape):
    torch.manual_seed(0)
    keep = torch.rand(shape) > 0.3
    bits = pack_mask(keep)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-keep.numel() // 8)
    assert torch.equal(unpack_mask(bits, keep.shape), keep)


def test_every_byte_unpacks_to_its_bits():
    """The integer tricks against plain bit arithmetic, for all 256 bytes (a carry between bits would show)."""
    everything = torch.arange(256, dtype=torch.uint8)
    expected = torch.tensor([[(byte >> i) & 1 for i in range(8)] for byte in range(256)], dtype=torch.bool)
    assert torch.equal(unpack_mask(everything, torch.Size([256, 8])), expected)
    assert torch.equal(pack_mask(expected), everything)


def test_packed_bits_are_in_order():
    """Bit i of byte j is entry 8j + i: the layout is the one documented, not merely reversible."""
    keep = torch.zeros(16, dtype=torch.bool)
    keep[[0, 3, 9, 15]] = True
    assert pack_mask(keep).tolist() == [0b00001001, 0b10000010]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mask_as_a_factor_keeps_or_zeroes_each_value(dtype):
    x = torch.tensor([[1.5, -2.0, 3.25], [0.0, 7.0, -0.5]], dtype=dtype)
    keep = torch.tensor([[True, False, True], [False, True, False]])
    factor = as_factor(keep, dtype)
    assert factor.dtype == dtype and factor.tolist() == [[1, 0, 1], [0, 1, 0]]
    assert (x * factor).tolist() == [[1.5, 0.0, 3.25], [0.0, 7.0, 0.0]]
    unpacked = unpack_mask(pack_mask(keep), keep.shape)  # a view into wider integers, as backward reads it
    assert torch.equal(x * as_factor(unpacked, dtype), torch.where(keep, x, 0.0))


def test_dropout_backward_passes_the_gradient_where_kept_only():
    torch.manual_seed(0)
    dropout = UniformDropout(0.5).train()
    x = torch.ones(4, 64, requires_grad=True)
    y = dropout(x)
    y.sum().backward()
    scale = 1 / (1 - dropped_share(0.5))
    assert torch.equal(x.grad, (y != 0).float() * scale) and 0 < int((y != 0).sum()) < x.numel()
