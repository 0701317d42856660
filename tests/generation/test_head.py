"""The greedy token a slice of the vocabulary at a time equals torch.argmax over all logits."""

import pytest
import torch

from mathtune.generation.head import GreedyHead


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("packed", [True, False], ids=["reordered weight", "plain products"])
@pytest.mark.parametrize("select_rows", [True, False], ids=["positions for improved rows", "max and position at once"])
def test_equals_argmax_of_all_logits(dtype, packed, select_rows, monkeypatch):
    if not packed:
        monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    torch.manual_seed(0)
    weight, hidden = torch.randn(1000, 16).to(dtype), torch.randn(5, 16).to(dtype)
    head = GreedyHead(weight, rows=5, chunk_rows=64)
    head.select_rows = select_rows
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


@pytest.mark.parametrize("select_rows", [True, False])
def test_rows_whose_best_moves_to_a_later_slice_and_rows_whose_best_stays(select_rows):
    weight = torch.zeros(12, 3)
    weight[1] = torch.tensor([1.0, 0.0, 0.0])  # slice 0 (ids 0-3)
    weight[6] = torch.tensor([0.0, 1.0, 0.0])  # slice 1 (ids 4-7)
    weight[11] = torch.tensor([0.0, 0.0, 1.0])  # slice 2 (ids 8-11)
    weight[9] = torch.tensor([0.0, 0.0, 1.0])  # ties with id 11: the lower id wins
    hidden = torch.tensor([[3.0, 1.0, 2.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [1.0, 3.0, 3.0], [-1.0, -1.0, -1.0]])
    head = GreedyHead(weight, rows=5, chunk_rows=4)
    head.select_rows = select_rows
    assert head(hidden).tolist() == [1, 6, 9, 6, 0]  # the last row: every logit <= 0, the first zero row wins
