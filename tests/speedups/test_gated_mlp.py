"""The gated MLP product keeps fewer tensors for backward and gives the same gradients, bit for bit."""

import pytest
import torch
import torch.nn.functional as F

from mathtune.speedups.gated_mlp import GatedProduct, use_gated_mlp
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
            assert use_gated_mlp(model) == 2  # the tiny model's two layers
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
    assert use_gated_mlp(model) == 1
    assert "forward" not in vars(model.model.layers[0].mlp)


def kept_storage_bytes(run, parameters) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `run` builds its graph, parameters left out."""
    storages = {}
    skip = {p.untyped_storage().data_ptr() for p in parameters}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, sum(storages.values())


def tiny_lora_model(dropout: float, targets: list[str]):
    from peft import LoraConfig, get_peft_model

    from mathtune.speedups.dropout import use_uniform_dropout
    from mathtune.speedups.fused_lora import use_fused_lora

    torch.manual_seed(0)
    model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(r=4, lora_dropout=dropout,
                                                                           target_modules=targets))
    for _, module in model.named_modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)
    model.train()
    use_uniform_dropout(model)
    use_fused_lora(model)
    return model


@pytest.mark.parametrize("dropout", [0.1, 0.0])
@pytest.mark.parametrize("targets", [["gate_proj", "up_proj", "down_proj", "q_proj"], ["down_proj", "q_proj"],
                                     ["up_proj", "q_proj"]])
def test_the_mlp_trains_the_same_keeping_neither_gate_nor_up(dropout, targets):
    """GatedLoraMLP recomputes gate and up in backward: the same loss, the same gradients (up to the order of
    a sum), and per layer gate, act(gate), up and (for down's LoRA branch) the product not kept, for x kept
    where neither gate nor up has a LoRA branch (which would keep it anyway)."""
    runs = []
    for fused in (False, True):
        model = tiny_lora_model(dropout, targets)
        if fused:
            assert use_gated_mlp(model) == 2  # the tiny model's two layers
        torch.manual_seed(1)
        ids = torch.randint(4, 90, (2, 24))
        loss, kept = kept_storage_bytes(lambda: model(input_ids=ids, labels=ids).loss, model.parameters())
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, kept))
    (loss_a, grads_a, kept_a), (loss_b, grads_b, kept_b) = runs
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-6, msg=name)
    config = model.get_base_model().config
    intermediate = ids.numel() * config.intermediate_size * 4  # float32
    x = 0 if {"gate_proj", "up_proj"} & set(targets) else ids.numel() * config.hidden_size * 4
    product = intermediate if "down_proj" in targets else 0
    assert kept_a - kept_b == config.num_hidden_layers * (3 * intermediate + product - x)


def test_the_recomputed_mlp_runs_in_bfloat16_under_autocast(monkeypatch):
    """As the Trainer runs a bf16 model: float32 LoRA weights cast to bf16, gradients close to PEFT's own path."""
    from mathtune.speedups import gated_mlp

    calls = []
    apply = gated_mlp.GatedLoraMLP.apply
    monkeypatch.setattr(gated_mlp.GatedLoraMLP, "apply", lambda *args: calls.append(1) or apply(*args))
    grads = []
    for fused in (False, True):
        model = tiny_lora_model(0.0, ["gate_proj", "up_proj", "down_proj"])
        model.get_base_model().to(torch.bfloat16)
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()
        if fused:
            use_gated_mlp(model)
        ids = torch.randint(4, 90, (2, 24))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    for name in grads[0]:
        assert grads[1][name].dtype == torch.float32
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0.02, atol=1e-3, msg=name)
    assert len(calls) == 2  # both layers of the fused run went through GatedLoraMLP


def test_a_down_projection_with_a_trained_bias_keeps_autograd():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(TINY_RANDOM, "float32"), LoraConfig(r=4, target_modules=["down_proj"]))
    down = model.get_base_model().model.layers[0].mlp.down_proj
    down.base_layer.bias = torch.nn.Parameter(torch.zeros(down.base_layer.out_features))
    use_gated_mlp(model)
    ids = torch.randint(4, 90, (1, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert down.base_layer.bias.grad is not None
