"""Batched decoding with a shared prefix and continuous batching against `generate` on each prompt alone.

Float32, so the texts must match token for token. The model is a random Gemma 3 with a sliding
window of 8 positions, mixed sliding and full-attention layers and grouped-query attention, and the
prompts share a 30-token prefix: prefixes, prompts and generations all run past the window.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM,
)

from mathtune import speedups
from mathtune.generation import decode, greedy_decode
from mathtune.generation.decode import (
    choose_slots, common_prefix_length, compaction, merge_bands, runs, split_bands,
)
from mathtune.generation.shared_prefix import SlotKV
from mathtune.speedups import onednn_attention

EOS = 1
WINDOW = 8


def gemma(seed: int = 0) -> Gemma3ForCausalLM:
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=WINDOW, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        attn_implementation="sdpa", eos_token_id=EOS, pad_token_id=0, bos_token_id=2,
    )
    return Gemma3ForCausalLM(config).eval()


def prompts(n: int, prefix_len: int, seed: int = 1) -> list[list[int]]:
    """n prompts: BOS, one shared prefix, then 1-11 tokens of their own."""
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, 128, (prefix_len,), generator=generator).tolist()
    lengths = torch.randint(1, 12, (n,), generator=generator).tolist()
    return [[2] + prefix + torch.randint(3, 128, (k,), generator=generator).tolist() for k in lengths]


def stops_at_multiple_of_7(ids: list[int]) -> bool:
    """A stand-in for a stop pattern: rows stop after different numbers of tokens."""
    return ids[-1] % 7 == 0


def one_at_a_time(model, ids: list[int], max_new: int, finished=None) -> list[int]:
    """generate on one prompt, cut where `finished` first holds (generate itself stops at EOS)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=EOS,
                         pad_token_id=0)[0, len(ids):].tolist()
    for k in range(1, len(out) + 1):
        if finished is not None and finished(out[:k]):
            return out[:k]
    return out


@pytest.mark.parametrize("prefix_len, slots", [(30, 3), (30, None), (0, 4)])
def test_equals_generate_one_at_a_time(prefix_len, slots):
    model = gemma()
    batch = prompts(9, prefix_len)
    got = dict(greedy_decode(model, batch, max_new_tokens=20, stop_ids={EOS}, finished=stops_at_multiple_of_7,
                             slots=slots))
    expected = {i: one_at_a_time(model, ids, 20, stops_at_multiple_of_7) for i, ids in enumerate(batch)}
    assert got == expected
    assert len({len(ids) for ids in got.values()}) > 2  # rows stopped at different steps


def count_bands(monkeypatch) -> list[int]:
    """The number of bands of every forward call from now on."""
    seen_bands = []
    forward = decode._forward

    def spy(model, kv, first, start, inputs, head=None, bands=None, attention=None):
        seen_bands.append(len(bands or [1]))
        return forward(model, kv, first, start, inputs, head, bands, attention)

    monkeypatch.setattr(decode, "_forward", spy)
    return seen_bands


def test_rows_in_many_bands_equal_generate(monkeypatch):
    """No overhead for a band: every length its own band, rows joining, leaving and moving between slots."""
    monkeypatch.setattr(decode, "BAND_OVERHEAD", {"cpu": 0})
    seen_bands = count_bands(monkeypatch)
    model = gemma()
    batch = prompts(12, 30, seed=5)
    got = dict(greedy_decode(model, batch, max_new_tokens=20, stop_ids={EOS}, finished=stops_at_multiple_of_7,
                             slots=6))
    assert got == {i: one_at_a_time(model, ids, 20, stops_at_multiple_of_7) for i, ids in enumerate(batch)}
    assert max(seen_bands) >= 3


def test_a_device_without_a_band_overhead_keeps_one_band(monkeypatch):
    monkeypatch.setattr(decode, "BAND_OVERHEAD", {})  # as on a GPU
    seen_bands = count_bands(monkeypatch)
    list(greedy_decode(gemma(), prompts(12, 30, seed=5), max_new_tokens=20, stop_ids={EOS},
                       finished=stops_at_multiple_of_7, slots=6))
    assert seen_bands and set(seen_bands) == {1}


def test_generations_longer_than_the_window_equal_generate():
    """No stop pattern: every row decodes 24 tokens, three windows past its prompt."""
    model = gemma(seed=3)
    batch = prompts(5, 12, seed=4)
    got = dict(greedy_decode(model, batch, max_new_tokens=24, stop_ids=set(), finished=lambda ids: False, slots=2))
    for i, ids in enumerate(batch):
        expected = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(ids):].tolist()
        assert got[i] == expected


