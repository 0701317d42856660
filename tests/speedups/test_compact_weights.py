"""Compact frozen weights give back every value exactly, and are used only where they save memory."""

import sys

import pytest
import torch

from mathtune.speedups.compact_weights import (
    Bfloat16Rows, Int8BlockRows, as_int8_blocks, compact_rounded_rows, compact_rows, hand_back_file_pages,
    use_compact_base_weights,
)
from mathtune.speedups.dropout import use_uniform_dropout
from mathtune.speedups.fused_lora import use_fused_lora
from mathtune.speedups.gated_mlp import use_gated_mlp
from mathtune.speedups.lm_loss import LinearCrossEntropy, compact_lookup, install_loss_head
from mathtune.model_cache import PACKAGED_DIR_NAME, float32_original
from mathtune.models import TINY_RANDOM, load_model

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def q8_0_values(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """float32 values as GGUF's Q8_0 dequantization makes them: int8 codes (largest +-127) x float16 scales."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, width // 32, 32), generator=generator)
    codes[:, :, 0] = 127 * torch.sign(torch.randn(rows, width // 32, generator=generator)).clamp(min=0).mul(2).sub(1)
    scales = torch.rand(rows, width // 32, 1, generator=generator).mul(0.01).half().float()
    return (codes.float() * scales).reshape(rows, width)


def q5_0_values(rows: int, width: int, seed: int = 0) -> torch.Tensor:
    """float32 values as GGUF's Q5_0 dequantization makes them: codes -16 to 15 (a block's largest value
    has -16) x float16 scales of either sign."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(-15, 16, (rows, width // 32, 32), generator=generator)
    codes[:, :, 0] = -16
    scales = torch.rand(rows, width // 32, 1, generator=generator).sub(0.5).mul(0.02).half().float()
    return (codes.float() * scales).reshape(rows, width)


def mapped(values: torch.Tensor, path) -> torch.Tensor:
    """The values read back through a private file mapping, as transformers memory-maps float32 safetensors."""
    values.numpy().tofile(path)
    return torch.from_file(str(path), shared=False, size=values.numel(), dtype=values.dtype).view(values.shape)


def mapped_bfloat16(values: torch.Tensor, path) -> torch.Tensor:
    """mapped() for bfloat16 values (numpy has no bfloat16: their bits go through int16)."""
    values.view(torch.int16).numpy().tofile(path)
    return torch.from_file(str(path), shared=False, size=values.numel(), dtype=torch.bfloat16).view(values.shape)


def resident_kb(tensor: torch.Tensor) -> int:
    address = tensor.data_ptr()
    inside = False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if not fields[0].endswith(":"):
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            inside = low <= address < high
        elif inside and fields[0] == "Rss:":
            return int(fields[1])
    raise AssertionError("no mapping holds the tensor")


def test_int8_blocks_give_back_q8_0_values_exactly():
    values = q8_0_values(40, 64)
    codes, scales = as_int8_blocks(values)
    assert codes.dtype == torch.int8 and scales.shape == (40, 2)
    rows = Int8BlockRows(codes, scales, torch.float32)
    assert torch.equal(rows[0:40], values)
    assert torch.equal(rows[7:9], values[7:9])
    index = torch.tensor([3, 3, 0, 39])
    assert torch.equal(rows[index], values[index])


def test_int8_blocks_give_back_q5_0_values_and_mixed_blocks_exactly():
    values = torch.cat([q5_0_values(20, 64), q8_0_values(20, 64)])
    values[3, :32] = 0.0  # a block of zeros
    codes, scales = as_int8_blocks(values)
    assert torch.equal(Int8BlockRows(codes, scales, torch.float32)[0:40], values)
    assert codes[:20].abs().max() == 16 and codes[20:].abs().max() == 127


def test_values_off_the_int8_grid_are_refused():
    values = q8_0_values(4, 64)
    values[2, 5] += 1e-4
    assert as_int8_blocks(values) is None
    assert as_int8_blocks(torch.randn(4, 64)) is None
    assert as_int8_blocks(torch.zeros(4, 48)) is None  # not whole blocks


@linux_only
def test_a_mapped_q8_0_weight_is_kept_as_int8_and_its_pages_go_back(tmp_path, monkeypatch):
    monkeypatch.setattr("mathtune.speedups.compact_weights.CHECK_ROWS", 1000)  # several pieces
    values = q8_0_values(4096, 256)
    weight = mapped(values, tmp_path / "weight.bin")
    assert float(weight.sum()) == float(values.sum())  # read: every page resident
    assert resident_kb(weight) >= 4096 * 256 * 4 // 1024 - 8
    rows = compact_rows(weight)
    assert isinstance(rows, Int8BlockRows)
    assert torch.equal(rows[0:4096], values)
    assert resident_kb(weight) <= 16  # handed back, but for pages shared by two pieces
    assert torch.equal(weight, values)  # and read again from the file unchanged


@linux_only
def test_a_mapped_bfloat16_valued_weight_is_kept_in_bfloat16(tmp_path):
    values = torch.randn(300, 40).to(torch.bfloat16).to(torch.float32)
    rows = compact_rows(mapped(values, tmp_path / "weight.bin"))
    assert isinstance(rows, Bfloat16Rows) and rows.values.dtype == torch.bfloat16
    assert torch.equal(rows[0:300], values)
    assert torch.equal(rows[torch.tensor([5, 1])], values[[5, 1]])


@linux_only
def test_weights_that_would_not_save_memory_are_left_alone(tmp_path):
    values = q8_0_values(64, 64)
    assert compact_rows(values.clone()) is None  # ordinary memory: a copy would add to it
    written = mapped(values, tmp_path / "written.bin")
    written[0, 0] = written[0, 0] * 1  # a page written to no longer matches the file
    assert compact_rows(written) is None
    assert compact_rows(mapped(torch.randn(64, 64), tmp_path / "random.bin")) is None  # neither form
    mixed = q8_0_values(64, 64)
    mixed[63, 0] += 1e-4
    assert compact_rows(mapped(mixed, tmp_path / "mixed.bin")) is None


@linux_only
def test_a_bfloat16_copy_of_q8_0_values_is_kept_as_their_int8_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("mathtune.speedups.compact_weights.CHECK_ROWS", 1000)  # several pieces
    values = q8_0_values(4096, 256)
    exact = mapped(values, tmp_path / "exact.bin")
    rounded = values.to(torch.bfloat16)
    weight = mapped_bfloat16(rounded, tmp_path / "weight.bin")
    rows = compact_rounded_rows(weight, exact)
    assert isinstance(rows, Int8BlockRows) and rows.codes.dtype == torch.int8
    assert torch.equal(rows[0:4096], rounded)
    assert torch.equal(rows[torch.tensor([7, 3])], rounded[[7, 3]])
    assert resident_kb(weight) <= 16 and resident_kb(exact) <= 16  # both read, both handed back
    assert compact_rounded_rows(weight, None) is None
    assert compact_rounded_rows(rounded.clone(), exact) is None  # ordinary memory: a copy would add to it
    other = rounded.clone()
    other[4095, 255] = other[4095, 255] + 1  # not the rounding of those values
    assert compact_rounded_rows(mapped_bfloat16(other, tmp_path / "other.bin"), exact) is None


def test_a_bfloat16_copy_of_the_packaged_model_finds_its_float32_original(tmp_path, monkeypatch):
    """float32_original maps the float32 copy's tensor for a 16-bit copy under the cache; nothing for other models."""
    monkeypatch.setattr("mathtune.model_cache.CACHE_DIR", tmp_path)
    model = load_model(TINY_RANDOM, "float32")
    model.save_pretrained(tmp_path / PACKAGED_DIR_NAME)
    model.to(torch.bfloat16).save_pretrained(tmp_path / f"{PACKAGED_DIR_NAME}-bfloat16")
    copy = load_model(str(tmp_path / f"{PACKAGED_DIR_NAME}-bfloat16"), "bfloat16")
    head = copy.get_output_embeddings().weight  # tied: stored as the embedding
    original = float32_original(copy, head)
    assert original.dtype == torch.float32 and torch.equal(original.to(torch.bfloat16), head)
    assert float32_original(load_model(TINY_RANDOM, "bfloat16"), head) is None


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_the_loss_head_gives_the_same_results_from_the_compact_weight(softcap):
    torch.manual_seed(0)
    weight = q8_0_values(300, 64)
    hidden = torch.randn(6, 64)
    targets = torch.tensor([0, 299, 17, 17, 128, 5])
    results = []
    for head_weight in (weight, Int8BlockRows(*as_int8_blocks(weight), torch.float32)):
        leaf = hidden.clone().requires_grad_()
        losses, hits = LinearCrossEntropy.apply(leaf, head_weight, targets, softcap, 64)
        losses.sum().backward()
        results.append((losses, hits, leaf.grad))
    for dense, compact in zip(*results):
        assert torch.equal(dense, compact)


PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_step(model_dir, compact: bool):
    """One LoRA training step (dropout on, CPU fast paths) of the model in model_dir: loss, LoRA gradients, model."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same LoRA weights both times
    model = get_peft_model(load_model(str(model_dir), "float32"),
                           LoraConfig(r=4, lora_dropout=0.1, target_modules=PROJECTIONS))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight)  # nonzero, so every path carries gradient
    model.train()
    use_uniform_dropout(model)
    use_fused_lora(model)
    use_gated_mlp(model)
    if compact:
        assert use_compact_base_weights(model) == 2 * len(PROJECTIONS)  # the tiny model's two layers
    torch.manual_seed(1)
    ids = torch.randint(4, 90, (2, 24))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}, model


@linux_only
def test_lora_training_gives_the_same_results_from_compact_base_weights(tmp_path):
    model = load_model(TINY_RANDOM, "float32")
    for i, (name, module) in enumerate(model.named_modules()):
        if name.rsplit(".", 1)[-1] in PROJECTIONS:
            module.weight.data = (q5_0_values if i % 2 else q8_0_values)(*module.weight.shape, seed=i)
    model.save_pretrained(tmp_path / "model")

    loss_a, grads_a, dense_model = lora_step(tmp_path / "model", compact=False)
    loss_b, grads_b, compact_model = lora_step(tmp_path / "model", compact=True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name

    def resident(model):  # of the checkpoint file's mapping, which holds every weight
        return resident_kb(model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight)

    dense_kb, compact_kb = resident(dense_model), resident(compact_model)
    assert compact_kb < dense_kb / 2  # the projections' float32 pages were not read while training
    compact_model.eval()
    with torch.no_grad():  # validation and generation use the compact weights too
        assert torch.equal(compact_model(input_ids=torch.tensor([[5, 6, 7]])).logits,
                           dense_model.eval()(input_ids=torch.tensor([[5, 6, 7]])).logits)
    assert resident(compact_model) <= compact_kb


def test_a_tied_embedding_is_looked_up_in_the_heads_compact_rows():
    model = load_model(TINY_RANDOM, "float32")
    embedding = model.get_input_embeddings()
    assert embedding.weight is model.get_output_embeddings().weight  # tied, as Gemma's
    embedding.weight.data = q8_0_values(*embedding.weight.shape)
    rows = Int8BlockRows(*as_int8_blocks(embedding.weight.data), torch.float32)
    lookup = compact_lookup(model, rows)
    ids = torch.tensor([[0, 5, embedding.num_embeddings - 1], [3, 3, 1]])
    assert torch.equal(lookup(ids), embedding(ids))  # Gemma's embed_scale applied as the module applies it
    other = Int8BlockRows(*as_int8_blocks(q8_0_values(*embedding.weight.shape, seed=1)), torch.float32)
    assert compact_lookup(model, other) is None  # rows of other values: the module's own lookup
    assert compact_lookup(model, embedding.weight) is None  # no compact form: nothing to gain


@linux_only
def test_the_loss_head_reads_a_tied_embedding_from_its_compact_rows(tmp_path):
    model = load_model(TINY_RANDOM, "float32")
    embedding = model.get_input_embeddings()
    embedding.weight.data = q8_0_values(*embedding.weight.shape)
    model.save_pretrained(tmp_path / "model")
    model = load_model(str(tmp_path / "model"), "float32").requires_grad_(False)  # memory-mapped: kept compact
    torch.manual_seed(3)
    ids = torch.randint(3, 90, (2, 12))
    labels = ids.clone()
    labels[:, :4] = -100
    expected = model(input_ids=ids, labels=labels).loss
    install_loss_head(model)
    embedding, calls = model.get_input_embeddings(), []
    module_forward = embedding.forward
    embedding.forward = lambda *args: calls.append(1) or module_forward(*args)
    out = model(input_ids=ids, labels=labels, loss_head=True)
    torch.testing.assert_close(out.losses.sum() / out.mask.sum(), expected, rtol=1e-5, atol=1e-6)
    assert calls == []  # the lookup came from the compact rows
    embedding.register_forward_hook(lambda *args: None)  # as PEFT's, for gradient checkpointing
    again = model(input_ids=ids, labels=labels, loss_head=True)
    assert calls == [1] and torch.equal(again.losses, out.losses)  # hooked: the module itself, same values


@linux_only
def test_pages_are_handed_back_only_where_the_file_gives_them_back(tmp_path):
    values = q8_0_values(4096, 256)
    ordinary = values.clone()
    assert not hand_back_file_pages(ordinary) and torch.equal(ordinary, values)  # dropped, they would read as zeros
    weight = mapped(values, tmp_path / "weight.bin")
    assert torch.equal(weight, values) and resident_kb(weight) > 16
    assert hand_back_file_pages(weight) and resident_kb(weight) <= 16
    assert torch.equal(weight, values)  # read again from the file
