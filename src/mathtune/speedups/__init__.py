"""Speed-ups for LoRA training of causal LMs: each in a module of its own, applied from here only.

This package imports nothing else from mathtune, and the rest of mathtune reaches it through the
three functions below (as Liger-Kernel's `apply_liger_kernel_to_*` with a flag per kernel):

- `apply_process_settings()`: process-wide settings the libraries read once, at their first use,
  so it runs before any model loads (huge pages for large CPU tensors, bounded caches of
  matrix-product kernels, no cuDNN attention on CUDA).
- `apply(model, flags)`: patches one model (a PEFT model or a plain causal LM) in the one order
  that works: attention first; then the loss head; then, on CPUs, dropout before the LoRA branch
  and the gated MLP that draw its masks, compact frozen weights that their products read, and the
  norms. Each patch has a flag (`speedups.*` in the config), so any can be switched off to debug
  or to measure it; a patch that finds nothing to do leaves the model as it was.
- `for_generation(model, flags)`: the context in which a training model generates (exact match
  during training): on CPUs, LoRA merged into temporary weights (`merged_lora`).
- `decoding_attention(model, flags)`: the attention kernel batched decoding runs (mathtune.generation):
  on CPUs in bfloat16, oneDNN's products with float32 results (`onednn_attention`) where the library
  is installed; None (torch's own kernel) otherwise.

Where a patch runs is decided here too (`DEVICE_POLICY`): the CPU-only ones are those whose
library counterparts are already fused kernels on GPUs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from mathtune.speedups import memory

if TYPE_CHECKING:  # torch loads with the first patch, not with the config that reads Flags
    import torch

# patches that run on CPUs only: on GPUs torch's dropout, PEFT's branch, the MLP and the norm are
# already fused kernels, and the frozen weights are not memory-mapped files
# merged_lora: on a GPU the merged copies would take as much memory as the targeted weights
# onednn_attention: on a GPU torch's attention kernels are already fast in 16 bits
CPU_ONLY = ("uniform_dropout", "fused_lora", "gated_mlp", "compact_weights", "rms_norm", "merged_lora",
            "onednn_attention")
GENERATION_ONLY = ("merged_lora", "onednn_attention")  # flags read when generating, not patches that apply() makes


@dataclass(frozen=True)
class Flags:
    """Which speed-ups apply (all by default); the config's `speedups` section."""

    packed_attention: bool = True  # padding-free rows: attention one example at a time
    loss_head: bool = True  # cross-entropy on loss-bearing positions, vocabulary in slices
    uniform_dropout: bool = True  # LoRA dropout masks from 16-bit words, kept as bits
    fused_lora: bool = True  # the LoRA branch as one autograd function
    gated_mlp: bool = True  # the gated MLP keeping its input only
    compact_weights: bool = True  # frozen memory-mapped weights as int8 blocks
    rms_norm: bool = True  # Gemma's RMS norm keeping its output only
    merged_lora: bool = True  # generation during training from LoRA merged into temporary weights
    onednn_attention: bool = True  # bfloat16 decoding's attention from oneDNN's float32-result products


def apply_process_settings() -> None:
    """Settings for the whole process, before the first model or large tensor: see mathtune.speedups.memory."""
    memory.prefer_huge_pages()
    memory.bound_matmul_cache()
    memory.prefer_shape_agnostic_attention()


def apply(model: torch.nn.Module, flags: Flags = Flags(), head_original: torch.Tensor | None = None) -> dict[str, int]:
    """Apply the speed-ups `flags` allow to `model`, in order; returns how many modules each one changed.

    `model` is a causal LM or a PEFT model around one (the LoRA patches need the PEFT layers, so a
    training model is patched after PEFT wraps it). `head_original`: for a 16-bit model rounded from
    float32 weights, the float32 LM head it was rounded from, which the loss head keeps in a compact
    exact form (mathtune.speedups.compact_weights); None where there is none.
    """
    from mathtune.speedups.compact_weights import use_compact_base_weights
    from mathtune.speedups.dropout import use_uniform_dropout
    from mathtune.speedups.fused_lora import use_fused_lora
    from mathtune.speedups.gated_mlp import use_gated_mlp
    from mathtune.speedups.lm_loss import install_loss_head, wants_loss_head
    from mathtune.speedups.packed_attention import use_packed_attention
    from mathtune.speedups.rms_norm import use_gemma_rms_norm

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    wanted = asdict(flags)
    if causal_lm.device.type != "cpu":
        wanted.update({name: False for name in CPU_ONLY})
    wanted["loss_head"] = wanted["loss_head"] and wants_loss_head(causal_lm)
    patches = {
        "packed_attention": lambda: use_packed_attention(causal_lm),
        "loss_head": lambda: install_loss_head(causal_lm, head_original),
        "uniform_dropout": lambda: use_uniform_dropout(model),
        "fused_lora": lambda: use_fused_lora(model),  # after uniform_dropout: it takes layers with that dropout
        "gated_mlp": lambda: use_gated_mlp(model),  # likewise
        "compact_weights": lambda: use_compact_base_weights(model),  # read by the two products above
        "rms_norm": lambda: use_gemma_rms_norm(model),
    }
    return {name: int(patch()) for name, patch in patches.items() if wanted[name]}


def for_generation(model: torch.nn.Module, flags: Flags = Flags()):
    """The context in which `model`, a training model in eval mode, generates: on CPUs with the
    merged_lora flag, its LoRA layers merged into temporary weights (mathtune.speedups.merged_lora);
    otherwise the model as it is."""
    from contextlib import nullcontext

    from mathtune.speedups.merged_lora import merged_lora

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if flags.merged_lora and causal_lm.device.type == "cpu":
        return merged_lora(model)
    return nullcontext()


def decoding_attention(model: torch.nn.Module, flags: Flags = Flags()):
    """The attention kernel for mathtune.generation's batched decoding of `model`: on a CPU in bfloat16,
    with the onednn_attention flag and oneDNN installed (the `cpu` extra), mathtune.speedups.
    onednn_attention.attention; otherwise None, torch's own kernel."""
    import torch

    from mathtune.speedups import onednn_attention

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if (flags.onednn_attention and causal_lm.device.type == "cpu" and causal_lm.dtype == torch.bfloat16
            and onednn_attention.available()):
        return onednn_attention.attention
    return None