def test_a_finished_row_hands_its_slot_to_a_waiting_prompt(monkeypatch):
    """3 slots, 9 prompts: rows join while others are still decoding, and the batch never holds more than 3."""
    model = gemma()
    widths, joined = [], []
    forward = decode._forward

    def spy(model, kv, first, start, inputs, head=None, bands=None, attention=None):
        widths.append(first + len(inputs))
        if len(kv.layers[0].k) == 3 and not any(start):
            joined.append(first)  # a prefill into slots after `first` live rows
        return forward(model, kv, first, start, inputs, head, bands, attention)

    monkeypatch.setattr(decode, "_forward", spy)
    list(greedy_decode(model, prompts(9, 30), max_new_tokens=20, stop_ids={EOS}, finished=stops_at_multiple_of_7,
                       slots=3))
    assert max(widths) == 3
    assert any(first > 0 for first in joined)  # some prompts joined a batch that was still decoding


def test_triggers_limit_when_the_stop_check_runs():
    model = gemma()
    checked = []

    def finished(ids):
        checked.append(ids[-1])
        return stops_at_multiple_of_7(ids)

    triggers = set(range(0, 128, 7))
    got = dict(greedy_decode(model, prompts(6, 30), max_new_tokens=20, stop_ids={EOS}, finished=finished,
                             triggers=triggers))
    assert checked and set(checked) <= triggers
    assert got == dict(greedy_decode(model, prompts(6, 30), max_new_tokens=20, stop_ids={EOS},
                                     finished=stops_at_multiple_of_7))


def test_a_model_without_layer_types_equals_generate():
    """Llama: one kind of attention, no sliding window, no `layer_types` in its config."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                         attn_implementation="sdpa", eos_token_id=EOS, pad_token_id=0)
    model = LlamaForCausalLM(config).eval()
    batch = prompts(5, 10)
    got = dict(greedy_decode(model, batch, max_new_tokens=12, stop_ids={EOS}, finished=stops_at_multiple_of_7,
                             slots=2))
    assert got == {i: one_at_a_time(model, ids, 12, stops_at_multiple_of_7) for i, ids in enumerate(batch)}


def test_soft_capped_attention_equals_generate():
    """Gemma 2: attention scores soft-capped (tanh), sliding and full layers."""
    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                          attn_logit_softcapping=2.0, max_position_embeddings=256, attn_implementation="eager",
                          eos_token_id=EOS, pad_token_id=0, bos_token_id=2)
    model = Gemma2ForCausalLM(config).eval()
    batch = prompts(5, 12)
    got = dict(greedy_decode(model, batch, max_new_tokens=16, stop_ids={EOS}, finished=stops_at_multiple_of_7,
                             slots=2))
    assert got == {i: one_at_a_time(model, ids, 16, stops_at_multiple_of_7) for i, ids in enumerate(batch)}


def test_the_attention_setting_is_restored():
    model = gemma()
    list(greedy_decode(model, prompts(2, 5), max_new_tokens=3, stop_ids=set(), finished=lambda ids: False))
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("lists, expected", [
    ([[1, 2, 3, 4], [1, 2, 3, 5]], 3),
    ([[1, 2, 3], [1, 2, 3, 4]], 2),  # each keeps a token of its own
    ([[1, 2, 3]], 2),
    ([[1, 2], [3, 4]], 0),
    ([[7], [7]], 0),
])
def test_common_prefix_length(lists, expected):
    assert common_prefix_length(lists) == expected


def test_choose_slots_takes_the_smallest_limit():
    cpu = torch.device("cpu")
    assert choose_slots(1000, 1 << 20, cpu, free_bytes=64 << 30) == decode.SLOTS_CAP["cpu"]
    assert choose_slots(5, 1 << 20, cpu, free_bytes=64 << 30) == 5
    assert choose_slots(1000, 1 << 30, cpu, free_bytes=8 << 30) == 2  # a quarter of 8 GiB holds 2 rows of 1 GiB
    assert choose_slots(1000, 1 << 40, cpu, free_bytes=8 << 30) == 1


def _cost(lengths, sizes, overhead):
    total, begin = 0, 0
    for size in sizes:
        total += size * max(lengths[begin : begin + size]) + overhead
        begin += size
    return total


def _compositions(n):
    if n == 0:
        yield []
    for first in range(1, n + 1):
        for rest in _compositions(n - first):
            yield [first] + rest


@pytest.mark.parametrize("lengths, overhead, expected", [
    ([1, 1, 1, 100, 100], 10, [3, 2]),  # 3*1 + 2*100 + 2*10 = 223 < 5*100 + 10
    ([1, 1, 1, 100, 100], 1000, [5]),
    ([1, 2, 3], 0, [1, 1, 1]),
    ([7], 5, [1]),
])
def test_split_bands(lengths, overhead, expected):
    assert split_bands(lengths, overhead) == expected


def test_split_bands_is_the_cheapest_split():
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        lengths = torch.randint(1, 60, (7,), generator=generator).tolist()
        overhead = int(torch.randint(0, 80, (1,), generator=generator))
        sizes = split_bands(lengths, overhead)
        assert sum(sizes) == len(lengths)
        assert _cost(lengths, sizes, overhead) == min(_cost(lengths, c, overhead) for c in _compositions(7))


@pytest.mark.parametrize("sizes, longest, overhead, expected", [
    ([10, 1], [100, 95], 10, [11]),  # one row reads 5 more keys: cheaper than a call
    ([10, 10], [100, 95], 10, [10, 10]),  # ten rows read 5 more: not
    ([1, 1, 1], [5, 6, 7], 3, [3]),  # merged twice: 1 + 0, then 2*1 + 0
    ([4, 4], [9, 9], 0, [4, 4]),  # no saving: no merge
])
def test_merge_bands(sizes, longest, overhead, expected):
    assert merge_bands(sizes, longest, overhead) == expected


def test_runs():
    assert runs([3, 3, 5, 5, 5, 3]) == [2, 3, 1]
    assert runs([]) == []


def test_compaction_moves_one_row_per_band_after_the_hole():
    order = compaction([0, 0, 0, 1, 1, 2, 2], {1})
    assert order == [0, 2, 4, 3, 6, 5]
    assert sum(source != target for target, source in enumerate(order)) == 3


def test_compaction_keeps_bands_contiguous_and_in_order():
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        sizes = torch.randint(1, 5, (4,), generator=generator).tolist()
        labels = [band for band, size in enumerate(sizes) for _ in range(size)]
        stopped = {p for p in range(len(labels)) if torch.rand(1, generator=generator) < 0.4}
        order = compaction(labels, stopped)
        assert sorted(order) == [p for p in range(len(labels)) if p not in stopped]
        new_labels = [labels[p] for p in order]
        assert new_labels == sorted(new_labels)  # each band one run, bands in their old order
        first_stop = min(stopped, default=len(labels))
        assert all(source == target for target, source in enumerate(order) if target < first_stop)



def float64_attention(query, key, value, mask, scale):
    """The attention kernels' contract (output, log-sum-exp) computed in float64: the reference."""
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    lse = scores.logsumexp(-1)
    return ((scores - lse[..., None]).exp().nan_to_num(0.0) @ value.double()).float(), lse.float()


