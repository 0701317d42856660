"""The greedy next token: the argmax of the LM head, a slice of the vocabulary at a time.

Gemma's head has 262,144 rows. Computing all of a batch's logits at once writes a
[batch, vocabulary] tensor only to take its maximum; a slice at a time keeps the working set in
cache and never holds more than one slice's logits. Each slice's logits are laid out a row per
batch row ([b, slice]), so the maximum runs along contiguous memory: taken across rows instead
([slice, b]) it costs more than the product itself. What a model applies after its head
(soft-capping, scaling) is monotone, so it leaves the argmax alone.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = 65536


def plain_head(model) -> torch.Tensor | None:
    """The output embedding's weight when the head is a bias-free Linear (not an adapter-wrapped one), else None."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None


@torch.inference_mode()
def greedy_tokens(weight: torch.Tensor, hidden: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """argmax over the vocabulary of `hidden @ weight.T` for each row of hidden ([b, d] -> [b] ids).

    Ties go to the lowest id, as torch.argmax does over the whole vector.
    """
    best_value = best_index = None
    for first in range(0, weight.shape[0], chunk_rows):
        value, index = (hidden @ weight[first : first + chunk_rows].T).max(-1)
        if best_value is None:
            best_value, best_index = value, index
            continue
        better = value > best_value
        best_value = torch.where(better, value, best_value)
        best_index = torch.where(better, index + first, best_index)
    return best_index
