"""The frozen LM head weight in fewer bytes, value for value the same, for the loss head.

Gemma's LM head is its embedding matrix, 262,144 words x hidden size. The loss head
(mathtune.lm_loss) reads all of it at every step, so in float32 it is resident for the whole run:
671 MB for Gemma 3 270M, the largest single block of a CPU run's memory. The packaged Gemma 3 270M
comes from a GGUF file where that matrix is Q8_0 (blocks of 32 int8 codes sharing one float16
scale), so its float32 values are exactly codes x scales: kept that way it takes 176 MB, and each
vocabulary slice is rebuilt as the head reaches it (the same floats, so the same loss; the rebuild
costs about as long as reading the float32 slice from memory, bench/RESULTS.md). A float32 matrix
whose values are all bfloat16 numbers is likewise kept in bfloat16. Each value is checked; a
matrix that is neither stays as it is.

The model keeps its float32 weight for everything else (the embedding lookup, generation,
saving). That only saves memory where the weight is memory-mapped from the checkpoint file, as
transformers loads float32 safetensors on a CPU: its pages are read from the file when touched,
and the pages the check read are handed back to the file (madvise), so the matrix is not resident
while training. Elsewhere (a GPU, or weights converted on load, which live in ordinary memory)
nothing is done: a compact copy beside them would add memory, not save it.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

from mathtune.models import LIBC

BLOCK = 32  # values per Q8_0 block
CHECK_ROWS = 16384  # rows checked (and their pages handed back) at a time: 42 MB of a 640-wide float32 matrix
MADV_DONTNEED = 4  # Linux


class Int8BlockRows:
    """Rows kept as int8 codes with one scale per block of 32 values (GGUF's Q8_0 layout).

    Indexing rows (a slice or an index tensor) gives them as the float matrix holds them.
    """

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.codes, self.scales, self.dtype = codes, scales, dtype  # [rows, width] int8, [rows, width / 32]
        self.shape = codes.shape

    def __getitem__(self, index) -> torch.Tensor:
        codes = self.codes[index]
        # codes x scales in float32, as the check computed them (for Q8_0: as GGUF's own dequantization)
        values = codes.to(self.dtype).view(codes.shape[0], -1, BLOCK).mul_(self.scales[index].unsqueeze(-1))
        return values.view(codes.shape)


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
    block is +-127 and max|block| / 127 recovers the scale exactly.
    """
    if values.shape[-1] % BLOCK:
        return None
    blocks = values.reshape(values.shape[0], -1, BLOCK)
    scales = blocks.abs().amax(dim=-1) / 127
    codes = torch.where(scales.unsqueeze(-1) > 0, blocks / scales.unsqueeze(-1), 0.0).round_()
    if not torch.equal(codes * scales.unsqueeze(-1), blocks):
        return None
    return codes.to(torch.int8).reshape(values.shape), scales


def compact_rows(weight: torch.Tensor) -> Int8BlockRows | Bfloat16Rows | None:
    """The weight in a compact exact form, when that saves memory; otherwise None (use the weight itself)."""
    if (weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2
            or not weight.is_contiguous() or not _in_clean_file_mapping(weight)):
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


def _in_clean_file_mapping(tensor: torch.Tensor) -> bool:
    """Whether the tensor lies in a file mapping none of whose pages became private copies (Linux only).

    A write into a private file mapping copies the page into ordinary memory ("Anonymous" in smaps);
    without any, every page can be handed back and is read again from the file unchanged.
    """
    if not sys.platform.startswith("linux"):
        return False
    first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    try:
        with open("/proc/self/smaps") as smaps:
            lines = smaps.read().splitlines()
    except OSError:
        return False
    inside, is_file, copied_kb = False, False, 0
    for line in lines:
        fields = line.split()
        if not fields:
            continue
        if not fields[0].endswith(":"):  # a mapping's header: "low-high perms offset device inode [path]"
            if inside:
                break
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            inside = low <= first and last <= high
            is_file = len(fields) >= 6 and fields[5].startswith("/")
        elif inside and fields[0] == "Anonymous:":
            copied_kb = int(fields[1])
    return inside and is_file and copied_kb == 0


def _hand_back_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages wholly inside the tensor's bytes; a later read brings them back from the file."""
    page = mmap.PAGESIZE
    first = -(-tensor.data_ptr() // page) * page
    last = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED)