def decoder_states(model, batch: list[list[int]], attention) -> list[torch.Tensor]:
    """The decoder's output of every call of one teacher-forced decode: the shared prefix, the prompts'
    prefill, then three decoding steps with fixed inputs, the rows in two bands."""
    states = []
    hook = model.get_decoder().register_forward_hook(lambda m, i, out: states.append(out.last_hidden_state.float()))
    prefix_len = common_prefix_length(batch)
    own = [ids[prefix_len:] for ids in batch]
    config, dtype = model.config, model.dtype
    try:
        with torch.inference_mode(), decode.shared_prefix_attention(model):
            prefix = SlotKV.empty(config, 1, prefix_len, dtype, model.device)
            decode._forward(model, prefix, 0, [0], [batch[0][:prefix_len]], attention=attention)
            kv = SlotKV.empty(config, len(own), max(map(len, own)) + 3, dtype, model.device, prefix=prefix,
                              prefix_len=prefix_len)
            decode._forward(model, kv, 0, [0] * len(own), own, attention=attention)
            for t in range(3):
                decode._forward(model, kv, 0, [len(ids) + t for ids in own], [[5 + t]] * len(own),
                                bands=[4, len(own) - 4], attention=attention)
    finally:
        hook.remove()
    return states


@pytest.mark.skipif(not onednn_attention.available(), reason="oneDNN not loadable here")
def test_bfloat16_decoding_with_onednn_attention_follows_the_float64_attention():
    """The kernel speedups.decoding_attention picks for bfloat16 on CPUs, in the decoding loop (prefix
    past the window, sliding and full layers, grouped queries, prefill, bands), against the same loop
    with float64 attention: the decoder's outputs differ by bfloat16 rounding only, no more than with
    torch's flash kernel; attention that ignored the masks would be off by far more."""
    model = gemma().to(torch.bfloat16)
    attention = speedups.decoding_attention(model)
    assert attention is onednn_attention.attention
    batch = prompts(9, 30)
    expected = decoder_states(model, batch, float64_attention)

    def gap(states):
        return max((got - want).abs().max().item() for got, want in zip(states, expected))

    def unmasked(query, key, value, mask, scale):
        return float64_attention(query, key, value, None, scale)

    ours, flash, wrong = gap(decoder_states(model, batch, attention)), gap(decoder_states(model, batch, None)), \
        gap(decoder_states(model, batch, unmasked))
    print(f"largest difference from float64 attention: oneDNN {ours:.3g}, flash {flash:.3g}, no masks {wrong:.3g}")
    assert ours <= flash < wrong / 10
