"""LoraBranch computes what PEFT's LoRA forward computes (same masks for the same seed), values and gradients."""

import copy

import pytest
import torch

from mathtune.speedups.dropout import use_uniform_dropout
from mathtune.speedups.fused_lora import LoraBranch, plain_lora, use_fused_lora
from mathtune.models import TINY_RANDOM, load_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(dropout: float, dtype: str = "float32"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(load_model(TINY_RANDOM, dtype), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS, task_type="CAUSAL_LM"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide every path through A
            torch.nn.init.normal_(parameter, std=0.02)
    use_uniform_dropout(model)
    return model.train()


def loss_and_grads(model, ids, seed):
    torch.manual_seed(seed)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_branch_matches_peft_in_loss_and_every_gradient(dropout):
    peft_model = lora_model(dropout)
    fused_model = copy.deepcopy(peft_model)
    layers = sum(1 for _ in fused_model.base_model.model.model.layers)
    assert use_fused_lora(fused_model) == len(TARGETS) * layers
    ids = torch.randint(0, peft_model.config.vocab_size, (2, 24))
    expected_loss, expected = loss_and_grads(peft_model, ids, seed=5)
    loss, grads = loss_and_grads(fused_model, ids, seed=5)
    assert torch.allclose(loss, expected_loss, rtol=1e-5)
    assert grads.keys() == expected.keys() and len(grads) == 2 * len(TARGETS) * layers
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), name


def test_bfloat16_base_with_float32_adapter_is_fused_under_autocast_only():
    """PEFT keeps LoRA weights in float32 beside a bfloat16 model; the Trainer's bf16 runs under autocast."""
    peft_model = lora_model(0.1, "bfloat16")
    fused_model = copy.deepcopy(peft_model)
    use_fused_lora(fused_model)
    layer = fused_model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    x = torch.randn(1, 8, layer.in_features, dtype=torch.bfloat16)
    assert plain_lora(layer, x) is None  # PEFT would compute the branch in float32 here
    ids = torch.randint(0, peft_model.config.vocab_size, (2, 24))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain_lora(layer, x) == ("default", 0.1)
        expected_loss, expected = loss_and_grads(peft_model, ids, seed=5)
        loss, grads = loss_and_grads(fused_model, ids, seed=5)
    assert torch.allclose(loss, expected_loss, rtol=1e-2)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        assert torch.allclose(grad, expected[name], rtol=0.05, atol=0.05 * expected[name].abs().max()), name


def test_another_seed_draws_other_masks():
    model = lora_model(0.1)
    use_fused_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    first, _ = loss_and_grads(model, ids, seed=5)
    again, _ = loss_and_grads(model, ids, seed=5)
    other, _ = loss_and_grads(model, ids, seed=6)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_eval_mode_applies_no_dropout():
    model = lora_model(0.5)
    use_fused_lora(model)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_disabled_adapters_and_merged_weights_go_to_peft():
    model = lora_model(0.0)
    use_fused_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
    assert not torch.allclose(tuned, base)
    assert torch.allclose(merged, tuned, atol=1e-5)


def test_the_branch_saves_a_shared_input_once():
    """q, k and v read one input: their three branches keep one copy of it (plus their masks), not three."""
    x = torch.randn(64, 32, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    weights = [(torch.randn(4, 32, requires_grad=True), torch.randn(16, 4, requires_grad=True)) for _ in range(3)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        outputs = [LoraBranch.apply(x, x @ torch.randn(32, 16), a, b, 2.0, 0.1) for a, b in weights]
    float_storages = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.float32 and t.numel() >= x.numel()}
    assert float_storages == {x.untyped_storage().data_ptr()}
    sum(o.sum() for o in outputs).backward()
    assert x.grad is not None and all(a.grad is not None and b.grad is not None for a, b in weights)


def test_gradient_checkpointing_recomputes_the_same_masks():
    """Checkpointing reruns the forward in backward; the branch must draw the masks it drew the first time."""
    model = lora_model(0.1)
    use_fused_lora(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    expected_loss, expected = loss_and_grads(model, ids, seed=7)
    model.gradient_checkpointing_enable({"use_reentrant": False})
    loss, grads = loss_and_grads(model, ids, seed=7)
    assert torch.allclose(loss, expected_loss, rtol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, expected[name], rtol=1e-4, atol=1e-7), name
