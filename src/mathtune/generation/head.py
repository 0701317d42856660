"""The greedy next token: the argmax of the LM head, a slice of the vocabulary at a time.

Gemma's head has 262,144 rows. Computing all of a batch's logits at once writes a
[batch, vocabulary] tensor only to take its maximum; a slice at a time keeps the working set in
cache and never holds more than one slice's logits. Each slice's logits are laid out a row per
batch row ([b, slice]), so the maximum runs along contiguous memory: taken across rows instead
([slice, b]) it costs more than the product itself. What a model applies after its head
(soft-capping, scaling) is monotone, so it leaves the argmax alone.

On a CPU each slice of the weight is reordered once, per evaluation, into oneDNN's blocked layout
(what torch.compile's freezing does for a Linear): a plain product reorders the weight again at
every call. The products give the same values either way. Slices are smaller there (a slice's
logits for a batch stay within a few MB of cache), and each slice's maximum is taken without its
position (`amax`, a vectorised reduction); the position (`max` with indices, several times slower
in bfloat16) is looked up only for the rows whose best value the slice raises. On a GPU that
lookup would wait for the device at every slice, so there each slice's max and position come at once.
"""

from __future__ import annotations

import torch

CHUNK_ROWS = {"cpu": 8192, "cuda": 65536}  # vocabulary rows a slice (bench/RESULTS.md)


def plain_head(model) -> torch.Tensor | None:
    """The output embedding's weight when the head is a bias-free Linear (not an adapter-wrapped one), else None."""
    head = model.get_output_embeddings()
    if type(head) is torch.nn.Linear and head.bias is None:
        return head.weight
    return None


class GreedyHead:
    """argmax over the vocabulary of `hidden @ weight.T` for each row of hidden ([b, d] -> [b] ids).

    rows: the usual number of rows per call (a hint for the weight's layout). Ties go to the lowest
    id, as torch.argmax does over the whole vector.
    """

    def __init__(self, weight: torch.Tensor, rows: int = 1, chunk_rows: int | None = None):
        if chunk_rows is None:
            chunk_rows = CHUNK_ROWS.get(weight.device.type, CHUNK_ROWS["cuda"])
        self.select_rows = weight.device.type == "cpu"
        self.slices = [(first, weight[first : first + chunk_rows]) for first in range(0, weight.shape[0], chunk_rows)]
        self.packed = (weight.device.type == "cpu" and torch.backends.mkldnn.is_available()
                       and weight.dtype in (torch.float32, torch.bfloat16))
        if self.packed:
            with torch.inference_mode():
                self.slices = [(first, torch.ops.mkldnn._reorder_linear_weight(part, rows))
                               for first, part in self.slices]

    def _logits(self, hidden: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(hidden, part, None, "none", [], "")
        return hidden @ part.T

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        best_value = best_index = None
        for first, part in self.slices:
            logits = self._logits(hidden, part)
            if best_value is None:
                best_value, best_index = logits.max(-1)
            elif self.select_rows:
                value = logits.amax(-1)
                better = value > best_value  # a tie keeps the earlier slice: the lowest id
                rows = better.nonzero().squeeze(1)
                if len(rows):
                    best_index[rows] = logits[rows].max(-1).indices + first
                    best_value = torch.where(better, value, best_value)
            else:
                value, index = logits.max(-1)
                better = value > best_value
                best_value = torch.where(better, value, best_value)
                best_index = torch.where(better, index + first, best_index)
        return best_index
