"""Frozen weights in fewer bytes, value for value the same: the LM head, and LoRA's frozen base layers.

The packaged Gemma 3 270M comes from a GGUF file whose blocks of 32 values share one float16 scale:
its 262,144 x 640 embedding (the LM head) is Q8_0 (int8 codes), the query, key, gate and up
projections Q5_0 (codes -16 to 15), part of the value projections Q8_0. Their float32 values are
exactly codes x scales, so they are kept that way (an int8 code a value and a float32 scale a block:
36 bytes for every 128 of float32); each value is checked, and a matrix that does not give every
value back stays as it is. A float32 matrix whose values are all bfloat16 numbers is likewise kept
in bfloat16.

- The loss head (mathtune.speedups.lm_loss) reads the whole head weight at every step, so in float32
  all of it stays resident for the whole run; kept compact, each vocabulary slice is rebuilt as the
  head reaches it, which costs about as much as reading the float32 slice from memory. A bfloat16
  copy of such a head (the packaged model's, mathtune.model_cache.float32_original) holds the float32
  values rounded, so the float32 head's codes and scales, rebuilt in float32 and rounded the same
  way, give every one of them back (compact_rounded_rows; a pass over the vocabulary takes longer
  than reading the bfloat16 weight, from a little over half its bytes).
- A LoRA layer's frozen product (mathtune.speedups.fused_lora, mathtune.speedups.gated_mlp) rebuilds its weight for
  the forward product and again for backward's, one matrix at a time, so no float32 copy of it is
  resident at any time (validation and generation during training too: their products would
  otherwise read the float32 pages in again). On Gemma 3 270M that keeps 90 of the 126 projection
  matrices (63 of the decoder's 100 million weights) compact; the rest are GGUF Q4_K and Q6_K
  blocks, whose values are not codes x one scale.

The model keeps its float32 weights for everything else (generation, saving, merging; a training
step's lookup in an embedding tied to the head reads the head's compact rows, see
mathtune.speedups.lm_loss.compact_lookup). That only saves memory where a weight is memory-mapped
from the checkpoint file, as transformers loads float32 safetensors on a CPU: its pages are read
from the file when touched, and the pages the check read are handed back to the file (madvise), so
the matrix is not resident while training. Elsewhere (a GPU, or weights converted on load, which
live in ordinary memory) nothing is done: a compact copy beside them would add memory, not save it.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

from mathtune.speedups.memory import LIBC

BLOCK = 32  # values per Q8_0 or Q5_0 block
CODE_LIMITS = (127, 16)  # a block's largest |code|: Q8_0's (int8 codes), Q5_0's (codes -16 to 15)
COMPACT = "compact_weight"  # the attribute of a frozen base layer that holds its compact weight
CHECK_ROWS = 16384  # rows checked (and their pages handed back) at a time: 42 MB of a 640-wide float32 matrix
MADV_DONTNEED = 4  # Linux


class Int8BlockRows:
    """Rows kept as int8 codes with one scale per block of 32 values (GGUF's Q8_0 and Q5_0 layouts).

    Indexing rows (a slice or an index tensor) gives them as the float matrix holds them.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.codes, self.scales, self.dtype = codes, scales, dtype  # [rows, width] int8, [rows, width / 32]
        self.shape = codes.shape

    def __getitem__(self, index) -> torch.Tensor:
        codes = self.codes[index]
        # codes x scales in float32, as the check computed them (as GGUF's own dequantization), then
        # rounded to a 16-bit dtype as a 16-bit copy of the float32 values was (compact_rounded_rows)
        values = codes.to(torch.float32).view(codes.shape[0], -1, BLOCK).mul_(self.scales[index].unsqueeze(-1))
        return values.view(codes.shape).to(self.dtype)


class Bfloat16Rows:
    """Rows of a float32 matrix whose values are all bfloat16 numbers, kept in bfloat16."""

    def __init__(self, values: torch.Tensor, dtype: torch.dtype):
        self.values, self.dtype = values, dtype
        self.shape = values.shape

    def __getitem__(self, index) -> torch.Tensor:
        return self.values[index].to(self.dtype)


def as_int8_blocks(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Codes and scales that give back `values` exactly, or None.

    Q8_0 takes scale = max|block| / 127 and code = round(value / scale), so the largest code of a
    block is +-127 and max|block| / 127 recovers the scale exactly; Q5_0 gives a block's largest
    value the code -16, so max|block| / 16 recovers its scale. Each block takes the first limit
    that gives all its values back.
    """
    if values.shape[-1] % BLOCK:
        return None
    blocks = values.reshape(values.shape[0], -1, BLOCK)
    largest = blocks.abs().amax(dim=-1)
    codes = scales = found = None
    for limit in CODE_LIMITS:
        trial_scales = largest / limit
        trial = torch.where(trial_scales.unsqueeze(-1) > 0, blocks / trial_scales.unsqueeze(-1), 0.0).round_()
        exact = (trial * trial_scales.unsqueeze(-1) == blocks).all(dim=-1)
        if found is None:
            codes, scales, found = trial, trial_scales, exact
        else:
            take = exact & ~found
            codes = torch.where(take.unsqueeze(-1), trial, codes)
            scales = torch.where(take, trial_scales, scales)
            found |= exact
        if found.all():
            return codes.to(torch.int8).reshape(values.shape), scales
    return None


def compact_rows(weight: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> Int8BlockRows | Bfloat16Rows | None:
    """The weight in a compact exact form, when that saves memory; otherwise None (use the weight itself).

    `mappings`: the clean file mappings (_clean_file_mappings), read once for many weights.
    """
    if (weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2
            or not weight.is_contiguous() or not _in_clean_file_mapping(weight, mappings)):
        return None
    weight = weight.detach()
    form, parts = None, []  # the first piece decides the form; every piece must take it
    for start in range(0, weight.shape[0], CHECK_ROWS):
        piece = weight[start : start + CHECK_ROWS]
        blocks = as_int8_blocks(piece) if form in (None, "int8") else None
        if blocks is not None:
            form = "int8"
            parts.append(blocks)
        elif form in (None, "bf16") and torch.equal(piece.to(torch.bfloat16).to(torch.float32), piece):
            form = "bf16"
            parts.append(piece.to(torch.bfloat16))
        else:
            form = None
        _hand_back_pages(piece)
        if form is None:
            return None
    if form == "int8":
        return Int8BlockRows(torch.cat([c for c, _ in parts]), torch.cat([s for _, s in parts]), weight.dtype)
    return Bfloat16Rows(torch.cat(parts), weight.dtype)


def compact_rounded_rows(weight: torch.Tensor, exact: torch.Tensor | None) -> Int8BlockRows | None:
    """A 16-bit weight rounded from the float32 `exact` (a copy saved in bfloat16), as `exact`'s int8 blocks
    rounded the same way, when every value comes back; otherwise None.

    Both must be memory-mapped (the check reads each once and hands its pages back).
    """
    if (exact is None or weight.dtype not in (torch.bfloat16, torch.float16) or weight.shape != exact.shape
            or not weight.is_contiguous() or weight.device.type != "cpu"):
        return None
    mappings = _clean_file_mappings()
    rows = compact_rows(exact, mappings) if _in_clean_file_mapping(weight, mappings) else None
    if not isinstance(rows, Int8BlockRows):  # (bfloat16 rows of a bfloat16 weight would save nothing)
        return None
    rows.dtype = weight.dtype
    weight = weight.detach()
    for start in range(0, weight.shape[0], CHECK_ROWS):
        piece = weight[start : start + CHECK_ROWS]
        same = torch.equal(rows[start : start + CHECK_ROWS], piece)
        _hand_back_pages(piece)
        if not same:
            return None
    return rows


def _in_clean_file_mapping(tensor: torch.Tensor, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Whether the tensor lies in a file mapping none of whose pages became private copies (Linux only).

    A write into a private file mapping copies the page into ordinary memory ("Anonymous" in smaps);
    without any, every page can be handed back and is read again from the file unchanged.
    """
    first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    mappings = _clean_file_mappings() if mappings is None else mappings
    return any(low <= first and last <= high for low, high in mappings)


def _clean_file_mappings() -> list[tuple[int, int]]:
    """The address ranges of this process's file mappings without private copies (none off Linux)."""
    if not sys.platform.startswith("linux"):
        return []
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return []
    clean, current = [], None
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: "low-high perms offset device inode [path]"
            is_file = len(fields) >= 6 and fields[5].startswith("/")
            current = tuple(int(bound, 16) for bound in fields[0].split("-")) if is_file else None
        elif current is not None and fields[0] == "Anonymous:" and int(fields[1]) == 0:
            clean.append(current)
    return clean


def hand_back_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the tensor's resident pages where it lies in a clean file mapping (they are read again from
    the file); returns whether it did. Elsewhere nothing is done: dropped pages of ordinary memory
    would come back as zeros."""
    if not _in_clean_file_mapping(tensor):
        return False
    _hand_back_pages(tensor)
    return True


def _hand_back_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages wholly inside the tensor's bytes; a later read brings them back from the file."""
    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)


