"""The greedy token a slice of the vocabulary at a time equals torch.argmax over all logits."""

import pytest
import torch

from mathtune.generation.head import GreedyHead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False], ids=["reordered weight", "plain products"])
def test_equals_argmax_of_all_logits(dtype, packed, monkeypatch):
    if not packed:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    torch.manual_seed(0)
    weight, hidden = torch.randn(1000, 16).to(dtype), torch.randn(5, 16).to(dtype)
    head = GreedyHead(weight, rows=5, chunk_rows=64)
    assert head.packed is (packed and torch.backends.mkldnn.is_available())
    assert head(hidden).tolist() == (hidden @ weight.T).float().argmax(-1).tolist()
    assert head(hidden[:2]).tolist() == (hidden[:2] @ weight.T).float().argmax(-1).tolist()  # fewer rows than the hint


def test_a_tie_across_slices_goes_to_the_lowest_id():
    weight = torch.zeros(10, 2)
    weight[[3, 7]] = torch.tensor([1.0, 0.0])  # rows 3 and 7 give the same, highest logit
    hidden = torch.tensor([[2.0, 1.0]])
    assert GreedyHead(weight, chunk_rows=4)(hidden).tolist() == [3]
    weight[7, 0] = 1.5
    assert GreedyHead(weight, chunk_rows=4)(hidden).tolist() == [7]
