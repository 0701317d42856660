"""The loss-positions LM head computes exactly what full logits and cross-entropy compute."""

import pytest
import torch
import torch.nn.functional as F

from mathtune.speedups.lm_loss import (
    LinearCrossEntropy, install_loss_head, loss_positions_head, supports_loss_head, trl_head_is_compact,
)
from mathtune.models import TINY_RANDOM, load_model


def reference(hidden, weight, targets, softcap=None):
    logits = hidden @ weight.t()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("vocab_slice", [1, 3, 64])
def test_losses_hits_and_gradient_match_full_logits(softcap, vocab_slice):
    torch.manual_seed(0)
    hidden = torch.randn(5, 4, dtype=torch.float64)
    weight = torch.randn(7, 4, dtype=torch.float64)
    targets = torch.tensor([0, 6, 3, 3, 1])
    scale = torch.tensor([1.0, 0.5, 2.0, 0.0, -1.0], dtype=torch.float64)  # per-position gradient weights

    ours_hidden = hidden.clone().requires_grad_()
    losses, hits = LinearCrossEntropy.apply(ours_hidden, weight, targets, softcap, vocab_slice)
    (losses.double() * scale).sum().backward()

    ref_hidden = hidden.clone().requires_grad_()
    ref_losses, ref_hits = reference(ref_hidden, weight, targets, softcap)
    (ref_losses * scale).sum().backward()

    torch.testing.assert_close(losses.double(), ref_losses.detach(), rtol=1e-6, atol=1e-6)
    assert hits.tolist() == ref_hits.tolist()
    torch.testing.assert_close(ours_hidden.grad, ref_hidden.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bfloat16_products_stay_close_to_float64(softcap):
    """16-bit weights: the products run in bfloat16, the softmax and the sums over slices in float32."""
    torch.manual_seed(0)
    hidden = torch.randn(9, 64).bfloat16()
    weight = (torch.randn(300, 64) / 4).bfloat16()
    targets = torch.randint(0, 300, (9,))
    ours_hidden = hidden.clone().requires_grad_()
    losses, _ = LinearCrossEntropy.apply(ours_hidden, weight, targets, softcap, 32)
    losses.sum().backward()
    ref_hidden = hidden.double().requires_grad_()
    ref_losses, _ = reference(ref_hidden, weight.double(), targets, softcap)
    ref_losses.sum().backward()
    assert losses.dtype == torch.float32 and ours_hidden.grad.dtype == torch.bfloat16
    torch.testing.assert_close(losses.double(), ref_losses.detach(), rtol=0, atol=0.01)
    torch.testing.assert_close(ours_hidden.grad.double(), ref_hidden.grad, rtol=0, atol=0.01)


def test_a_tie_with_an_earlier_word_is_not_a_hit():
    weight = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])  # words 1 and 2 always tie
    hidden = torch.tensor([[2.0, 0.0], [2.0, 0.0]])
    for vocab_slice in (1, 2, 8):  # the tie within a slice and across slices
        _, hits = LinearCrossEntropy.apply(hidden, weight, torch.tensor([1, 2]), None, vocab_slice)
        assert hits.tolist() == [True, False]


@pytest.mark.parametrize("vocab_slice", [1, 2, 5, 16, 64])
def test_hits_are_first_arg_maxima_with_ties_across_and_within_slices(vocab_slice):
    torch.manual_seed(1)
    weight = torch.randint(-2, 3, (40, 3)).float()  # small integers: many words tie at the maximum
    hidden = torch.randint(-2, 3, (30, 3)).float()
    logits = hidden @ weight.t()
    first_best = logits.argmax(dim=1)  # torch gives the first maximum
    tied = [int(torch.nonzero(row == row.max())[-1]) for row in logits]  # the last of the tied words
    targets = torch.stack([first_best[:10], torch.tensor(tied[10:20]), torch.randint(0, 40, (10,))]).flatten()
    expected = (first_best == targets).tolist()
    _, hits = LinearCrossEntropy.apply(hidden, weight, targets, None, vocab_slice)
    assert hits.tolist() == expected
    assert any(expected) and not all(expected)


def test_the_head_weight_must_be_frozen():
    weight = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        LinearCrossEntropy.apply(torch.randn(2, 2), weight, torch.tensor([0, 1]), None, 8)


def test_only_loss_bearing_positions_are_scored():
    torch.manual_seed(1)
    head = torch.nn.Linear(4, 9, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 5, 4)
    labels = torch.tensor([[-100, -100, 3, 4, 8], [-100, 2, -100, 0, 1]])
    out = loss_positions_head(hidden, labels, head.weight, vocab_slice=2)
    assert out.mask.tolist() == [[False, True, True, True], [True, False, True, True]]
    full_losses = F.cross_entropy(head(hidden[:, :-1]).transpose(1, 2), labels[:, 1:], reduction="none")
    torch.testing.assert_close(out.losses, full_losses * out.mask)
    assert not out.hits[~out.mask].any()


def test_installed_head_gives_the_models_own_loss():
    model = load_model(TINY_RANDOM, "float32")
    assert not supports_loss_head(model)  # a trainable head is left to the model's own forward
    model.requires_grad_(False)  # as LoRA leaves it
    assert supports_loss_head(model)
    model.config.logits_scaling = 4.0
    assert not supports_loss_head(model)  # scaled logits: the model's own forward
    model.config.logits_scaling = None
    install_loss_head(model)
    torch.manual_seed(2)
    input_ids = torch.randint(3, 90, (2, 12))
    labels = input_ids.clone()
    labels[:, :5] = -100
    expected = model(input_ids=input_ids, labels=labels).loss
    out = model(input_ids=input_ids, labels=labels, loss_head=True)
    torch.testing.assert_close(out.losses.sum() / out.mask.sum(), expected, rtol=1e-5, atol=1e-6)
    assert model(input_ids=input_ids).logits.shape == (2, 12, model.config.vocab_size)  # other calls unchanged


def test_trls_head_is_used_only_where_it_scores_loss_positions_alone(monkeypatch):
    """TRL's fused head compacts to loss-bearing positions where Triton runs on CUDA or XPU; elsewhere ours is used."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_triton_available", lambda: True)
    assert trl_head_is_compact(torch.device("cuda"))
    assert not trl_head_is_compact(torch.device("cpu"))
    monkeypatch.setattr(transformers.utils, "is_triton_available", lambda: False)
    assert not trl_head_is_compact(torch.device("cuda"))
