"""The gated MLP's act(gate) * up as one autograd function that keeps two tensors for backward, not three.

Gemma's MLP computes down_proj(gelu(gate_proj(x)) * up_proj(x)). Autograd keeps gate (for gelu's
backward), gelu(gate) and up (for the product's) until the backward pass: three [tokens, 2048]
float32 tensors per layer, a third of everything a training step of Gemma 3 270M keeps (432 of
1,307 KiB per token, bench/RESULTS.md). Here backward recomputes gelu(gate) from gate, one
elementwise pass, so only gate and up are kept; the operations are the same as autograd's, in the
same order, so the gradients are bit for bit the same.

Where down_proj is a plain LoRA layer (mathtune.fused_lora), its LoRA branch would keep its input
act(gate) * up for lora_A's gradient: another [tokens, 2048] tensor per layer. GatedLoraDown
computes the product, down_proj's frozen product and its LoRA branch in one function and recomputes
the product in backward from gate and up, which it keeps anyway: two [tokens, 2048] tensors per
layer kept, where autograd with PEFT keeps four (gate, act(gate), up and the product).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mathtune.compact_weights import dense, frozen_weight
from mathtune.fused_lora import add_lora, lora_grads, lora_weights, plain_lora

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
        return *_product_grads(grad, gate, up, _act(gate, ctx.activation), ctx.activation), None


def _product_grads(grad, gate, up, activated, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of act(gate) * up for gate and up; `activated` is act(gate), and is overwritten."""
    grad_up = activated.mul_(grad)
    grad_act = grad * up
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad_act, gate), grad_up
    return torch.ops.aten.gelu_backward(grad_act, gate, approximate=activation), grad_up


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


class GatedLoraDown(torch.autograd.Function):
    """down(act(gate) * up), down being a frozen linear map plus a LoRA branch (as fused_lora.LoraBranch).

    `weight` is the frozen map's weight or its compact form (mathtune.compact_weights), rebuilt for
    each product.
    """

    @staticmethod
    def forward(ctx, gate, up, activation, weight, bias, lora_a, lora_b, scaling, drop_p):
        product = _act(gate, activation).mul_(up)
        result = F.linear(product, dense(weight), bias)
        keep, keep_scale, low_rank = add_lora(product.view(-1, product.shape[-1]), result.view(-1, result.shape[-1]),
                                              lora_a, lora_b, scaling, drop_p)
        ctx.save_for_backward(gate, up, keep, low_rank, lora_a, lora_b)
        ctx.weight = weight  # frozen (a leaf or its compact form): nothing for autograd to track
        ctx.activation, ctx.scaling, ctx.keep_scale = activation, scaling, keep_scale
        return result

    @staticmethod
    def backward(ctx, grad_result):
        gate, up, keep, low_rank, lora_a, lora_b = ctx.saved_tensors
        activated = _act(gate, ctx.activation)
        product = activated * up  # recomputed: not kept since forward
        flat_grad = grad_result.reshape(-1, grad_result.shape[-1])
        grad_lora, grad_a, grad_b = lora_grads(flat_grad, product.view(-1, product.shape[-1]), keep, ctx.keep_scale,
                                               low_rank, lora_a, lora_b, ctx.scaling, True,
                                               ctx.needs_input_grad[5], ctx.needs_input_grad[6])
        grad_product = (flat_grad @ dense(ctx.weight)).add_(grad_lora).view_as(up)  # the frozen map's share plus LoRA's
        grad_gate, grad_up = _product_grads(grad_product, gate, up, activated, ctx.activation)
        return grad_gate, grad_up, None, None, None, grad_a, grad_b, None, None


def _gated_forward(mlp, activation: str):
    def forward(x):
        # gate_proj before up_proj, as the original: their LoRA dropout masks come from the generator in that order
        gate = mlp.gate_proj(x)
        up = mlp.up_proj(x)
        down = mlp.down_proj
        plain = plain_lora(down, gate) if hasattr(down, "lora_A") else None
        base = getattr(down, "base_layer", None)
        frozen = base is not None and not any(p.requires_grad for p in base.parameters())
        if plain is None or type(base) is not torch.nn.Linear or not frozen:
            return down(GatedProduct.apply(gate, up, activation))
        name, drop_p = plain
        return GatedLoraDown.apply(gate, up, activation, frozen_weight(base), base.bias,
                                   *lora_weights(down, name, gate.dtype), down.scaling[name], drop_p)

    return forward
