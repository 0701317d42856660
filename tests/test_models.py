"""Model loading: the early model check, the tokenizer's memory, the packaged model's copies."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mathtune.models import TINY_RANDOM, ModelError, check_model


def test_check_model_passes_a_model_and_names_what_to_do_for_a_missing_one(tmp_path):
    check_model(TINY_RANDOM)
    with pytest.raises(ModelError, match="has no config.json"):
        check_model(str(tmp_path))


def _small_gemma_tokenizer(cls=None):
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<mask>": 4, "▁": 5, "4": 6, "8": 7, "48": 8,
             "▁clips": 9, "c": 10, "l": 11, "i": 12, "p": 13, "s": 14}
    return (cls or GemmaTokenizer)(vocab=vocab, merges=[("4", "8")])


def test_construction_copies_go_and_the_tokenizer_encodes_and_saves_as_before(tmp_path):
    from transformers import AutoTokenizer

    from mathtune.tokenizer_memory import drop_construction_copies

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

    from mathtune.tokenizer_memory import drop_construction_copies

    class ReadsMerges(GemmaTokenizer):
        def merge_count(self):
            return [len(self._merges) for _ in (0,)][0]  # read inside a comprehension: nested code

    tokenizer = _small_gemma_tokenizer(ReadsMerges)
    assert drop_construction_copies(tokenizer) == ["_vocab"]
    assert tokenizer.merge_count() == 1


def test_the_packaged_model_is_copied_once_into_a_16_bit_dtype(tmp_path, monkeypatch):
    from safetensors import safe_open

    from mathtune import model_cache, models

    source = model_cache.tiny_random_dir()  # stands in for the float32 conversion of the packaged GGUF
    float32_dir = model_cache.packaged_gemma_dir

    def packaged(dtype=torch.float32):
        return source if dtype == torch.float32 else float32_dir(dtype)

    monkeypatch.setattr(model_cache, "CACHE_DIR", tmp_path)
    monkeypatch.setattr(model_cache, "packaged_gemma_dir", packaged)
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

    from mathtune.model_cache import save_model_dir, tiny_random_dir

    source = tiny_random_dir()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    target = tmp_path / "copy"
    assert save_model_dir(model, tokenizer, target) == target and (target / "config.json").exists()
    written = (target / "config.json").stat().st_mtime_ns
    assert save_model_dir(model, tokenizer, target) == target  # as a second process finishing later
    assert (target / "config.json").stat().st_mtime_ns == written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no partial directory left behind


def test_load_vllm_hands_vllm_the_model_or_the_adapter_merged_into_the_workdir(tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mathtune.generation import vllm_engine
    from mathtune.models import load_model, load_vllm, resolve_model_path

    loaded = []
    monkeypatch.setattr(vllm_engine, "load_engine", lambda *args: loaded.append(args) or "engine")
    assert load_vllm(TINY_RANDOM, "float32", seed=3) == "engine"
    assert loaded[-1] == (resolve_model_path(TINY_RANDOM), "float32", None, 3, None)

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(load_model(TINY_RANDOM, "float32"), config).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="workdir"):
        load_vllm(TINY_RANDOM, "float32", adapter=tmp_path / "adapter")
    load_vllm(TINY_RANDOM, "float32", adapter=tmp_path / "adapter", workdir=tmp_path / "merged", max_rows=8)
    assert loaded[-1] == (str(tmp_path / "merged"), "float32", None, 0, 8)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tuned = load_model(TINY_RANDOM, "float32", adapter=tmp_path / "adapter", merge_adapter=True)
    base = load_model(TINY_RANDOM, "float32")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights = {k: dict(m.named_parameters())[name] for k, m in (("merged", merged), ("tuned", tuned), ("base", base))}
    assert torch.equal(weights["merged"], weights["tuned"]) and not torch.equal(weights["merged"], weights["base"])
    assert (tmp_path / "merged" / "tokenizer_config.json").exists()
