import pytest
import torch
from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

from mathtune.speedups.rms_norm import use_gemma_rms_norm


def norms(dtype, weight_grad):
    torch.manual_seed(0)
    reference = Gemma3RMSNorm(48, eps=1e-6).to(dtype)
    with torch.no_grad():
        reference.weight.normal_(0, 0.5)
    reference.weight.requires_grad_(weight_grad)
    ours = Gemma3RMSNorm(48, eps=1e-6).to(dtype)
    ours.load_state_dict(reference.state_dict())
    ours.weight.requires_grad_(weight_grad)
    assert use_gemma_rms_norm(ours) == 1
    return reference, ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_same_output_and_gradients_as_transformers(dtype, weight_grad):
    reference, ours = norms(dtype, weight_grad)
    x = (torch.randn(3, 5, 48) * 4).to(dtype)
    upstream = torch.randn(3, 5, 48).to(dtype)
    outputs, grads = [], []
    for norm in (reference, ours):
        leaf = x.clone().requires_grad_()
        out = norm(leaf)
        (out + leaf).backward(upstream)  # a residual connection: both branches get the same gradient tensor
        outputs.append(out)
        grads.append((leaf.grad, norm.weight.grad))
    assert outputs[1].dtype == dtype
    assert torch.equal(outputs[0], outputs[1])  # forward: the same operations in the same order
    tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grads[1][0], grads[0][0], **tolerance)
    if weight_grad:
        torch.testing.assert_close(grads[1][1], grads[0][1], **tolerance)
    else:
        assert grads[1][1] is None


def kept_for_backward(norm, x):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = norm(x)
    return out, [t for t in saved if not isinstance(t, torch.nn.Parameter)]


def test_keeps_only_its_output_and_one_number_per_row():
    """The output is what the next layer keeps anyway: the norm adds four bytes a row of its own."""
    _, ours = norms(torch.bfloat16, False)
    out, kept = kept_for_backward(ours, torch.randn(7, 48, dtype=torch.bfloat16, requires_grad=True))
    assert sum(t.numel() * t.element_size() for t in kept) == 7 * 48 * 2 + 7 * 4
    assert any(t.untyped_storage().data_ptr() == out.untyped_storage().data_ptr() for t in kept)


def test_where_one_plus_w_is_zero_the_input_is_kept_there_and_gradients_are_the_same():
    """The output is 0 in such a column, but the input there still moves the rms: its column is kept."""
    reference, ours = norms(torch.float32, True)
    with torch.no_grad():
        for norm in (reference, ours):
            norm.weight[[5, 30]] = -1.0
    x = torch.randn(7, 48, requires_grad=True)
    out, kept = kept_for_backward(ours, x)
    assert sum(t.numel() * t.element_size() for t in kept) == 7 * 48 * 4 + 7 * 4 + 2 * 8 + 7 * 2 * 4
    upstream = torch.randn(7, 48)
    out.backward(upstream)
    ours_grads = (x.grad.clone(), ours.weight.grad)
    x.grad = None
    reference(x).backward(upstream)
    torch.testing.assert_close(ours_grads[0], x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_grads[1], reference.weight.grad, rtol=1e-5, atol=1e-5)


def test_other_norm_classes_are_left_alone():
    model = torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.RMSNorm(8))
    assert use_gemma_rms_norm(model) == 0
