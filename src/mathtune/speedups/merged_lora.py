"""Generation during training from LoRA weights merged into temporary copies.

Exact match during training decodes a few validation problems with the adapter as it stands. A
step of a few rows is bound by reading the weights and by per-layer overhead, and unmerged LoRA
adds to each layer two small products, casts between the adapter's and the model's dtype and a
dropout call. `mathtune eval` runs a tuned model merged (PEFT's merge_and_unload), one product a
layer. Inside `merged_lora(model)` each plain LoRA linear layer does the same: its weight is
W + delta computed as PEFT's merge computes it (`weight += get_delta_weight(adapter)`), so in-training
generation runs the products the final evaluation of that adapter runs, value for value.

PEFT's own merge_adapter changes the frozen weight in place: that would write into a memory-mapped
checkpoint, and in 16 bits unmerging does not give the weight back. Here the merged weights are new
tensors that live for the decoding only, and the layers' forwards are restored after it. The gated
MLP's patched forward (mathtune.speedups.gated_mlp) calls the frozen products itself, so inside the
context the MLP runs its class forward, through the merged layers.

The copies take as much memory as the weights they merge (in the model's dtype), for as long as the
decoding lasts: that is why this runs on CPUs only, and why `speedups.merged_lora: false` turns it off
where that memory matters more than the time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from mathtune.speedups.compact_weights import dense, frozen_weight
from mathtune.speedups.gated_mlp import GATED_MLPS


def merged_weight(layer, adapter: str) -> torch.Tensor:
    """A new tensor holding the layer's base weight with the adapter merged, as PEFT's merge writes it."""
    base = layer.get_base_layer()
    weight = dense(frozen_weight(base))
    merged = weight.clone() if weight is base.weight else weight  # never write into the base weight
    merged += layer.get_delta_weight(adapter)
    return merged


def mergeable(module) -> str | None:
    """The adapter to merge into a PEFT LoRA linear layer: its one active plain LoRA adapter (no DoRA or
    other variant, no LoRA bias), where the layer is unmerged and its adapters enabled; else None."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(module) is not LoraLinear or module.merged or module.disable_adapters:
        return None
    adapters = [a for a in module.active_adapters if a in module.lora_A]
    if len(adapters) != 1:
        return None
    adapter = adapters[0]
    if adapter in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(adapter, False):
        return None
    return adapter


@contextmanager
def merged_lora(model: torch.nn.Module) -> Iterator[int]:
    """Inside the context, the plain LoRA linear layers of `model` (in eval mode) compute with merged
    weights; yields how many. Their forwards, and the gated MLPs', are restored on exit."""
    if model.training:
        raise ValueError("merged_lora leaves out LoRA dropout, so it is for eval mode only: call model.eval() first")
    saved: list[tuple[torch.nn.Module, object]] = []  # (module, its own forward before, or None)
    merged = 0
    try:
        with torch.no_grad():
            for module in model.modules():
                adapter = mergeable(module)
                if adapter is not None:
                    saved.append((module, vars(module).get("forward")))
                    module.forward = _merged_forward(merged_weight(module, adapter), module.get_base_layer().bias)
                    merged += 1
                elif type(module).__name__ in GATED_MLPS and "forward" in vars(module):
                    saved.append((module, vars(module)["forward"]))
                    del module.forward
        yield merged
    finally:
        for module, forward in reversed(saved):
            if forward is None:
                vars(module).pop("forward", None)
            else:
                module.forward = forward


def _merged_forward(weight: torch.Tensor, bias: torch.Tensor | None):
    def forward(x, *args, **kwargs):
        return F.linear(x, weight, bias)

    return forward
