"""A decoder whose bfloat16 Linears multiply by weights reordered once gives the same numbers, and is restored."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mathtune.generation.packed_linears import packable, packed_linears

needs_mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not built in")


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = torch.nn.Linear(64, 96, bias=False)
        self.up = torch.nn.Linear(96, 80, bias=True)
        self.norm = torch.nn.LayerNorm(80)

    def forward(self, x):
        return self.norm(self.up(torch.relu(self.q_proj(x))))


def block(dtype=torch.bfloat16) -> Block:
    torch.manual_seed(0)
    return Block().to(dtype).eval()


@needs_mkldnn
@pytest.mark.parametrize("shape", [(5, 64), (3, 7, 64), (1, 1, 64)], ids=["2-d", "3-d", "one row"])
def test_the_same_values_as_plain_products(shape):
    model = block()
    x = torch.randn(shape).to(torch.bfloat16)
    with torch.inference_mode():
        plain = model(x)
        with packed_linears(model, rows=5) as count:
            packed = model(x)
    assert count == 2
    assert torch.equal(packed, plain)


@needs_mkldnn
def test_the_layers_are_restored_after_the_block():
    model = block()
    with packed_linears(model) as count:
        assert count == 2 and "forward" in vars(model.q_proj)
    assert "forward" not in vars(model.q_proj) and "forward" not in vars(model.up)
    x = torch.randn(2, 64).to(torch.bfloat16)
    model.q_proj.weight.data.zero_()  # the layer reads its own weight again, not the reordered copy
    assert torch.equal(model.q_proj(x), torch.zeros(2, 96, dtype=torch.bfloat16))


def test_float32_layers_are_left_alone():
    model = block(torch.float32)
    with packed_linears(model) as count:
        assert count == 0 and "forward" not in vars(model.q_proj)


def test_an_adapters_layers_are_left_alone():
    model = get_peft_model(block(), LoraConfig(r=4, target_modules=["q_proj"]))
    names = {name for name, module in model.named_modules() if packable(name, module)}
    assert names and all("q_proj" not in name for name in names)  # up is packable; q_proj's layers are LoRA's
    assert any(name.endswith("up") for name in names)
