"""The decoder's linear layers with their weights reordered once into oneDNN's blocked layout while decoding.

On a CPU a plain bfloat16 product (F.linear) hands oneDNN the weight in its stored row-major layout,
and oneDNN reorders it into the blocked layout its kernels read at every call: a decoding step of a
few hundred rows then reads and writes every weight once more than the product needs. Reordering
each weight once per evaluation, as torch.compile's freezing does for a Linear (and head.GreedyHead
for the LM head), leaves only the product. The kernels and the numbers they multiply are the same.

Only bfloat16 weights on a CPU are reordered: float32 products go through MKL, not oneDNN, and a
different library's kernels could round a near-tie the other way. Only plain nn.Linear layers are:
an adapter's layers (PEFT's `base_layer`, `lora_A`/`lora_B`, training's speed-ups) compute their own
products. Hand-written because torch.compile, which would do the same, compiles for minutes per
shape on a CPU, and a decoding batch changes shape as rows join and leave.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch


def _packed_forward(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def packable(name: str, module: torch.nn.Module) -> bool:
    """A plain bfloat16 Linear on a CPU that is not part of an adapter."""
    if type(module) is not torch.nn.Linear:
        return False
    if "lora_" in name or name.split(".")[-1] == "base_layer":
        return False
    return module.weight.device.type == "cpu" and module.weight.dtype == torch.bfloat16


@contextmanager
def packed_linears(model: torch.nn.Module, rows: int = 1) -> Iterator[int]:
    """Inside the block, the model's packable Linears multiply by a copy of their weight in oneDNN's
    layout (rows: the usual rows per call, a hint for that layout); yields how many there are. After
    the block the layers are as before and the copies are freed."""
    patched: list[torch.nn.Module] = []
    if torch.backends.mkldnn.is_available():
        with torch.inference_mode():
            for name, module in model.named_modules():
                if packable(name, module):
                    weight = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
                    bias = None if module.bias is None else module.bias.detach()
                    module.forward = partial(_packed_forward, weight, bias)
                    patched.append(module)
    try:
        yield len(patched)
    finally:
        for module in patched:
            del module.forward  # the class's forward again
