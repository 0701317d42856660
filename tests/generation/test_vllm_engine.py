"""The vLLM glue (mathtune.generation.vllm_engine) against a stand-in `vllm` module: what it asks the
engine for, the order and chunks it hands results back in, and the error where vLLM is missing.
vLLM itself needs a GPU it supports; its answers against the mathtune backend can only be measured there."""

from __future__ import annotations

import sys
import types

import pytest

from mathtune.generation import vllm_engine


class FakeLLM:
    """vllm.LLM's offline interface: generate(prompts, params, use_tqdm) -> RequestOutputs in prompt order,
    each text cut after the first stop string (include_stop_str_in_output), one token per character."""

    def __init__(self, continuations: dict[str, str] | None = None, **kwargs):
        self.kwargs, self.continuations, self.calls = kwargs, continuations or {}, []

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((list(prompts), params))
        outputs = []
        for prompt in prompts:
            text = self.continuations[prompt][: params.max_tokens]
            ends = [text.find(s) + len(s) for s in params.stop if s in text]
            text = text[: min(ends)] if ends else text
            completion = types.SimpleNamespace(text=text, token_ids=list(range(len(text))))
            outputs.append(types.SimpleNamespace(prompt=prompt, outputs=[completion]))
        return outputs


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: types.SimpleNamespace(**kwargs)
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def test_generate_asks_for_greedy_decoding_with_the_stop_strings_kept(fake_vllm):
    engine = FakeLLM({"a": "one\nQuestion: two", "b": "three"})
    results = list(vllm_engine.generate(engine, ["a", "b"], 40, ("\nQuestion:",)))
    assert results == [(0, "one\nQuestion:", 13), (1, "three", 5)]
    params = engine.calls[0][1]
    assert (params.temperature, params.max_tokens, params.stop) == (0.0, 40, ["\nQuestion:"])
    assert params.include_stop_str_in_output and params.skip_special_tokens


def test_generate_hands_back_every_prompt_in_order_chunk_by_chunk(fake_vllm):
    prompts = [f"p{i}" for i in range(5)]
    engine = FakeLLM({p: f"answer {p}" for p in prompts})
    results = list(vllm_engine.generate(engine, prompts, 50, (), chunk=2))
    assert [(i, text) for i, text, _ in results] == [(i, f"answer p{i}") for i in range(5)]
    assert [call[0] for call in engine.calls] == [["p0", "p1"], ["p2", "p3"], ["p4"]]


def test_load_engine_turns_on_prefix_caching_and_bounds_the_rows_when_asked(fake_vllm):
    engine = vllm_engine.load_engine("/models/m", "bfloat16", None, 7)
    assert engine.kwargs == {"model": "/models/m", "tokenizer": "/models/m", "revision": None, "dtype": "bfloat16",
                             "seed": 7, "enable_prefix_caching": True}
    assert vllm_engine.load_engine("/models/m", "bfloat16", max_rows=64).kwargs["max_num_seqs"] == 64


def test_without_vllm_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm then raises ImportError
    with pytest.raises(vllm_engine.VLLMUnavailable, match="pip install vllm.*eval.backend: mathtune"):
        vllm_engine.load_engine("/models/m", "bfloat16")
