"""speedups.onednn_attention: oneDNN's bfloat16 products with float32 results, and attention from them.

Products of small multiples of 1/4 are exact in bfloat16 and in float32, so the products are
compared for equality; attention is compared with a float64 reference on bfloat16 inputs: its
scores and sums are float32 (log-sum-exp off by float32 rounding only), its probabilities are
rounded to bfloat16 for the second product (the output off by up to 2^-8 of the values' size).
"""

from __future__ import annotations

import pytest
import torch

from mathtune import speedups
from mathtune.speedups import onednn_attention

needs_onednn = pytest.mark.skipif(not onednn_attention.available(),
                                  reason=f"oneDNN not loadable here: {onednn_attention.why_unavailable()}")


def quarters(*shape, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(-8, 9, shape, generator=generator) / 4).to(torch.bfloat16)


def reference(query, key, value, mask, scale):
    scores = query.double() @ key.double().transpose(-1, -2) * scale
    if mask is not None:
        scores = scores + mask.double()
    lse = scores.logsumexp(-1)
    probs = (scores - lse[..., None]).exp().nan_to_num(0.0)
    return probs @ value.double(), lse


@needs_onednn
def test_products_are_exact_on_strided_batched_views():
    cache = quarters(3, 2, 10, 16, seed=1)  # [rows, heads, capacity, dim]: read up to 7 positions
    query = quarters(3, 2, 4, 16, seed=2)
    keys = cache[:, :, :7]
    got = onednn_attention.matmul(query, keys.transpose(-1, -2))
    assert got.dtype == torch.float32 and got.shape == (3, 2, 4, 7)
    assert torch.equal(got, query.float() @ keys.float().transpose(-1, -2))


@needs_onednn
def test_products_keep_float32_where_bfloat16_products_round():
    a = torch.tensor([[1.0, 2.0**-8]], dtype=torch.bfloat16)  # 1 + 2^-8 is not a bfloat16
    b = torch.tensor([[1.0], [1.0]], dtype=torch.bfloat16)
    assert onednn_attention.matmul(a, b).item() == 1 + 2.0**-8
    assert (a @ b).item() == 1.0


@needs_onednn
def test_products_refuse_other_dtypes():
    with pytest.raises(TypeError, match="bfloat16"):
        onednn_attention.matmul(torch.ones(2, 2), torch.ones(2, 2))


@needs_onednn
@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_the_float64_softmax(masked):
    rows, heads, queries, keys, dim = 3, 2, 5, 9, 16
    query, value = quarters(rows, heads, queries, dim, seed=3), quarters(rows, heads, 12, dim, seed=4)[:, :, :keys]
    key = quarters(rows, heads, 12, dim, seed=5)[:, :, :keys]
    mask = None
    if masked:  # each row sees a different number of keys; row 1's query 0 sees none
        seen = torch.arange(keys) < torch.tensor([9, 4, 6])[:, None, None]
        seen = seen.expand(rows, queries, keys).clone()
        seen[1, 0] = False
        mask = torch.zeros(rows, 1, queries, keys, dtype=torch.bfloat16).masked_fill_(~seen[:, None], float("-inf"))
    out, lse = onednn_attention.attention(query, key, value, mask, scale=0.25)
    expected_out, expected_lse = reference(query, key, value, mask, 0.25)
    assert out.dtype == lse.dtype == torch.float32
    seen_any = expected_lse.isfinite()
    assert torch.allclose(lse.double()[seen_any], expected_lse[seen_any], atol=1e-5)
    assert torch.allclose(out.double(), expected_out, atol=2 * 2.0**-8)
    if masked:
        assert lse[1, :, 0].eq(float("-inf")).all() and out[1, :, 0].eq(0).all()


@needs_onednn
def test_chunks_give_what_one_pass_gives(monkeypatch):
    """A shared mask ([1, 1, M, N]) and queries split into chunks of scores, in rows and then in queries;
    a wrong slice of the mask or of the output would be off by far more than the tolerance."""
    query, key, value = quarters(2, 1, 40, 16, seed=6), quarters(2, 1, 24, 16, seed=7), quarters(2, 1, 24, 16, seed=8)
    seen = torch.rand(40, 24, generator=torch.Generator().manual_seed(9)) > 0.3
    mask = torch.zeros(1, 1, 40, 24, dtype=torch.bfloat16).masked_fill_(~seen, float("-inf"))
    whole = onednn_attention.attention(query, key, value, mask, 0.5)
    for budget in (40 * 24 * 4, 7 * 24 * 4):  # one row at a time; then 7 queries at a time
        monkeypatch.setattr(onednn_attention, "SCORES_BYTES", budget)
        parts = onednn_attention.attention(query, key, value, mask, 0.5)
        # the same up to float32 rounding (a product's or exp's vector kernel can differ with the shape)
        torch.testing.assert_close(parts, whole, rtol=1e-5, atol=1e-6)


@needs_onednn
def test_attention_is_closer_to_float64_than_torchs_flash_kernel():
    """Gemma's decoding shapes, small: 4 queries a row and key, 256-wide heads, random values."""
    generator = torch.Generator().manual_seed(10)
    query = torch.randn(8, 1, 4, 256, generator=generator).to(torch.bfloat16)
    key = torch.randn(8, 1, 300, 256, generator=generator).to(torch.bfloat16)
    value = torch.randn(8, 1, 300, 256, generator=generator).to(torch.bfloat16)
    expected_out, expected_lse = reference(query, key, value, None, 1 / 16)
    out, lse = onednn_attention.attention(query, key, value, None, 1 / 16)
    flash_out, flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=1 / 16)
    assert (lse.double() - expected_lse).abs().max() <= (flash_lse.double() - expected_lse).abs().max()
    assert (out.double() - expected_out).abs().max() <= (flash_out.double() - expected_out).abs().max()


def test_library_paths_put_the_environment_variable_first(monkeypatch):
    monkeypatch.setenv(onednn_attention.ENV, "/somewhere/libdnnl.so.3")
    paths = onednn_attention.library_paths()
    assert paths[0] == "/somewhere/libdnnl.so.3" and paths[1].endswith("lib/libdnnl.so.3")


def test_a_missing_library_is_reported_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(onednn_attention, "_library", None)
    monkeypatch.setattr(onednn_attention, "_failure", None)
    monkeypatch.setattr(onednn_attention, "library_paths", lambda: [str(tmp_path / "libdnnl.so.3")])
    assert not onednn_attention.available()
    assert "libdnnl.so.3: not found" in onednn_attention.why_unavailable()
    with pytest.raises(RuntimeError, match="not available"):
        onednn_attention.matmul(quarters(2, 2), quarters(2, 2))


class Tiny(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=dtype))

    @property
    def device(self):
        return self.weight.device

    @property
    def dtype(self):
        return self.weight.dtype


def test_decoding_attention_is_for_bfloat16_on_cpus_with_the_flag(monkeypatch):
    monkeypatch.setattr(onednn_attention, "available", lambda: True)
    assert speedups.decoding_attention(Tiny(torch.bfloat16)) is onednn_attention.attention
    assert speedups.decoding_attention(Tiny(torch.float32)) is None  # torch's kernel is float32 already
    assert speedups.decoding_attention(Tiny(torch.bfloat16), speedups.Flags(onednn_attention=False)) is None
    monkeypatch.setattr(onednn_attention, "available", lambda: False)
    assert speedups.decoding_attention(Tiny(torch.bfloat16)) is None
