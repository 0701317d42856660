"""Facts about the machine: the dtype a run computes in, and the hardware named in its records."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX makes bf16 matrix products fast on x86 CPUs; elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
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
