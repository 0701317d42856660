"""Attention over one shared prompt prefix plus each row's own tokens: the KV cache batched decoding uses.

Every prompt of an evaluation starts with the same few-shot examples (about 1,570 of an 8-shot
prompt's 1,640 Gemma tokens). Their keys and values are computed once and every row attends to
that single copy, as vLLM's prefix caching and FlashInfer's cascade attention do: prefill then
costs a problem its question only, and a decoding step reads the prefix once for the whole batch
(one matrix product over all rows' queries) instead of once per row.

The attention is exact, not an approximation: the scores of the prefix and of the row's own tokens
go through one softmax, as if the row held the whole prompt. Sliding-window layers (Gemma 3: 512
positions) see the last `window - 1` prefix positions at most and mask by absolute position, so a
prefix longer than the window gives what decoding the full prompt gives.

Hand-written because transformers' caches hold one copy of every key per row: there the prefix
would be copied into, and re-read from, each of the batch's rows at every step. The model's own
layers run unchanged; only the attention function is ours, registered through transformers'
`AttentionInterface`, so any model whose attention goes through that interface can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

NAME = "mathtune_shared_prefix"


class UnsupportedModel(ValueError):
    """A model whose attention does not go through transformers' AttentionInterface."""


@dataclass
class LayerKV:
    """One layer's keys and values: the shared prefix ([kv_heads, P_l, d]) and each slot's own tokens
    ([slots, kv_heads, capacity, d])."""

    window: int | None  # sliding window of this layer; None for full attention
    prefix_k: torch.Tensor
    prefix_v: torch.Tensor
    prefix_start: int  # absolute position of prefix_k[:, 0]
    k: torch.Tensor
    v: torch.Tensor


@dataclass
class SlotKV:
    """The KV cache of a batch of rows ("slots") that all continue the same prefix of `prefix_len` tokens."""

    prefix_len: int
    layers: list[LayerKV]

    @classmethod
    def empty(cls, config, slots: int, capacity: int, dtype, device,
              prefix: SlotKV | None = None, prefix_len: int = 0) -> SlotKV:
        """Room for `slots` rows of up to `capacity` tokens each after the prefix: the first `prefix_len`
        tokens of `prefix`'s slot 0 (a cache built with no prefix), or no prefix when it is None."""
        layers = []
        kv_heads = config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        for index in range(config.num_hidden_layers):
            window = layer_window(config, index)
            start = max(0, prefix_len - (window - 1)) if window else 0  # older keys are out of every window
            if prefix is None:
                prefix_len = start = 0
                prefix_k = prefix_v = torch.zeros(kv_heads, 0, head_dim, dtype=dtype, device=device)
            else:
                prefix_k = prefix.layers[index].k[0, :, start:prefix_len].contiguous()
                prefix_v = prefix.layers[index].v[0, :, start:prefix_len].contiguous()
            layers.append(LayerKV(
                window, prefix_k, prefix_v, start,
                torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device),
                torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device),
            ))
        return cls(prefix_len, layers)

    def move_slots(self, sources: list[int], targets: list[int], width: int) -> None:
        """Copy the first `width` positions of slots `sources` into slots `targets` (filling finished rows' holes)."""
        if not sources:
            return
        src = torch.tensor(sources, device=self.layers[0].k.device)
        dst = torch.tensor(targets, device=self.layers[0].k.device)
        for layer in self.layers:
            layer.k[dst, :, :width] = layer.k[src, :, :width]
            layer.v[dst, :, :width] = layer.v[src, :, :width]


def layer_window(config, index: int) -> int | None:
    """The sliding window of layer `index`, None for a full-attention layer."""
    types = getattr(config, "layer_types", None)
    window = getattr(config, "sliding_window", None)
    if types is None:
        return window  # a model with one attention kind: a window applies to every layer, when there is one
    return window if types[index] == "sliding_attention" else None


