"""Greedy decoding of many prompts at once: a shared prefix computed once, and continuous batching.

A batch has a fixed number of slots. A row that stops hands its slot to the next waiting prompt
instead of the batch draining down to its slowest row (continuous batching, as vLLM and TGI do);
waiting prompts are prefilled a group at a time, attending to the prefix all prompts share
(shared_prefix), and join the decoding batch. Live rows always fill the first slots, so a step
reads its rows' keys as one slice: when a row stops, the last live row moves into its slot.

Rows are kept in bands: consecutive slots whose rows are of similar length (they joined together,
and their prompts are close in length). Attending to a row's own keys is bound by reading them, and
each band reads its keys only up to its own longest row, not the batch's: with rows that joined at
different steps the batch's longest row is often twice the average. A band costs one attention call
per layer, so bands are split and merged where that saves more reading than the call costs
(BAND_OVERHEAD; on CPUs, where attending to a row's keys is a large share of a step). Filling a
stopped row's slot keeps every band contiguous.

A row stops on an end-of-sequence id, at max_new_tokens, or when `finished(generated_ids)` says
so; that check (which decodes the row's text) runs only after a token in `triggers`, the tokens
whose text can complete a stop pattern, not after every token.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from mathtune.generation.head import GreedyHead, plain_head
from mathtune.generation.shared_prefix import NAME, SlotKV, Step, UnsupportedModel

PREFILL_TOKENS = 4096  # padded prompt tokens per prefill call: bounds its attention scores' memory
SLOTS_CAP = {"cpu": 256, "cuda": 512}  # rows a step; more share the head's weight read, with less gain (bench/RESULTS.md)
MEMORY_SHARE = 0.25  # the share of free memory the slots' KV cache may take
# An attention call per band costs about as much as reading this many cached tokens (bench/RESULTS.md).
# A device not named keeps one band: a GPU reads keys fast and pays for every extra kernel launch.
BAND_OVERHEAD = {"cpu": 512}
ONE_BAND = 1 << 62  # an overhead no band's saving beats


@dataclass
class Row:
    index: int  # the prompt's position in the caller's list
    own: list[int]  # the prompt's tokens after the shared prefix
    generated: list[int] = field(default_factory=list)
    band: int = 0  # rows of one band sit in consecutive slots

    @property
    def cached(self) -> int:
        """Tokens of this row in its slot: its own prompt and all generated tokens but the last (the next input)."""
        return len(self.own) + max(len(self.generated) - 1, 0)


def common_prefix_length(token_lists: list[list[int]]) -> int:
    """The number of tokens every prompt starts with, leaving each prompt at least one token of its own."""
    shortest = min(len(ids) for ids in token_lists)
    first = token_lists[0]
    for position in range(shortest - 1):
        if any(ids[position] != first[position] for ids in token_lists):
            return position
    return shortest - 1


def split_bands(lengths: list[int], overhead: int) -> list[int]:
    """Sizes of consecutive groups of `lengths` that minimise the keys read, sum(size x longest), plus
    `overhead` per group (each group is one attention call). Exact, by dynamic programming over the
    group boundaries (quadratic: a few hundred rows join at most)."""
    n = len(lengths)
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        longest = 0
        for begin in range(end - 1, -1, -1):
            longest = max(longest, lengths[begin])
            cost = best[begin] + (end - begin) * longest + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, begin
    sizes, end = [], n
    while end:
        sizes.append(end - cut[end])
        end = cut[end]
    return sizes[::-1]


def merge_bands(sizes: list[int], longest: list[int], overhead: int) -> list[int]:
    """Sizes after joining neighbouring bands wherever the extra keys read, sizes[i] x (new longest -
    longest[i]) summed over both, cost less than `overhead` (the call saved)."""
    merged: list[list[int]] = []
    for size, width in zip(sizes, longest):
        if merged:
            last_size, last_width = merged[-1]
            top = max(width, last_width)
            if last_size * (top - last_width) + size * (top - width) < overhead:
                merged[-1] = [last_size + size, top]
                continue
        merged.append([size, width])
    return [size for size, _ in merged]


def runs(labels: list[int]) -> list[int]:
    """Lengths of the runs of equal consecutive labels."""
    sizes: list[int] = []
    for position, label in enumerate(labels):
        if position and label == labels[position - 1]:
            sizes[-1] += 1
        else:
            sizes.append(1)
    return sizes


def compaction(labels: list[int], stopped: set[int]) -> list[int]:
    """The slots' new order after the `stopped` positions leave: new slot i holds the row of old slot
    order[i]. Every band (a run of equal labels) stays one run, in the same order; within a band, rows
    already inside its new range stay put and the others fill its free slots (about one move per band
    after the first stopped row, instead of shifting every row)."""
    order: list[int] = []
    begin = 0
    for size in runs(labels):
        rows = [p for p in range(begin, begin + size) if p not in stopped]
        low, high = len(order), len(order) + len(rows)
        placed = {p: p for p in rows if low <= p < high}
        movers = iter(p for p in rows if p not in placed)
        order += [placed[i] if i in placed else next(movers) for i in range(low, high)]
        begin += size
    return order


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = torch.finfo(dtype).bits // 8
    return config.num_hidden_layers * 2 * config.num_key_value_heads * head_dim * element


def choose_slots(n_prompts: int, bytes_per_row: int, device: torch.device, free_bytes: int | None = None) -> int:
    """Rows decoded at once: as many as help the device's matrix products (SLOTS_CAP), no more than the
    prompts, and no more than MEMORY_SHARE of free memory holds."""
    if free_bytes is None:
        free_bytes = free_memory(device)
    by_memory = max(1, int(free_bytes * MEMORY_SHARE) // max(bytes_per_row, 1))
    return max(1, min(n_prompts, SLOTS_CAP.get(device.type, SLOTS_CAP["cuda"]), by_memory))


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


@contextmanager
def shared_prefix_attention(model):
    """The model's attention runs through shared_prefix's function while decoding, and is restored after."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous


