"""Process-wide settings (mathtune.speedups.memory): huge pages, bounded kernel caches, CUDA's attention backend."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathtune.hardware import cpu_supports_bf16
from mathtune.speedups.memory import prefer_shape_agnostic_attention


def test_on_cuda_attention_never_uses_cudnn(monkeypatch):
    """cuDNN's SDPA builds a plan per new sequence length; on CUDA mathtune turns it off."""
    was = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        prefer_shape_agnostic_attention()
        assert torch.backends.cuda.cudnn_sdp_enabled()  # nothing to change without CUDA
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        prefer_shape_agnostic_attention()
        assert not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(was)


def test_huge_pages_are_asked_for_where_the_kernel_offers_them(tmp_path, monkeypatch):
    from mathtune.speedups.memory import prefer_huge_pages

    setting = tmp_path / "enabled"
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    setting.write_text("always madvise [never]\n")
    assert not prefer_huge_pages(setting) and "THP_MEM_ALLOC_ENABLE" not in os.environ
    assert not prefer_huge_pages(tmp_path / "missing")
    setting.write_text("always [madvise] never\n")
    assert prefer_huge_pages(setting) and os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")  # the user's choice stands
    assert not prefer_huge_pages(setting) and os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="the kernel offers no transparent huge pages")
def test_once_asked_a_large_tensor_lies_on_huge_pages():
    script = (
        "import torch\n"
        "from mathtune.speedups.memory import prefer_huge_pages\n"
        "prefer_huge_pages()\n"
        "x = torch.ones(16 * 2**20)\n"
        "print(sum(int(l.split()[1]) for l in open('/proc/self/smaps') if l.startswith('AnonHugePages')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    huge_kb = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert huge_kb >= 2048  # at least one 2 MB page (none without the setting)


def test_the_matmul_kernel_caches_are_bounded_unless_the_user_set_them(monkeypatch):
    from mathtune.speedups.memory import MATMUL_CACHE_CAPACITY, bound_matmul_cache

    for variable in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        monkeypatch.delenv(variable, raising=False)
        bound_matmul_cache()
        assert os.environ[variable] == str(MATMUL_CACHE_CAPACITY)
        monkeypatch.setenv(variable, "1024")
        bound_matmul_cache()
        assert os.environ[variable] == "1024"


MATMUL_SHAPES = """
import ctypes, sys, torch
if sys.argv[1] == "bounded":
    from mathtune.speedups.memory import bound_matmul_cache
    bound_matmul_cache()
class MallocInfo(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallocInfo
weight = torch.randn(2048, 640, dtype=torch.bfloat16)
for rows in range(100, 300):  # a new product shape each time, as each padding-free batch brings
    if rows == 200:
        start = libc.mallinfo2().uordblks
    torch.randn(rows, 640, dtype=torch.bfloat16) @ weight.t()
print((libc.mallinfo2().uordblks - start) / 2**20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not cpu_supports_bf16(),
                    reason="bfloat16 products go through oneDNN on x86 CPUs with AVX-512 BF16 or AMX (glibc's mallinfo2)")
def test_bounded_caches_stop_the_heap_growing_with_each_new_product_shape():
    grown = {}
    for mode in ("bounded", "default"):
        env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")}
        result = subprocess.run([sys.executable, "-c", MATMUL_SHAPES, mode], capture_output=True, text=True,
                                env=env, check=True)
        grown[mode] = float(result.stdout.split()[-1])
    assert grown["bounded"] < 5 and grown["default"] > 20  # MB of heap in use after 100 new shapes
