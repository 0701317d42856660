"""The gated MLP's act(gate) * up as one autograd function that keeps two tensors for backward, not three.

Gemma's MLP computes down_proj(gelu(gate_proj(x)) * up_proj(x)). Autograd keeps gate (for gelu's
backward), gelu(gate) and up (for the product's) until the backward pass: three [tokens, 2048]
float32 tensors per layer, a third of everything a training step of Gemma 3 270M keeps (432 of
1,307 KiB per token, bench/RESULTS.md). Here backward recomputes gelu(gate) from gate, one
elementwise pass, so only gate and up are kept; the operations are the same as autograd's, in the
same order, so the gradients are bit for bit the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLPS = {"GemmaMLP", "Gemma2MLP", "Gemma3MLP", "LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}


class GatedProduct(torch.autograd.Function):
    """act(gate) * up, for act GELU (exact or tanh approximation) or SiLU."""

    @staticmethod
    def forward(ctx, gate, up, activation):
        ctx.save_for_backward(gate, up)
        ctx.activation = activation
        return _act(gate, activation).mul_(up)

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_up = _act(gate, ctx.activation).mul_(grad)
        grad_act = grad * up
        if ctx.activation == "silu":
            grad_gate = torch.ops.aten.silu_backward(grad_act, gate)
        else:
            grad_gate = torch.ops.aten.gelu_backward(grad_act, gate, approximate=ctx.activation)
        return grad_gate, grad_up, None


def _act(gate: torch.Tensor, activation: str) -> torch.Tensor:
    return F.silu(gate) if activation == "silu" else F.gelu(gate, approximate=activation)


def activation_name(act_fn: torch.nn.Module) -> str | None:
    """"tanh" or "none" (GELU's approximate argument) or "silu" for the activations handled; else None."""
    from transformers.activations import GELUActivation, GELUTanh, SiLUActivation

    if type(act_fn) is GELUTanh and getattr(act_fn.act, "keywords", {}).get("approximate") == "tanh":
        return "tanh"  # the C implementation, not the python formula GELUTanh can also be built with
    if type(act_fn) is GELUActivation and act_fn.act is F.gelu:
        return "none"
    if type(act_fn) in (SiLUActivation, torch.nn.SiLU):
        return "silu"
    return None


def use_gated_product(model: torch.nn.Module) -> int:
    """Route each known gated MLP with a handled activation through GatedProduct; returns how many."""
    replaced = 0
    for module in model.modules():
        if type(module).__name__ not in GATED_MLPS or "forward" in vars(module):
            continue
        activation = activation_name(module.act_fn)
        if activation is None:
            continue
        module.forward = _gated_forward(module, activation)
        replaced += 1
    return replaced


def _gated_forward(mlp, activation: str):
    def forward(x):
        # gate_proj before up_proj, as the original: their LoRA dropout masks come from the generator in that order
        gate = mlp.gate_proj(x)
        return mlp.down_proj(GatedProduct.apply(gate, mlp.up_proj(x), activation))

    return forward
