"""Generation from LoRA merged into temporary weights: the merged model's logits, and the training model
back as it was afterwards."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from mathtune import speedups
from mathtune.models import TINY_RANDOM, load_model
from mathtune.speedups.merged_lora import merged_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dtype: str):
    torch.manual_seed(0)  # the same LoRA weights every time
    model = get_peft_model(load_model(TINY_RANDOM, dtype), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.1, target_modules=TARGETS))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.5)  # nonzero: the adapter changes the outputs
    return model


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("patched", [False, True], ids=["PEFT's layers", "with mathtune's speed-ups"])
def test_logits_equal_merge_and_unload_and_the_layers_come_back(dtype, patched):
    model = lora_model(dtype)
    if patched:
        applied = speedups.apply(model)
        assert applied["fused_lora"] and applied["gated_mlp"]
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    reference = lora_model(dtype).merge_and_unload().eval()
    with torch.no_grad():
        before = model(input_ids=ids).logits
        weights = {name: p.clone() for name, p in model.named_parameters()}
        with merged_lora(model) as merged:
            inside = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits
    assert merged == len(TARGETS) * model.config.num_hidden_layers
    assert torch.equal(inside, expected)
    assert not torch.equal(before, expected)  # (the test would pass vacuously if merging changed nothing)
    assert torch.equal(after, before)
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())


def test_refused_in_training_mode():
    model = lora_model("float32")
    model.train()
    with pytest.raises(ValueError, match="eval mode"), merged_lora(model):
        pass


def test_for_generation_follows_the_flag():
    model = lora_model("float32").eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with speedups.for_generation(model, speedups.Flags(merged_lora=False)) as merged:
            assert merged is None
            assert torch.equal(model(input_ids=ids).logits, before)
        with speedups.for_generation(model) as merged:
            assert merged == len(TARGETS) * model.config.num_hidden_layers
