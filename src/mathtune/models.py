"""Model and tokenizer loading: Hub ids, local paths, the packaged Gemma 3 270M and a tiny test model.

The special names resolve to directories model_cache builds once; a Hub id with no Hub in reach is
looked up in the local cache only, so a miss fails at once with a message that says what to do.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from mathtune import model_cache
from mathtune.data import hub_reachable
from mathtune.hardware import resolve_dtype
from mathtune.tokenizer_memory import drop_construction_copies

PACKAGED_GEMMA = "gemma-3-270m"
TINY_RANDOM = "tiny-random"


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


def resolve_model_path(name: str, dtype: torch.dtype = torch.float32) -> str:
    """A local directory for the special names (the packaged model's copy in `dtype`), else the name itself
    (a local path or a Hub id)."""
    if name == PACKAGED_GEMMA:
        return str(model_cache.packaged_gemma_dir(dtype))
    if name == TINY_RANDOM:
        return str(model_cache.tiny_random_dir())
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


def check_model(name: str, revision: str | None = None) -> None:
    """Fail now, with load_model's message, if the model's config, its tokenizer or (for a local directory)
    its weight files cannot be found: a run checks this before it touches its directory. The weights
    are not loaded; a Hub model's weight files are only known to be there once load_model has run."""
    from transformers import AutoConfig

    path = resolve_model_path(name)
    offline = _offline(path)
    try:
        AutoConfig.from_pretrained(path, revision=revision, local_files_only=offline)
    except OSError as exc:
        raise ModelError(_not_found(name, exc, offline)) from exc
    check_weights(path)
    load_tokenizer(name, revision)


WEIGHT_FILES = ("*.safetensors", "pytorch_model*.bin", "*.safetensors.index.json", "pytorch_model.bin.index.json")


def check_weights(path: str) -> None:
    """A local model directory must hold weight files (a config and a tokenizer alone are not a model)."""
    folder = Path(path)
    if folder.is_dir() and not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise ModelError(
            f"model directory {folder} has no weights (no *.safetensors or pytorch_model*.bin file): copy the "
            "model's weight files into it, or give another model (a Hub id or a complete local directory)"
        )


def load_model(name: str, dtype: str = "auto", revision: str | None = None, adapter: str | Path | None = None,
               merge_adapter: bool = False):
    """A causal LM in eval mode, with a LoRA adapter applied when one is given: merged into the weights with
    merge_adapter (PEFT's merge_and_unload; evaluation decodes faster without the adapter's extra products)."""
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name, torch_dtype)
    check_weights(path)
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
        if merge_adapter:
            model = model.merge_and_unload()
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval()


def load_vllm(name: str, dtype: str = "auto", revision: str | None = None, adapter: str | Path | None = None,
              workdir: Path | None = None, seed: int = 0, max_rows: int | None = None):
    """A vLLM engine (mathtune.generation.vllm_engine) over the model, for `eval.backend: vllm`; max_rows
    (eval.batch_size) bounds the sequences a step decodes.

    With an adapter, the model with the adapter merged (the same merge_and_unload as load_model's) and its
    tokenizer are saved into workdir first and vLLM loads that: the evaluation then runs the same
    weights as the mathtune backend's, and needs none of vLLM's LoRA settings (ranks, target modules)."""
    from mathtune.generation import vllm_engine

    torch_dtype = resolve_dtype(dtype)
    path = resolve_model_path(name, torch_dtype)
    if adapter is not None:
        if workdir is None:
            raise ValueError("load_vllm needs a workdir for the merged model")
        merged = load_model(name, dtype, revision, adapter=adapter, merge_adapter=True)
        merged.save_pretrained(workdir)
        load_tokenizer(name, revision).save_pretrained(workdir)
        del merged
        path, revision = str(workdir), None
    if torch.cuda.is_available():  # vLLM sizes its cache from the GPU memory free now: return torch's cached blocks
        gc.collect()
        torch.cuda.empty_cache()
    return vllm_engine.load_engine(path, str(torch_dtype).removeprefix("torch."), revision, seed, max_rows)


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
