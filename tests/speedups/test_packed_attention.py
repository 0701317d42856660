"""Per-example attention over a padding-free row gives each example what it gets alone."""

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from mathtune.speedups.packed_attention import example_starts, use_packed_attention


@pytest.mark.parametrize("positions, expected", [
    ([[0, 1, 2, 0, 1]], [0, 3]),
    ([[0, 1, 0, 0, 1, 2]], [0, 2, 3]),
    ([[0, 1, 2, 3]], None),  # one example: nothing to split
    ([[1, 2, 0, 1]], None),  # does not start at 0
    ([[0, 1, 3, 0, 1]], None),  # a gap: not a packed row
])
def test_example_starts(positions, expected):
    ids = torch.tensor(positions)
    assert example_starts(ids, ids.shape[1]) == expected


def test_example_starts_needs_one_row():
    assert example_starts(torch.tensor([[0, 1, 0], [0, 1, 0]]), 3) is None
    assert example_starts(None, 3) is None


def tiny_model(sliding_window: int) -> Gemma3ForCausalLM:
    config = Gemma3TextConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention"], attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("sliding_window", [512, 4])  # 4: the 7-token example needs its window mask
def test_packed_row_matches_examples_alone(sliding_window):
    model = tiny_model(sliding_window)
    examples = [torch.randint(0, 50, (n,)) for n in (5, 7, 3)]
    alone = [model(input_ids=e.unsqueeze(0)).logits[0] for e in examples]
    use_packed_attention(model)
    row = torch.cat(examples).unsqueeze(0)
    positions = torch.cat([torch.arange(len(e)) for e in examples]).unsqueeze(0)
    packed = model(input_ids=row, position_ids=positions).logits[0]
    torch.testing.assert_close(packed, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_generation_is_unchanged():
    model = tiny_model(512)
    prompt = torch.randint(0, 50, (2, 6))
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False)
    use_packed_attention(model)
    assert torch.equal(model.generate(prompt, max_new_tokens=5, do_sample=False), expected)


@pytest.mark.parametrize("dense_max", [1024, 0], ids=["dense-backward", "kernel-backward"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (2, 2), (4, 2)])
def test_example_flash_attention_matches_sdpa_per_example_and_keeps_its_output_once(heads, kv_heads, dense_max,
                                                                                    monkeypatch):
    from mathtune.speedups import packed_attention
    from mathtune.speedups.packed_attention import ExampleFlashAttention

    monkeypatch.setattr(packed_attention, "DENSE_BACKWARD_MAX", dense_max)

    torch.manual_seed(0)
    sizes, head_dim = [5, 9, 3], 16
    length = sum(sizes)
    query = torch.randn(1, heads, length, head_dim)
    key, value = torch.randn(1, kv_heads, length, head_dim), torch.randn(1, kv_heads, length, head_dim)
    grad = torch.randn(1, length, heads, head_dim)

    def per_example_sdpa(q, k, v):
        outputs = [torch.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True, scale=0.3,
                                                                    enable_gqa=heads != kv_heads)
                   for qp, kp, vp in zip(q.split(sizes, 2), k.split(sizes, 2), v.split(sizes, 2))]
        return torch.cat(outputs, dim=2).transpose(1, 2).contiguous()

    results = []
    for attend in (per_example_sdpa, lambda q, k, v: ExampleFlashAttention.apply(q, k, v, sizes, 0.3)):
        q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out = attend(q, k, v)
        out.backward(grad)
        # storage kept for backward, each counted once (views of one tensor share it)
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in kept}
        results.append((out.detach(), q.grad, k.grad, v.grad, storages, out.untyped_storage().data_ptr()))
    (*reference, _, _), (*ours, ours_storages, ours_output) = results
    assert torch.equal(reference[0], ours[0])  # the forward is the kernel's (float32: no padding)
    for a, b in zip(reference[1:], ours[1:]):
        if dense_max:  # the gradients from dense_backward's products: the same up to float32 rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        else:  # the kernel's own backward
            assert torch.equal(a, b)
    assert ours_output in ours_storages  # what the model reads next is what backward keeps


def test_in_bfloat16_examples_go_to_the_kernel_padded_and_give_the_same_results(monkeypatch):
    """In 16-bit dtypes every length goes to the kernel as a multiple of LENGTH_STEP (the kernel keeps what
    it builds per length); the real positions' outputs and gradients are the example's alone."""
    from mathtune.speedups import packed_attention

    seen = []
    kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    monkeypatch.setattr(packed_attention.torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                        lambda q, *rest, **kw: seen.append(q.shape[2]) or kernel(q, *rest, **kw), raising=False)
    torch.manual_seed(0)
    sizes = [5, 70, 64, 130]
    inputs = [torch.randn(1, 2, sum(sizes), 16, dtype=torch.bfloat16) for _ in range(3)]
    grad = torch.randn(1, sum(sizes), 2, 16, dtype=torch.bfloat16)
    results = []
    for padded in (True, False):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        if not padded:
            monkeypatch.setattr(packed_attention, "LENGTH_STEP", 1)
        out = packed_attention.ExampleFlashAttention.apply(q, k, v, sizes, 0.25)
        out.backward(grad)
        results.append((out.float(), q.grad.float(), k.grad.float(), v.grad.float()))
    assert seen[:4] == [64, 128, 64, 192] and seen[4:] == sizes
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)  # bfloat16: the kernel's blocks may sum in another order


@pytest.mark.parametrize("heads, kv_heads", [(4, 1), (4, 2), (3, 3)])
def test_dense_backward_gives_the_gradients_of_causal_softmax_attention(heads, kv_heads):
    """Against autograd through attention written out in float64, on one example."""
    from mathtune.speedups.packed_attention import dense_backward

    torch.manual_seed(1)
    n, head_dim, scale = 11, 8, 0.4
    query, key, value = (torch.randn(1, h, n, head_dim, dtype=torch.float64) for h in (heads, kv_heads, kv_heads))
    grad_output = torch.randn(1, n, heads, head_dim, dtype=torch.float64)

    q, k, v = (t.clone().requires_grad_() for t in (query, key, value))
    group = heads // kv_heads
    scores = q @ k.repeat_interleave(group, dim=1).transpose(-1, -2) * scale
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    output = (scores.softmax(-1) @ v.repeat_interleave(group, dim=1)).transpose(1, 2)  # [1, n, heads, d]
    output.backward(grad_output)
    logsumexp = scores.logsumexp(-1).detach()

    grads = dense_backward(grad_output.transpose(1, 2), query, key, value, output.detach().transpose(1, 2),
                           logsumexp, scale)
    for ours, expected in zip(grads, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
