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
    after its `start` tokens of its own."""

    kv: SlotKV
    first: int
    start: torch.Tensor  # [b] long: each row's own tokens already in the cache
    length: int  # L
    calls: int = 0  # layers that ran through this attention (a check that the model uses it)
    _masks: dict = field(default_factory=dict)

    @property
    def width(self) -> int:
        return int(self.start.max()) + self.length

    def positions(self) -> torch.Tensor:
        """[b, L] absolute positions of the new tokens (their RoPE positions)."""
        offsets = torch.arange(self.length, device=self.start.device)
        return self.kv.prefix_len + self.start[:, None] + offsets

    def mask(self, layer: LayerKV, groups: int) -> torch.Tensor:
        """[b, 1, g*L, P_l + width] boolean (True: attend) over the layer's prefix keys, then the rows' own
        keys; built once per step for each window."""
        key = (layer.window, layer.prefix_start, layer.prefix_k.shape[1], groups)
        if key not in self._masks:
            device = self.start.device
            query = (self.start[:, None] + torch.arange(self.length, device=device)).repeat(1, groups)[:, :, None]
            own = torch.arange(self.width, device=device)
            seen = own <= query
            prefix = layer.prefix_start + torch.arange(layer.prefix_k.shape[1], device=device)
            seen_prefix = (prefix < self.kv.prefix_len).expand(query.shape[0], query.shape[1], -1)
            if layer.window is not None:  # a key is seen while query - key < window
                seen = seen & (own > query - layer.window)
                seen_prefix = prefix > self.kv.prefix_len + query - layer.window
            self._masks[key] = torch.cat([seen_prefix, seen], dim=-1)[:, None]
        return self._masks[key]


def shared_prefix_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                            sliding_window=None, softcap=None, mathtune_step: Step | None = None, **kwargs):
    """The attention function registered as NAME: stores the new keys and values in the slots' cache,
    then attends over the shared prefix and the row's own tokens with one softmax."""
    step = mathtune_step
    if step is None:
        raise UnsupportedModel(f"attention {NAME!r} was called without a decoding step")
    step.calls += 1
    layer = step.kv.layers[module.layer_idx]
    batch, heads, length, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    rows = slice(step.first, step.first + batch)

    columns = step.start[:, None] + torch.arange(length, device=query.device)  # [b, L]
    batch_index = torch.arange(batch, device=query.device)[:, None]
    layer.k[rows][batch_index, :, columns] = key.transpose(1, 2)
    layer.v[rows][batch_index, :, columns] = value.transpose(1, 2)
    own_k, own_v = layer.k[rows, :, : step.width], layer.v[rows, :, : step.width]

    scale = module.scaling if scaling is None else scaling
    q = (query * scale).reshape(batch, kv_heads, groups * length, dim)
    prefix_len = layer.prefix_k.shape[1]
    scores_own = q @ own_k.transpose(-1, -2)  # [b, kv, gL, width]
    if prefix_len:
        q_all = q.transpose(0, 1).reshape(kv_heads, batch * groups * length, dim)
        scores_prefix = (q_all @ layer.prefix_k.transpose(-1, -2)).view(kv_heads, batch, groups * length, prefix_len)
        scores = torch.cat([scores_prefix.transpose(0, 1), scores_own], dim=-1)
    else:
        scores = scores_own
    scores = scores.float()
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~step.mask(layer, groups), float("-inf")).softmax(-1).to(query.dtype)

    out = probs[..., prefix_len:] @ own_v  # [b, kv, gL, d]
    if prefix_len:
        p_prefix = probs[..., :prefix_len].transpose(0, 1).reshape(kv_heads, batch * groups * length, prefix_len)
        out = out + (p_prefix @ layer.prefix_v).view(kv_heads, batch, groups * length, dim).transpose(0, 1)
    out = out.reshape(batch, heads, length, dim).transpose(1, 2)
    return out, None


def _no_mask(*args, **kwargs):
    """The masks are built by Step from each row's length; transformers' mask builders are skipped."""
    return None


AttentionInterface.register(NAME, shared_prefix_attention)
AttentionMaskInterface.register(NAME, _no_mask)