@dataclass
class Step:
    """One forward call: rows first..first+b-1 of the cache, each given L new tokens (right-padded)
    after its `start` tokens of its own.

    bands: the rows split into consecutive groups (their sizes), each attending to its own keys up to
    its longest row only; None: one group. A cache's rows differ in length (questions of different
    lengths, rows that joined at different steps), and the shorter rows' unused key positions would
    otherwise be read at every step: attending to a row's own keys is bound by reading them.
    """

    kv: SlotKV
    first: int
    start: list[int]  # each row's own tokens already in the cache
    length: int  # L
    bands: list[int] | None = None
    attend: Callable | None = None  # the attention kernel (see _attend); None: torch's
    calls: int = 0  # layers that ran through this attention (a check that the model uses it)
    starts: torch.Tensor = field(init=False)  # start, on the cache's device
    spans: list[tuple[int, int, int]] = field(init=False)  # each band's first row, rows, keys read (max start + L)
    _masks: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.starts = torch.tensor(self.start, device=self.kv.layers[0].k.device)
        self.spans, offset = [], 0
        for count in self.bands or [len(self.start)]:
            self.spans.append((offset, count, max(self.start[offset : offset + count]) + self.length))
            offset += count
        if offset != len(self.start):
            raise ValueError(f"bands {self.bands} do not cover the step's {len(self.start)} rows")

    def positions(self) -> torch.Tensor:
        """[b, L] absolute positions of the new tokens (their RoPE positions)."""
        offsets = torch.arange(self.length, device=self.starts.device)
        return self.kv.prefix_len + self.starts[:, None] + offsets

    def _queries(self, groups: int) -> torch.Tensor:
        """[b, g*L, 1] each query's position among its row's own tokens (each kv head's g query heads in turn)."""
        device = self.starts.device
        return (self.starts[:, None] + torch.arange(self.length, device=device)).repeat(1, groups)[:, :, None]

    def prefix_mask(self, layer: LayerKV, groups: int, dtype: torch.dtype) -> tuple:
        """The additive mask (0: attend, -inf: not) over the layer's prefix keys ([1, 1, b*g*L, P_l], None
        when every query sees all of them) and which queries see no prefix key at all ([b, 1, g*L] bool,
        None when there are none); built once per step and window."""
        key = ("prefix", layer.window, layer.prefix_start, layer.prefix_k.shape[1], groups, dtype)
        if key not in self._masks:
            prefix_mask = blind = None
            if layer.window is not None and layer.prefix_k.shape[1]:
                query = self._queries(groups)
                prefix = layer.prefix_start + torch.arange(layer.prefix_k.shape[1], device=query.device)
                seen_prefix = prefix > self.kv.prefix_len + query - layer.window
                prefix_mask = _additive(seen_prefix, dtype).reshape(1, 1, -1, seen_prefix.shape[-1])
                blind = ~seen_prefix.any(-1)[:, None]
                blind = blind if blind.any() else None
            self._masks[key] = (prefix_mask, blind)
        return self._masks[key]

    def own_mask(self, layer: LayerKV, band: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
        """The additive mask over band `band`'s own keys ([rows, 1, g*L, width]); built once per step,
        window and band."""
        key = ("own", layer.window, band, groups, dtype)
        if key not in self._masks:
            offset, count, width = self.spans[band]
            query = self._queries(groups)[offset : offset + count]
            own = torch.arange(width, device=query.device)
            seen = own <= query
            if layer.window is not None:  # a key is seen while query - key < window
                seen &= own > query - layer.window
            self._masks[key] = _additive(seen, dtype)[:, None]
        return self._masks[key]


def _additive(seen: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(seen.shape, dtype=dtype, device=seen.device).masked_fill_(~seen, float("-inf"))


def _attend(query, key, value, mask, scale, softcap=None, kernel=None):
    """Attention output and each query's log-sum-exp of scores (the softmax's normaliser), so that two
    halves of one softmax can be joined. kernel: a function with torch's CPU flash kernel's contract
    (mathtune.speedups.decoding_attention), used where the scores are not soft-capped; otherwise on
    a CPU torch's fused flash kernel, which returns both; elsewhere, or with soft-capped scores
    (Gemma 2), the same from plain products."""
    if kernel is not None and softcap is None:
        return kernel(query, key, value, mask, scale)
    if query.device.type == "cpu" and softcap is None:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, attn_mask=mask, scale=scale)
    scores = (query @ key.transpose(-1, -2)).float() * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores + mask
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp().nan_to_num(0.0)  # a query that sees no key: -inf - -inf
    return probs.to(value.dtype) @ value, lse


def shared_prefix_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, mathtune_step: Step | None = None, **kwargs):
    """The attention function registered as NAME: stores the new keys and values in the slots' cache,
    then attends over the shared prefix and the row's own tokens: two attentions whose outputs are
    joined by their log-sum-exps, which is one softmax over both (as FlashInfer's cascade attention)."""
    step = mathtune_step
    if step is None:
        raise UnsupportedModel(f"attention {NAME!r} was called without a decoding step")
    step.calls += 1
    layer = step.kv.layers[module.layer_idx]
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows = slice(step.first, step.first + batch)

    columns = step.starts[:, None] + torch.arange(length, device=query.device)  # [b, L]
    batch_index = torch.arange(batch, device=query.device)[:, None]
    layer.k[rows][batch_index, :, columns] = key.transpose(1, 2)
    layer.v[rows][batch_index, :, columns] = value.transpose(1, 2)

    scale = module.scaling if scaling is None else scaling
    q = query.reshape(batch, kv_heads, groups * length, dim)  # each kv head's query heads as more queries
    outs, lses = [], []
    for band, (offset, count, width) in enumerate(step.spans):
        band_rows = slice(step.first + offset, step.first + offset + count)
        out, lse = _attend(q[offset : offset + count], layer.k[band_rows, :, :width], layer.v[band_rows, :, :width],
                           step.own_mask(layer, band, groups, query.dtype), scale, softcap, step.attend)
        outs.append(out)
        lses.append(lse)
    out, lse = (outs[0], lses[0]) if len(outs) == 1 else (torch.cat(outs), torch.cat(lses))
    prefix_len = layer.prefix_k.shape[1]
    if prefix_len:
        prefix_mask, blind = step.prefix_mask(layer, groups, query.dtype)
        q_all = q.transpose(0, 1).reshape(1, kv_heads, batch * groups * length, dim)  # all rows share these keys
        out_p, lse_p = _attend(q_all, layer.prefix_k[None], layer.prefix_v[None], prefix_mask, scale, softcap,
                               step.attend)
        out_p = out_p.view(kv_heads, batch, groups * length, dim).transpose(0, 1)
        lse_p = lse_p.view(kv_heads, batch, groups * length).transpose(0, 1)
        if blind is not None:  # queries that see no prefix key: the kernel gives them 0, not -inf
            lse_p = lse_p.masked_fill(blind, float("-inf"))
        top = torch.maximum(lse, lse_p)
        w_own, w_prefix = (lse - top).exp()[..., None], (lse_p - top).exp()[..., None]
        out = (out.float() * w_own + out_p.float() * w_prefix) / (w_own + w_prefix)
    out = out.to(query.dtype).reshape(batch, heads, length, dim).transpose(1, 2)
    return out, None


def _no_mask(*args, **kwargs):
    """The masks are built by Step from each row's length; transformers' mask builders are skipped."""
    return None


AttentionInterface.register(NAME, shared_prefix_attention)
AttentionMaskInterface.register(NAME, _no_mask)
