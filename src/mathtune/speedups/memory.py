"""Process-wide memory settings for CPU training and generation: the C library's heap, huge pages, the
caches of matrix-product kernels, and CUDA's attention backend choice.

Each setting is read by the library it concerns once, at its first use, so they are applied before
any model loads (mathtune.speedups.apply_process_settings).
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MATMUL_CACHE_CAPACITY = 64  # matrix-product kernels oneDNN and PyTorch keep (their default is 1,024): see bound_matmul_cache
TRANSPARENT_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")  # always, madvise or never
LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None  # the C library: madvise, malloc_trim


def release_free_heap() -> None:
    """Hand the pages the C library's heap holds free back to the system (glibc's malloc_trim; a no-op elsewhere).

    The heap keeps freed memory resident, and on a CPU a training step's temporaries leave much of it
    free, resident but unused until a later allocation reuses it.
    """
    if LIBC is not None and hasattr(LIBC, "malloc_trim"):  # glibc's
        LIBC.malloc_trim(0)


def prefer_shape_agnostic_attention() -> None:
    """On CUDA, let SDPA choose flash or memory-efficient attention, not cuDNN's.

    cuDNN's attention builds an execution plan for each new sequence length, which is slow; GSM8K
    batches (and each decoding step) bring new lengths all the time, so building plans, not the
    arithmetic, sets the pace of a step. Flash and memory-efficient attention need no per-shape plan.
    """
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)


def prefer_huge_pages(setting: Path = TRANSPARENT_HUGE_PAGES) -> bool:
    """Let PyTorch put CPU tensors of 2 MB and more on transparent huge pages where the kernel offers them.

    Training allocates and frees large activations many times a step; on the heap they leave
    resident holes. With huge pages (PyTorch's THP_MEM_ALLOC_ENABLE) the peak resident memory of a
    training run was lower, at the same speed. PyTorch reads the variable once, at its first
    allocation of 2 MB or more, so this must run before the model loads; a value the user set is
    kept. Returns whether it is on.
    """
    try:
        offered = "[never]" not in setting.read_text()
    except OSError:  # not Linux, or no THP support
        return False
    if offered:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return offered and os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"


def bound_matmul_cache(capacity: int = MATMUL_CACHE_CAPACITY) -> None:
    """Keep the caches of matrix-product kernels small: each kept kernel holds its own memory.

    bfloat16 products on CPUs run through oneDNN, which builds a kernel for each new product shape,
    and two caches keep them: oneDNN's own (the last 1,024 built, ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    and PyTorch's of its oneDNN product objects (the last 1,024 used, LRU_CACHE_CAPACITY), each entry
    with working memory of its own. Padding-free batches bring new token counts, so new shapes, at
    every step: with the defaults each cache, and with them the heap in use, grows step after step,
    and the peak of a training run with it. A step uses a few dozen shapes, repeated across the
    layers, so that many kept loses no speed; reuse across steps is rare anyway. The caches read the
    variables when they build their first entry, so this runs before any model; a value the user
    set is kept.
    """
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(capacity))
