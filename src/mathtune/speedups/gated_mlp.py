"""The gated MLP as one autograd function that keeps its input for backward, not gate and up.

Gemma's MLP computes down_proj(gelu(gate_proj(x)) * up_proj(x)). Autograd keeps gate (for gelu's
backward), gelu(gate) and up (for the product's): three [tokens, intermediate] tensors per layer, a
large part of everything a training step of Gemma 3 270M keeps; with PEFT, down_proj's LoRA branch
keeps its input, the product, a fourth.

Where the three projections are frozen linear maps, each with a plain LoRA branch
(mathtune.speedups.fused_lora) or none, GatedLoraMLP keeps only x (which the gate and up branches keep
anyway), the branches' keep-masks (as bits) and their [tokens, r] products; backward recomputes
gate and up with the same operations as forward (so the same values), then the product. That is
two more frozen products per layer in backward (a quarter more of the decoder's frozen-product
work) for two [tokens, intermediate] tensors fewer.

Otherwise GatedProduct computes act(gate) * up keeping gate and up only (backward recomputes
act(gate), one elementwise pass; the same operations as autograd's, so bit for bit the same
gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mathtune.speedups.compact_weights import dense, frozen_weight
from mathtune.speedups.fused_lora import add_lora, lora_grads, lora_weights, plain_lora

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


def use_gated_mlp(model: torch.nn.Module) -> int:
    """Route each known gated MLP with a handled activation through GatedLoraMLP or GatedProduct; returns how many.

    Call after mathtune.speedups.dropout.use_uniform_dropout: an MLP with a LoRA branch on PEFT's own dropout
    goes through GatedProduct, its branches through PEFT's forward.
    """
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


class GatedLoraMLP(torch.autograd.Function):
    """down(act(gate(x)) * up(x)) for frozen linear maps, each with or without a plain LoRA branch.

    Keeps x, the LoRA branches' keep-masks and [tokens, r] products, not gate and up: backward
    recomputes gate and up from them (the same operations as forward, so the same values), then the
    product. `projections` holds the frozen maps (weights or their compact forms, mathtune.speedups.compact_weights,
    rebuilt for each product) and the branches' settings; the LoRA weights are arguments, None where
    a map has no branch.
    """

    @staticmethod
    def forward(ctx, x, gate_a, gate_b, up_a, up_b, down_a, down_b, projections, activation):
        gate_map, up_map, down_map = projections
        flat_x = x.reshape(-1, x.shape[-1])
        gate, gate_branch = _project(flat_x, gate_map, gate_a, gate_b)  # gate's dropout mask first, as the original
        up, up_branch = _project(flat_x, up_map, up_a, up_b)
        product = _act(gate, activation).mul_(up)
        result, down_branch = _project(product, down_map, down_a, down_b)
        branches = (gate_branch, up_branch, down_branch)
        ctx.save_for_backward(x, gate_a, gate_b, up_a, up_b, down_a, down_b,
                              *(tensor for kept, _, low_rank in branches for tensor in (kept, low_rank)))
        ctx.keep_scales = [keep_scale for _, keep_scale, _ in branches]
        ctx.projections, ctx.activation = projections, activation
        return result.view(*x.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx, grad_result):
        x, gate_a, gate_b, up_a, up_b, down_a, down_b, *kept = ctx.saved_tensors
        gate_branch, up_branch, down_branch = ((kept[2 * i], scale, kept[2 * i + 1])
                                               for i, scale in enumerate(ctx.keep_scales))
        gate_map, up_map, down_map = ctx.projections
        flat_x = x.reshape(-1, x.shape[-1])
        gate = _reproject(flat_x, gate_map, gate_branch, gate_b)
        up = _reproject(flat_x, up_map, up_branch, up_b)
        activated = _act(gate, ctx.activation)
        product = activated * up
        wants = ctx.needs_input_grad
        flat_grad = grad_result.reshape(-1, grad_result.shape[-1])
        grad_product, grad_down_a, grad_down_b = _map_grads(flat_grad, product, down_map, down_branch, down_a, down_b,
                                                            True, wants[5], wants[6])
        del product
        grad_gate, grad_up = _product_grads(grad_product, gate, up, activated, ctx.activation)
        del gate, up, activated, grad_product
        grad_x, grad_gate_a, grad_gate_b = _map_grads(grad_gate, flat_x, gate_map, gate_branch, gate_a, gate_b,
                                                      wants[0], wants[1], wants[2])
        grad_x_up, grad_up_a, grad_up_b = _map_grads(grad_up, flat_x, up_map, up_branch, up_a, up_b,
                                                     wants[0], wants[3], wants[4])
        if grad_x is not None:
            grad_x = grad_x.add_(grad_x_up).view_as(x)
        return grad_x, grad_gate_a, grad_gate_b, grad_up_a, grad_up_b, grad_down_a, grad_down_b, None, None


@dataclass(frozen=True)
class FrozenMap:
    """A frozen linear map as a product reads it (its weight or compact form, and bias), and its LoRA branch's
    scaling and dropout probability (unused where it has none)."""

    weight: object
    bias: torch.Tensor | None
    scaling: float = 0.0
    drop_p: float = 0.0


def _project(flat_x, frozen: FrozenMap, lora_a, lora_b):
    """x @ W.T + b, plus the LoRA branch where there is one (fused_lora.add_lora); and the branch's (kept, keep_scale, low_rank)."""
    result = F.linear(flat_x, dense(frozen.weight), frozen.bias)
    if lora_a is None:
        return result, (None, 1.0, None)
    return result, add_lora(flat_x, result, lora_a, lora_b, frozen.scaling, frozen.drop_p)