@torch.inference_mode()
def _forward(model, kv: SlotKV, first: int, start: list[int], inputs: list[list[int]], head=None,
             bands: list[int] | None = None, attention: Callable | None = None) -> list[int]:
    """Runs slots first..first+len(inputs)-1 on their new tokens, after the `start` tokens each already
    holds; returns each row's next token (head: a GreedyHead over the model's head weight, None to
    call the model's own head; bands: the rows' band sizes, None for one band; attention: the
    attention kernel, None for torch's)."""
    device = kv.layers[0].k.device
    length = max(len(ids) for ids in inputs)
    ids = torch.tensor([ids + [0] * (length - len(ids)) for ids in inputs], device=device)
    step = Step(kv, first, start, length, bands, attention)
    hidden = model.get_decoder()(
        input_ids=ids, position_ids=step.positions(), use_cache=False, mathtune_step=step,
    ).last_hidden_state
    if step.calls != len(kv.layers):
        raise UnsupportedModel(
            f"{type(model).__name__}'s attention does not go through transformers' AttentionInterface "
            f"({step.calls} of {len(kv.layers)} layers did): batched evaluation cannot decode it"
        )
    last = torch.tensor([len(x) - 1 for x in inputs], device=device)
    hidden = hidden[torch.arange(len(inputs), device=device), last]
    if head is not None:
        return head(hidden).tolist()
    return model.get_output_embeddings()(hidden).argmax(-1).tolist()


