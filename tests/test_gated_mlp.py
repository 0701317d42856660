"""The gated MLP product keeps fewer tensors for backward and gives the same gradients, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from mathtune.gated_mlp import GatedProduct, use_gated_product
from mathtune.models import TINY_RANDOM, load_model



def saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for backward while `run` builds its graph."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, total


@pytest.mark.parametrize("activation", ["tanh", "none", "silu"])
def test_gated_product_matches_autograd_bit_for_bit_and_keeps_two_tensors(activation):
    torch.manual_seed(0)
    gate, up, grad = torch.randn(3, 50, 64), torch.randn(3, 50, 64), torch.randn(3, 50, 64)

    def unfused(g, u):
        return (F.silu(g) if activation == "silu" else F.gelu(g, approximate=activation)) * u

    results = []
    for product in (unfused, lambda g, u: GatedProduct.apply(g, u, activation)):
        g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
        out, kept = saved_bytes(lambda: product(g, u))
        out.backward(grad)
        results.append((out.detach(), g.grad, u.grad, kept))
    (*reference, reference_kept), (*ours, ours_kept) = results
    for a, b in zip(reference, ours):
        assert torch.equal(a, b)
    assert ours_kept == 2 * gate.numel() * 4 and reference_kept == 3 * gate.numel() * 4


def test_a_model_trains_the_same_with_the_gated_product(tmp_path):
    """LoRA dropout on: the masks come in the same order, so loss and LoRA gradients are unchanged."""
    from peft import LoraConfig, get_peft_model

    runs = []
    for fused in (False, True):
        torch.manual_seed(0)  # the same LoRA weights both times
        model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(
            r=4, lora_dropout=0.1, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
        for _, module in model.named_modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight)  # nonzero, so every path carries gradient
        model.train()
        if fused:
            assert use_gated_product(model) == 2  # the tiny model's two layers
        torch.manual_seed(1)
        ids = torch.randint(4, 90, (2, 24))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name


def test_other_activations_and_mlps_are_left_alone():
    model = load_model(TINY_RANDOM, "float32")
    model.model.layers[0].mlp.act_fn = torch.nn.ReLU()
    assert use_gated_product(model) == 1
    assert "forward" not in vars(model.model.layers[0].mlp)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_a_lora_down_projection_trains_the_same_without_keeping_its_input(dropout):
    """With mathtune's LoRA branch, down_proj's input act(gate) * up is recomputed, not kept: same results, bit for bit."""
    from peft import LoraConfig, get_peft_model

    from mathtune.dropout import use_uniform_dropout
    from mathtune.fused_lora import use_fused_lora

    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(
            r=4, lora_dropout=dropout, target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
        for _, module in model.named_modules():
            if hasattr(module, "lora_B"):
                torch.nn.init.normal_(module.lora_B["default"].weight)
        model.train()
        use_uniform_dropout(model)
        use_fused_lora(model)
        if fused:
            assert use_gated_product(model) == 2
        torch.manual_seed(1)
        ids = torch.randint(4, 90, (2, 24))
        loss, kept = saved_bytes(lambda: model(input_ids=ids, labels=ids).loss)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, kept))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    config = model.get_base_model().config
    product = ids.numel() * config.intermediate_size * 4  # one act(gate) * up, float32
    down_weight = config.hidden_size * config.intermediate_size * 4  # the model's own tensor: counted, not memory
    # per layer: act(gate) not kept (GatedProduct) and act(gate) * up not kept (GatedLoraDown), and
    # GatedLoraDown holds the frozen down weight outside autograd's saved tensors
    assert kept_a - kept_b == config.num_hidden_layers * (2 * product + down_weight)


def test_a_down_projection_with_a_trained_bias_keeps_autograd():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(r=4, target_modules=["down_proj"]))
    down = model.get_base_model().model.layers[0].mlp.down_proj
    down.base_layer.bias = torch.nn.Parameter(torch.zeros(down.base_layer.out_features))
    use_gated_product(model)
    ids = torch.randint(4, 90, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert down.base_layer.bias.grad is not None
