"""The LoRA branch of a linear layer as one autograd function: fewer passes over memory, fewer saved tensors.

PEFT computes a LoRA layer as `base(x) + lora_B(lora_A(dropout(x))) * scaling`, in separate
operations: the [tokens, out] product of lora_B is written, scaled into a second [tokens, out]
tensor and added into a third, and backward goes through each again; on a CPU, where such passes
are bound by memory bandwidth, doing without them makes the decoder's forward and backward faster.
Autograd also keeps each projection's own dropped copy of its input for lora_A's gradient, although
q, k and v (and gate and up) read the same input.

Here the branch is one function: the rank-r product is added into the base output in place
(`addmm_`, scaled on the way), and backward recomputes the dropped input from the saved input and
keep-mask (as bits), so the three projections that share an input save it once. The products are the
same as PEFT's, so the result is unchanged up to the order of floating-point sums. Used where PEFT's
own forward would run plain LoRA on one adapter (no DoRA or other variant, not merged, no
per-example adapters); anything else goes to PEFT's forward unchanged.
"""

from __future__ import annotations

import torch

from mathtune.speedups.compact_weights import base_output
from mathtune.speedups.dropout import UniformDropout, as_factor, dropped_share, keep_mask, pack_mask, unpack_mask


class LoraBranch(torch.autograd.Function):
    """result += scaling * (dropout(x) @ A.T) @ B.T, in place; x [..., in], result [..., out]."""

    @staticmethod
    def forward(ctx, x, result, lora_a, lora_b, scaling, drop_p):
        kept, keep_scale, low_rank = add_lora(x.reshape(-1, x.shape[-1]), result.view(-1, result.shape[-1]),
                                              lora_a, lora_b, scaling, drop_p)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, kept, low_rank, lora_a, lora_b)
        ctx.scaling, ctx.keep_scale = scaling, keep_scale
        return result

    @staticmethod
    def backward(ctx, grad_result):
        x, kept, low_rank, lora_a, lora_b = ctx.saved_tensors
        grad_x, grad_a, grad_b = lora_grads(
            grad_result.reshape(-1, grad_result.shape[-1]), x.reshape(-1, x.shape[-1]), kept, ctx.keep_scale,
            low_rank, lora_a, lora_b, ctx.scaling, ctx.needs_input_grad[0], ctx.needs_input_grad[2],
            ctx.needs_input_grad[3])
        return None if grad_x is None else grad_x.view_as(x), grad_result, grad_a, grad_b, None, None


def add_lora(flat_x, flat_result, lora_a, lora_b, scaling, drop_p):
    """flat_result += scaling * (dropout(flat_x) @ A.T) @ B.T in place; returns (kept, keep_scale, low_rank) for
    lora_grads, kept being the keep-mask as bits (mathtune.speedups.dropout.pack_mask), or None without dropout."""
    keep, keep_scale = None, 1.0
    if drop_p > 0:
        keep = keep_mask(flat_x.shape, drop_p, flat_x.device)
        keep_scale = 1 / (1 - dropped_share(drop_p))
    # dropout(x) @ A.T = keep_scale * ((x * keep) @ A.T): the scale goes on the [tokens, r] side
    low_rank = (flat_x if keep is None else flat_x * as_factor(keep, flat_x.dtype)) @ lora_a.t()  # [tokens, r]
    if keep is not None:
        low_rank.mul_(keep_scale)
    flat_result.addmm_(low_rank, lora_b.t(), alpha=scaling)
    return None if keep is None else pack_mask(keep), keep_scale, low_rank


def lora_grads(flat_grad, flat_x, kept, keep_scale, low_rank, lora_a, lora_b, scaling, want_x, want_a, want_b):
    """The LoRA branch's gradients for x (its own share), A and B, each None where not wanted."""
    factor = None if kept is None else as_factor(unpack_mask(kept, flat_x.shape), flat_x.dtype)  # once, used twice
    grad_low_rank = (flat_grad @ lora_b).mul_(scaling)  # [tokens, r]
    grad_a = grad_b = grad_x = None
    if want_b:
        # as (r x tokens) @ (tokens x out), transposed: the skinny-output layout is much slower on CPUs
        grad_b = (low_rank.t() @ flat_grad).t().mul_(scaling)
    if want_a:
        grad_a = (grad_low_rank.t() @ (flat_x if factor is None else flat_x * factor)).mul_(keep_scale)
    if want_x:
        grad_x = (grad_low_rank * keep_scale) @ lora_a
        if factor is not None:
            grad_x.mul_(factor)
    return grad_x, grad_a, grad_b


def _plain_lora_adapter(layer, args, kwargs) -> str | None:
    """The one adapter PEFT's forward would apply as plain LoRA, or None where it would do anything else."""
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if (args or kwargs or layer.disable_adapters or layer.merged or len(active) != 1
            or active[0] in getattr(layer, "lora_variant", {})):
        return None
    name = active[0]
    dropout = layer.lora_dropout[name]
    if (not isinstance(dropout, (UniformDropout, torch.nn.Identity))
            or layer.lora_A[name].weight.dtype != layer.lora_B[name].weight.dtype):
        return None
    return name


def plain_lora(layer, x: torch.Tensor, args=(), kwargs=None) -> tuple[str, float] | None:
    """(adapter, dropout probability) where `layer` would apply plain LoRA to x; None where PEFT's forward must run."""
    name = _plain_lora_adapter(layer, args, kwargs or {})
    if name is None or x.dtype != layer.base_layer.weight.dtype:
        return None
    # PEFT keeps LoRA weights in float32 beside 16-bit base weights; its branch then runs in x's dtype
    # only under autocast to that dtype (as the Trainer's bf16 does), so only then is it fused here
    device = x.device.type
    autocast_to_x = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == x.dtype
    if x.dtype != layer.lora_A[name].weight.dtype and not autocast_to_x:
        return None
    dropout = layer.lora_dropout[name]
    return name, dropout.p if isinstance(dropout, UniformDropout) and dropout.training else 0.0


def lora_weights(layer, name: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The adapter's A and B in the branch's dtype: a cast autograd follows (as autocast's) where theirs differs."""
    return layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype)


def _fused_forward(layer, peft_forward):
    def forward(x, *args, **kwargs):
        plain = plain_lora(layer, x, args, kwargs)
        if plain is None:
            return peft_forward(x, *args, **kwargs)
        name, drop_p = plain
        return LoraBranch.apply(x, base_output(layer.base_layer, x), *lora_weights(layer, name, x.dtype),
                                layer.scaling[name], drop_p)

    return forward


def use_fused_lora(model: torch.nn.Module) -> int:
    """Route each PEFT LoRA linear layer through LoraBranch where it runs plain LoRA; returns how many.

    Call after mathtune.speedups.dropout.use_uniform_dropout: the branch takes only layers whose dropout is
    UniformDropout (or none), and draws its masks the same way.
    """
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear and "forward" not in vars(module):
            module.forward = _fused_forward(module, module.forward)
            fused += 1
    return fused
