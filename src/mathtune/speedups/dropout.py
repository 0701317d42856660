"""LoRA dropout with masks drawn 64 random bits at a time: a fraction of torch's mask cost on CPUs.

PEFT applies its own nn.Dropout to the input of each of a layer's seven LoRA modules, so a training
step draws a mask entry for every value of every LoRA module's input. On a CPU torch's dropout draws
them with bernoulli_, one call of the serial generator per entry, which was the largest cost of a
profiled step after the matrix products. Here each int64 drawn over its full range gives four 16-bit
words, and an input is kept where its word is at least a threshold: each input is kept independently
with probability 1 - p', p' being p rounded to a multiple of 1/65,536 (0.1 becomes 0.100006), and
kept inputs are scaled by 1 / (1 - p'), so the expectation is exact. The backward pass keeps the
mask as bits, eight to a byte: as booleans the masks were a large share of what a bfloat16 step
keeps per token (packing takes four integer passes over the booleans' bytes, unpacking six).
The random stream differs from torch's, so runs are reproducible given the seed but not
bit-identical to PEFT's own dropout. On GPUs torch's dropout is one fused kernel; mathtune uses
this on CPUs only.
"""

from __future__ import annotations

import math

import torch

WORD_VALUES = 1 << 16  # each mask entry is decided by one 16-bit word
WORDS_PER_DRAW = 4  # of each int64 draw


def _dropped_words(p: float) -> int:
    """How many of the 65,536 word values drop an input: p rounded, and below all of them."""
    return min(round(p * WORD_VALUES), WORD_VALUES - 1)


def dropped_share(p: float) -> float:
    """The dropout probability actually used: p rounded to a multiple of 1/65,536."""
    return _dropped_words(p) / WORD_VALUES


def keep_mask(shape: torch.Size, p: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Booleans, each True independently with probability 1 - dropped_share(p)."""
    n = math.prod(shape)
    # random_(min, None) draws all 64 bits; random_() would leave the top bit 0, and so bias the top word
    draws = torch.empty(-(-n // WORDS_PER_DRAW), dtype=torch.int64, device=device).random_(-(2**63), None)
    words = draws.view(torch.int16)
    threshold = _dropped_words(p) - WORD_VALUES // 2  # int16 words run from -32,768 to 32,767
    return (words >= threshold).reshape(-1)[:n].view(shape)


# The eight bytes of an int64 that are each 0 or 1, times GATHER: bit i of the top byte is byte i.
# (Torch has no bit-packing operation; these integer products are one pass over the mask each.)
GATHER = 0x0102040810204080
# A byte times REPEAT is the byte in each of eight bytes; PICK keeps bit i in byte i; adding RAISE carries
# any bit of a byte into its top bit (never into the next byte), which shifts down to its bottom bit.
REPEAT, PICK, RAISE, ONES = 0x0101010101010101, 0x8040201008040201 - 2**64, 0x7F7F7F7F7F7F7F7F, 0x0101010101010101


def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """A boolean mask as bits, eight to a uint8 (the last byte padded with zeros)."""
    flat = keep.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    gathered = (flat.view(torch.uint8).view(torch.int64) * GATHER).bitwise_right_shift_(56)
    return gathered.bitwise_and_(0xFF).to(torch.uint8)  # the shift brings the sign bit down: cleared before the cast


def unpack_mask(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """pack_mask's booleans back, in `shape`."""
    spread = bits.to(torch.int64).mul_(REPEAT).bitwise_and_(PICK).add_(RAISE).bitwise_right_shift_(7).bitwise_and_(ONES)
    return spread.view(torch.bool)[: math.prod(shape)].view(shape)


def as_factor(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as 1s and 0s of `dtype`, to multiply by: x * as_factor(keep) is x where kept, else 0.

    Read as bytes and converted, not given to `torch.where` or multiplied as booleans: on CPUs both of
    those take a slow path (several times one conversion pass plus one product; bench/RESULTS.md). The
    values are torch.where(keep, x, 0)'s wherever x is finite (a dropped negative value gives -0.0)."""
    return keep.view(torch.uint8).to(dtype)


class _KeepAndScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(pack_mask(keep))
        ctx.scale = scale
        return x.mul(as_factor(keep, x.dtype)).mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (bits,) = ctx.saved_tensors
        return grad.mul(as_factor(unpack_mask(bits, grad.shape), grad.dtype)).mul_(ctx.scale), None, None


class UniformDropout(torch.nn.Dropout):
    """nn.Dropout with the mask drawn as 16-bit words against a threshold (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = keep_mask(x.shape, self.p, x.device)
        return _KeepAndScale.apply(x, keep, 1 / (1 - dropped_share(self.p)))


def use_uniform_dropout(model: torch.nn.Module) -> int:
    """Replace each LoRA dropout (PEFT's `lora_dropout` modules) by UniformDropout; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, torch.nn.ModuleDict):
            continue
        for name, dropout in dropouts.items():
            if type(dropout) is torch.nn.Dropout:
                dropouts[name] = UniformDropout(dropout.p)
                replaced += 1
    return replaced
