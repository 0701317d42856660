"""Model-loading helpers: the early model check, the attention backend chosen on CUDA, tokenizer and allocation memory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathtune.models import TINY_RANDOM, ModelError, check_model, cpu_supports_bf16, prefer_shape_agnostic_attention


def test_check_model_passes_a_model_and_names_what_to_do_for_a_missing_one(tmp_path):
    check_model(TINY_RANDOM)
    with pytest.raises(ModelError, match="has no config.json"):
        check_model(str(tmp_path))


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


def _small_gemma_tokenizer(cls=None):
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5, "4": 6, "8": 7, "48": 8,
             "▁clips": 9, "c": 10, "l": 11, "i": 12, "p": 13, "s": 14}
    return (cls or GemmaTokenizer)(vocab=vocab, merges=[("4", "8")])


def test_construction_copies_go_and_the_tokenizer_encodes_and_saves_as_before(tmp_path):
    from transformers import AutoTokenizer

    from mathtune.models import drop_construction_copies

    tokenizer = _small_gemma_tokenizer()
    before = tokenizer("48 clips")["input_ids"]
    assert drop_construction_copies(tokenizer) == ["_vocab", "_merges"]
    assert not hasattr(tokenizer, "_vocab") and not hasattr(tokenizer, "_merges")
    assert tokenizer("48 clips")["input_ids"] == before
    assert 8 in before  # the merge "4" + "8" still applies
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)("48 clips")["input_ids"] == before


def test_a_tokenizer_whose_methods_read_its_vocabulary_keeps_it():
    from transformers import GemmaTokenizer

    from mathtune.models import drop_construction_copies

    class ReadsMerges(GemmaTokenizer):
        def merge_count(self):
            return [len(self._merges) for _ in (0,)][0]  # read inside a comprehension: nested code

    tokenizer = _small_gemma_tokenizer(ReadsMerges)
    assert drop_construction_copies(tokenizer) == ["_vocab"]
    assert tokenizer.merge_count() == 1


def test_huge_pages_are_asked_for_where_the_kernel_offers_them(tmp_path, monkeypatch):
    from mathtune.models import prefer_huge_pages

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
        "from mathtune.models import prefer_huge_pages\n"
        "prefer_huge_pages()\n"
        "x = torch.ones(16 * 2**20)\n"
        "print(sum(int(l.split()[1]) for l in open('/proc/self/smaps') if l.startswith('AnonHugePages')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    huge_kb = int(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    assert huge_kb >= 2048  # at least one 2 MB page (none without the setting)


def test_the_matmul_kernel_caches_are_bounded_unless_the_user_set_them(monkeypatch):
    from mathtune.models import MATMUL_CACHE_CAPACITY, bound_matmul_cache

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
    from mathtune.models import bound_matmul_cache
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


def test_the_packaged_model_is_copied_once_into_a_16_bit_dtype(tmp_path, monkeypatch):
    from safetensors import safe_open

    from mathtune import models

    source = models.tiny_random_dir()  # stands in for the float32 conversion of the packaged GGUF
    float32_dir = models.packaged_gemma_dir

    def packaged(dtype=torch.float32):
        return source if dtype == torch.float32 else float32_dir(dtype)

    monkeypatch.setattr(models, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(models, "packaged_gemma_dir", packaged)
    path = Path(models.resolve_model_path(models.PACKAGED_GEMMA, torch.bfloat16))
    assert path == tmp_path / "gemma-3-270m-hf-bfloat16" and (path / "tokenizer.json").exists()
    with safe_open(path / "model.safetensors", "pt") as copy, safe_open(source / "model.safetensors", "pt") as original:
        assert set(copy.keys()) == set(original.keys())
        for name in copy.keys():
            assert copy.get_tensor(name).dtype == torch.bfloat16
            assert torch.equal(copy.get_tensor(name), original.get_tensor(name).to(torch.bfloat16)), name
    written = (path / "model.safetensors").stat().st_mtime_ns
    assert Path(models.resolve_model_path(models.PACKAGED_GEMMA, torch.bfloat16)) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == written  # made once
    assert models.resolve_model_path(models.PACKAGED_GEMMA, torch.float32) == str(source)


def test_a_model_directory_appears_whole_and_the_first_copy_stands(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mathtune.models import save_model_dir, tiny_random_dir

    source = tiny_random_dir()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    target = tmp_path / "copy"
    assert save_model_dir(model, tokenizer, target) == target and (target / "config.json").exists()
    written = (target / "config.json").stat().st_mtime_ns
    assert save_model_dir(model, tokenizer, target) == target  # as a second process finishing later
    assert (target / "config.json").stat().st_mtime_ns == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no partial directory left behind
