"""Facts about the machine: the dtype a run computes in, and the hardware named in its records."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


# The CPU flags that decide how fast a matrix product runs, and in which dtype (resolve_dtype).
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_facts(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """(the CPU's model name, its flags) from /proc/cpuinfo's text (read when not given); ("", set()) elsewhere.

    The name carries the CPU family and model numbers where the text gives them: a virtual machine may
    show only "AMD EPYC", and the family tells generations apart whose speed differs (family 25 is
    Zen 3 and Zen 4, family 26 Zen 5, with twice Zen 4's AVX-512 width)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "", set()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), " ".join(value.split()))  # the first processor's
    model, flags = fields.get("model name", ""), set(fields.get("flags", "").split())
    if model and fields.get("cpu family") and fields.get("model"):
        model = f"{model} (family {fields['cpu family']}, model {fields['model']})"
    return model, flags


def cpu_kind(model: str, flags: set[str], max_isa: str | None = None) -> str:
    """The kind of CPU a speed figure holds for: its model name and what its matrix products run on.

    Speed differs by an order of magnitude between these kinds (bfloat16 on AMX tiles, bfloat16 on
    AVX-512 BF16 instructions, float32 only), so every benchmark prints this beside its figures.
    `max_isa`: oneDNN's ONEDNN_MAX_CPU_ISA where set, which keeps oneDNN's kernels (products,
    convolutions, the brgemm micro-kernels of PyTorch's CPU attention) off the newer units: on a CPU
    with AMX, AVX512_CORE_BF16 runs the code path of a CPU without AMX.
    """
    if max_isa:
        limited = max_isa.upper()
        if "AMX" not in limited:
            flags = flags - {"amx_bf16", "amx_tile", "amx_int8"}
        if limited in ("AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX", "SSE41"):
            flags = flags - {"avx512f", "avx512_bf16"}
        elif limited in ("AVX512_CORE", "AVX512_CORE_VNNI"):
            flags = flags - {"avx512_bf16"}
        return f"{cpu_kind(model, flags)}; oneDNN limited to {limited} (ONEDNN_MAX_CPU_ISA)"
    if "amx_bf16" in flags:
        unit = "AMX (bfloat16)"
    elif "avx512_bf16" in flags:
        unit = "AVX-512 BF16, no AMX (bfloat16)"
    elif "avx512f" in flags:
        unit = "AVX-512 without BF16 (float32)"
    elif "avx2" in flags:
        unit = "AVX2, no AVX-512 (float32)"
    else:
        unit = "no AVX2 (float32)"
    shown = [f for f in SPEED_FLAGS if f in flags]
    return f"{model or platform.machine()}, {unit}; flags: {' '.join(shown) or 'none of ' + ' '.join(SPEED_FLAGS)}"


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX makes bf16 matrix products fast on x86 CPUs; elsewhere bf16 is emulated and slow."""
    flags = cpu_facts()[1]
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype for a config's model.dtype; `auto` is bfloat16 where the hardware has it."""
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def hardware_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
