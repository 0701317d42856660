"""Greedy generation through vLLM, for `eval.backend: vllm` where vLLM is installed (a GPU it supports).

vLLM does what mathtune.generation does (continuous batching, the shared prefix's KV cache reused:
`enable_prefix_caching`) with GPU kernels and a paged cache; nothing in mathtune requires it, and
this module imports it only when called. Its `stop` takes literal strings, not the patterns a
stop rule finishes on, so a generation runs to the first stop string (kept in the output), an EOS
or max_new_tokens, and the caller keeps what its rule keeps (`StopRule.kept`): the same answer,
for the tokens generated past a `#### N` line.

Prompts go to the engine in chunks, so the caller can write each chunk's records before the next
starts: an evaluation that dies loses one chunk at most. vLLM schedules within a chunk as it likes;
the results come back in prompt order.
"""

from __future__ import annotations

from collections.abc import Iterator

CHUNK = 512  # prompts per engine call: records are written between calls


class VLLMUnavailable(ImportError):
    """vLLM is not installed (or cannot be imported); the message says what to do."""


def load_engine(path: str, dtype: str, revision: str | None = None, seed: int = 0, max_rows: int | None = None):
    """A vllm.LLM over a Hugging Face model directory or Hub id; the tokenizer comes from the same place.
    max_rows: the most sequences a step decodes (vLLM's max_num_seqs; None: vLLM's default)."""
    try:
        from vllm import LLM
    except ImportError as exc:
        raise VLLMUnavailable(
            f"eval.backend is vllm, but vLLM cannot be imported here ({exc}). Install it on a machine with a "
            "GPU it supports (pip install vllm), or use eval.backend: mathtune."
        ) from exc
    rows = {} if max_rows is None else {"max_num_seqs": max_rows}
    return LLM(model=path, tokenizer=path, revision=revision, dtype=dtype, seed=seed, enable_prefix_caching=True,
               **rows)


def generate(engine, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...],
             chunk: int = CHUNK) -> Iterator[tuple[int, str, int]]:
    """Greedy generations as (prompt index, text up to and with the first stop string, generated token count)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop=list(stop),
                            include_stop_str_in_output=True, skip_special_tokens=True)
    for start in range(0, len(prompts), chunk):
        outputs = engine.generate(prompts[start:start + chunk], params, use_tqdm=False)
        for offset, output in enumerate(outputs):
            completion = output.outputs[0]
            yield start + offset, completion.text, len(completion.token_ids)