def _reproject(flat_x, frozen: FrozenMap, branch, lora_b):
    """_project's result again, from the branch's kept [tokens, r] product (no new dropout mask)."""
    result = F.linear(flat_x, dense(frozen.weight), frozen.bias)
    low_rank = branch[2]
    return result if low_rank is None else result.addmm_(low_rank, lora_b.t(), alpha=frozen.scaling)


def _map_grads(flat_grad, flat_x, frozen: FrozenMap, branch, lora_a, lora_b, want_x, want_a, want_b):
    """Gradients for x (the frozen map's share plus the branch's), A and B."""
    kept, keep_scale, low_rank = branch
    grad_x = grad_a = grad_b = None
    if lora_a is not None:
        grad_x, grad_a, grad_b = lora_grads(flat_grad, flat_x, kept, keep_scale, low_rank, lora_a, lora_b,
                                            frozen.scaling, want_x, want_a, want_b)
    if want_x:
        frozen_share = flat_grad @ dense(frozen.weight)
        grad_x = frozen_share if grad_x is None else frozen_share.add_(grad_x)
    return grad_x, grad_a, grad_b


def _frozen_map(layer, x: torch.Tensor):
    """(FrozenMap, lora_A, lora_B) where `layer` is a frozen linear map applied to x, with no LoRA branch
    (None, None) or a plain one (mathtune.speedups.fused_lora); None where its own forward must run."""
    if hasattr(layer, "lora_A"):
        plain = plain_lora(layer, x)
        base = layer.base_layer
        if plain is None or type(base) is not torch.nn.Linear or _trained(base):
            return None
        name, drop_p = plain
        return FrozenMap(frozen_weight(base), base.bias, layer.scaling[name], drop_p), *lora_weights(layer, name, x.dtype)
    if type(layer) is not torch.nn.Linear or _trained(layer) or layer.weight.dtype != x.dtype:
        return None
    return FrozenMap(layer.weight, layer.bias), None, None


def _trained(layer: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in layer.parameters())


def _gated_forward(mlp, activation: str):
    def forward(x):
        maps = [_frozen_map(layer, x) for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
        if any(m is None for m in maps):
            return mlp.down_proj(GatedProduct.apply(mlp.gate_proj(x), mlp.up_proj(x), activation))
        (gate_map, gate_a, gate_b), (up_map, up_a, up_b), (down_map, down_a, down_b) = maps
        return GatedLoraMLP.apply(x, gate_a, gate_b, up_a, up_b, down_a, down_b, (gate_map, up_map, down_map),
                                  activation)

    return forward
