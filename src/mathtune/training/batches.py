"""Training examples and batches: problems tokenized in the shared template, and packed rows cut into passes."""

from __future__ import annotations

import itertools

import torch

from mathtune.data import DataError, tokenize_example

# what TRL's padding-free collator puts in a batch (split_packed_row cuts nothing else)
PACKED_ROW_KEYS = {"input_ids", "labels", "position_ids", "seq_idx", "cu_seq_lens_q", "cu_seq_lens_k",
                   "max_length_q", "max_length_k"}


def tokenize(problems: list[dict], tokenizer, max_length: int) -> tuple[list[dict], list[str]]:
    """Tokenized examples; those longer than max_length are dropped (never truncated: that would cut the answer)."""
    examples, dropped = [], []
    for problem in problems:
        example = tokenize_example(tokenizer, problem["question"], problem["answer"])
        if len(example["input_ids"]) > max_length:
            dropped.append(problem["id"])
            continue
        examples.append({**example, "id": problem["id"]})
    return examples, dropped


def tokenize_split(train: list[dict], validation: list[dict], tokenizer,
                   max_length: int) -> tuple[list[dict], list[dict], list[str]]:
    """(training examples, validation examples, ids dropped as too long); a side left empty is a DataError."""
    train_examples, dropped_train = tokenize(train, tokenizer, max_length)
    validation_examples, dropped_validation = tokenize(validation, tokenizer, max_length)
    if not train_examples or not validation_examples:
        raise DataError(
            f"no example fits data.max_length={max_length} tokens on one side of the split; raise it"
        )
    return train_examples, validation_examples, dropped_train + dropped_validation


def as_dataset(examples: list[dict]):
    """The examples as the Trainer takes them: a datasets.Dataset of input_ids and labels only."""
    from datasets import Dataset

    return Dataset.from_list([{k: e[k] for k in ("input_ids", "labels")} for e in examples])


def split_packed_row(batch: dict, max_tokens: int) -> list[dict]:
    """A padding-free batch (one row of examples end to end) cut into pieces of consecutive whole
    examples of at most max_tokens tokens each (an example longer than that goes alone).

    Each piece carries what the collator gives a row of its own: position ids and labels sliced,
    sequence offsets and lengths for flash attention recomputed. A batch holding anything else is
    returned whole.
    """
    positions = batch.get("position_ids")
    if positions is None or positions.shape[0] != 1 or not set(batch) <= PACKED_ROW_KEYS:
        return [batch]
    starts = torch.nonzero(positions[0] == 0).flatten().tolist()
    ends = starts[1:] + [positions.shape[1]]
    groups, first = [], 0  # [first, last) example indices of each piece
    for index in range(1, len(starts) + 1):
        if index == len(starts) or ends[index] - starts[first] > max_tokens:
            groups.append((first, index))
            first = index
    pieces = []
    for first, last in groups:
        low, high = starts[first], ends[last - 1]
        lengths = [end - start for start, end in zip(starts[first:last], ends[first:last])]
        piece = {key: batch[key][:, low:high] for key in ("input_ids", "labels", "position_ids") if key in batch}
        if "seq_idx" in batch:
            piece["seq_idx"] = batch["seq_idx"][:, low:high] - first
        if "cu_seq_lens_q" in batch:
            offsets = torch.tensor([0, *itertools.accumulate(lengths)], dtype=batch["cu_seq_lens_q"].dtype,
                                   device=batch["cu_seq_lens_q"].device)
            piece.update(cu_seq_lens_q=offsets, cu_seq_lens_k=offsets, max_length_q=max(lengths),
                         max_length_k=max(lengths))
        pieces.append(piece)
    return pieces