def greedy_decode(
    model, token_lists: list[list[int]], *, max_new_tokens: int, stop_ids: set[int],
    finished: Callable[[list[int]], bool], triggers: set[int] | None = None, slots: int | None = None,
    attention: Callable | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """Yields (prompt index, generated ids) for every prompt, in the order rows stop.

    The ids are what one-at-a-time greedy `generate` produces, up to the stop (in float32 exactly;
    in bfloat16 a batch's different shapes can round a near-tie the other way). triggers: the ids after
    which `finished` is checked (None: after every token). attention: an attention kernel with torch's
    CPU flash kernel's contract (mathtune.speedups.decoding_attention), None for torch's own.
    """
    if not token_lists:
        return
    config, device, dtype = model.config, model.device, model.dtype
    prefix_len = common_prefix_length(token_lists)
    pending = deque(sorted(
        (Row(i, ids[prefix_len:]) for i, ids in enumerate(token_lists)), key=lambda row: len(row.own)
    ))
    capacity = max(len(row.own) for row in pending) + max_new_tokens
    if slots is None:
        slots = choose_slots(len(token_lists), capacity * kv_bytes_per_token(config, dtype), device)
    slots = min(slots, len(token_lists))
    refill_at = max(1, slots // 8)  # free slots that make a prefill call worth its overhead
    weight = plain_head(model)
    head = GreedyHead(weight, slots) if weight is not None else None
    overhead = BAND_OVERHEAD.get(device.type, ONE_BAND)

    with shared_prefix_attention(model):
        prefix = None
        if prefix_len:
            prefix = SlotKV.empty(config, 1, prefix_len, dtype, device)
            _forward(model, prefix, 0, [0], [token_lists[0][:prefix_len]], attention=attention)
        kv = SlotKV.empty(config, slots, capacity, dtype, device, prefix=prefix, prefix_len=prefix_len)
        del prefix
        live: list[Row] = []
        while live or pending:
            if pending and (slots - len(live) >= refill_at or not live):
                joining = [pending.popleft() for _ in range(min(slots - len(live), len(pending)))]
                tokens = []
                for group in _prefill_groups(joining):
                    first = len(live) + len(tokens)
                    tokens += _forward(model, kv, first, [0] * len(group), [row.own for row in group], head,
                                       attention=attention)
                rows, first = joining, len(live)
                _label_bands(joining, max((row.band for row in live), default=-1) + 1, overhead)
                live = _merge(live + joining, overhead)
            else:
                rows, first = live, 0
                inputs = [row.generated[-1:] for row in live]
                bands = runs([row.band for row in live])
                tokens = _forward(model, kv, 0, [row.cached for row in live], inputs, head, bands, attention)
            done = []
            for position, (row, token) in enumerate(zip(rows, tokens), start=first):
                row.generated.append(token)
                if (token in stop_ids or len(row.generated) >= max_new_tokens
                        or ((triggers is None or token in triggers) and finished(row.generated))):
                    done.append(position)
            for position in done:
                yield live[position].index, live[position].generated
            if done:
                live = _close_holes(kv, live, done, overhead)


def _prefill_groups(rows: list[Row]) -> Iterator[list[Row]]:
    """Consecutive groups of rows whose padded prompt tokens stay within PREFILL_TOKENS."""
    group: list[Row] = []
    for row in rows:
        if group and (len(group) + 1) * max(len(row.own), max(len(r.own) for r in group)) > PREFILL_TOKENS:
            yield group
            group = []
        group.append(row)
    if group:
        yield group


def _label_bands(rows: list[Row], label: int, overhead: int) -> None:
    """Puts joining rows into new bands, labelled from `label` on, as split_bands groups their prompts."""
    begin = 0
    for size in split_bands([len(row.own) for row in rows], overhead):
        for row in rows[begin : begin + size]:
            row.band = label
        begin, label = begin + size, label + 1


def _close_holes(kv: SlotKV, live: list[Row], done: list[int], overhead: int) -> list[Row]:
    """Drops the stopped rows; other rows move into their slots so that the live ones stay first and
    every band stays in consecutive slots (compaction)."""
    order = compaction([row.band for row in live], set(done))
    moves = [(source, target) for target, source in enumerate(order) if source != target]
    if moves:
        sources, targets = zip(*moves)
        kv.move_slots(list(sources), list(targets), max(live[p].cached for p in sources) + 1)
    return _merge([live[p] for p in order], overhead)


def _merge(live: list[Row], overhead: int) -> list[Row]:
    """Relabels neighbouring bands as one where merge_bands says reading a little more is cheaper."""
    sizes = runs([row.band for row in live])
    begin, longest = 0, []
    for size in sizes:
        longest.append(max(row.cached for row in live[begin : begin + size]))
        begin += size
    begin = 0
    for size in merge_bands(sizes, longest, overhead):
        for row in live[begin : begin + size]:
            row.band = live[begin].band
        begin += size
    return live
