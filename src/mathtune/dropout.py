"""LoRA dropout with the mask drawn from uniform numbers, about twice as fast as torch's on CPUs.

PEFT applies its own nn.Dropout to the input of each of a layer's seven LoRA modules; on a CPU,
torch's dropout draws its mask with bernoulli_, which took 15% of Gemma 3 270M's decoder forward
and backward in a torch.profiler trace (bench/RESULTS.md). Keeping an input where `uniform >= p`
draws the same distribution (each input kept with probability 1 - p, scaled by 1 / (1 - p)) from
the vectorised uniform generator, and the backward pass keeps the mask as booleans. The random stream differs from torch's, so runs are reproducible given the
seed but not bit-identical to PEFT's own dropout.
"""

from __future__ import annotations

import torch


class _KeepAndScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep, scale):
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return x * keep * scale

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return grad * keep * ctx.scale, None, None


class UniformDropout(torch.nn.Dropout):
    """nn.Dropout with the mask drawn as `uniform >= p`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.rand_like(x) >= self.p
        return _KeepAndScale.apply(x, keep, 1 / (1 - self.p))


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
