"""Gemma's RMS norm as one autograd function that keeps only its output (or input) for backward.

Gemma's norm computes in float32 whatever the model's dtype: `x.float() * rsqrt(mean(x^2) + eps) *
(1 + w)`. Autograd keeps float32 intermediates for it: on a bfloat16 Gemma 3 270M, one float32 copy
of each norm's input (six norms per layer, four of them over the hidden size), a large share of what
a training token keeps for backward, frozen weights aside. Here forward computes the same values in
the same order, and backward needs only the normalised input n and the per-row 1 / rms (four bytes
a row):

    n = x / rms;   dL/dx = (g' - n * mean(g' * n)) / rms,   g' = dL/dy * (1 + w)

n comes from the output y, which the function keeps rather than its input: n = y / (1 + w). The
norms before the attention and the MLP hand y to LoRA layers that keep it anyway, so those two keep
nothing of their own; elsewhere output and input take the same bytes. The division gives n to
within the rounding of y to the model's dtype (one part in 256 at most in bfloat16, as the products
of the next layer see it). Where 1 + w = 0 (the packaged Gemma 3 270M has such weights) y says
nothing of x: the input's columns there are kept.

The norms' weights are frozen under LoRA; a weight that does require grad gets its gradient too.
"""

from __future__ import annotations

import torch

NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")  # transformers' classes with exactly this forward


class GemmaRMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        exact = x.float()
        inverse_rms = torch.rsqrt(exact.pow(2).mean(-1, keepdim=True) + eps)
        scale = 1.0 + weight.float()
        output = (exact * inverse_rms * scale).type_as(x)
        if any(ctx.needs_input_grad[:2]):  # (not in generation: nothing to keep)
            # where 1 + w = 0 the output says nothing of the input, whose columns there are kept apart
            dark = scale.eq(0).nonzero().squeeze(1)
            ctx.save_for_backward(output, inverse_rms, weight, dark, x[..., dark])
        return output

    @staticmethod
    def backward(ctx, grad_output):
        output, inverse_rms, weight, dark, dark_input = ctx.saved_tensors
        scale = 1.0 + weight.float()
        normed = output.float() / scale.masked_fill(scale.eq(0), 1.0)
        normed[..., dark] = dark_input.float() * inverse_rms
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_output.float() * normed).reshape(-1, normed.shape[-1]).sum(0).to(weight.dtype)
        # out of place: in float32, grad_output.float() is grad_output itself, which autograd may also
        # hand to other branches (the residual connection around the norm)
        grad = grad_output.float() * scale
        grad_x = (grad - normed * (grad * normed).mean(-1, keepdim=True)).mul_(inverse_rms)
        return grad_x.to(output.dtype), grad_weight, None


def use_gemma_rms_norm(model: torch.nn.Module) -> int:
    """Route each of Gemma's RMS norms in `model` through GemmaRMSNormFunction; returns how many."""
    replaced = 0
    for module in model.modules():
        kind = type(module)
        if kind.__name__ in NORMS and kind.__module__.startswith("transformers.") and "forward" not in vars(module):
            module.forward = _norm_forward(module)
            replaced += 1
    return replaced


def _norm_forward(norm):
    def forward(x):
        return GemmaRMSNormFunction.apply(x, norm.weight, norm.eps)

    return forward
