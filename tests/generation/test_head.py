"""The greedy token a slice of the vocabulary at a time equals torch.argmax over all logits."""

import torch

from mathtune.generation.head import greedy_tokens


def test_equals_argmax_of_all_logits():
    torch.manual_seed(0)
    weight, hidden = torch.randn(1000, 16), torch.randn(5, 16)
    assert greedy_tokens(weight, hidden, chunk_rows=64).tolist() == (hidden @ weight.T).argmax(-1).tolist()


def test_a_tie_across_slices_goes_to_the_lowest_id():
    weight = torch.zeros(10, 2)
    weight[[3, 7]] = torch.tensor([1.0, 0.0])  # rows 3 and 7 give the same, highest logit
    hidden = torch.tensor([[2.0, 1.0]])
    assert greedy_tokens(weight, hidden, chunk_rows=4).tolist() == [3]
    weight[7, 0] = 1.5
    assert greedy_tokens(weight, hidden, chunk_rows=4).tolist() == [7]