class CompactProduct(torch.autograd.Function):
    """x @ weight.T + bias for a frozen weight kept compact: rebuilt in forward, and again in backward
    (for x's gradient), so no float32 copy outlives its product."""

    @staticmethod
    def forward(ctx, x, rows, bias):
        ctx.rows = rows
        return torch.nn.functional.linear(x, rows[:], bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.rows[:] if ctx.needs_input_grad[0] else None, None, None


def frozen_weight(base: torch.nn.Linear):
    """The base layer's weight for a product: its compact form where it has one, else itself."""
    rows = getattr(base, COMPACT, None)
    return base.weight if rows is None else rows


def dense(weight) -> torch.Tensor:
    """A weight as a float tensor, rebuilt if it is a compact form."""
    return weight if isinstance(weight, torch.Tensor) else weight[:]


def base_output(base: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The frozen base layer applied to x, from its compact weight where it has one."""
    weight = frozen_weight(base)
    return base(x) if isinstance(weight, torch.Tensor) else CompactProduct.apply(x, weight, base.bias)


def use_compact_base_weights(model: torch.nn.Module) -> int:
    """Give each PEFT LoRA linear layer's frozen, memory-mapped base weight its compact form where it has
    one (see the module docstring); returns how many. The products use it through base_output and
    frozen_weight (mathtune.speedups.fused_lora, mathtune.speedups.gated_mlp)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    compacted, clean = 0, _clean_file_mappings()
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if type(module) is not LoraLinear or type(base) is not torch.nn.Linear or hasattr(base, COMPACT):
            continue
        if any(p.requires_grad for p in base.parameters()):
            continue
        rows = compact_rows(base.weight, clean)
        if rows is not None:
            setattr(base, COMPACT, rows)
            compacted += 1
    return compacted
