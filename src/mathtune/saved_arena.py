"""The tensors autograd keeps for backward, copied into one buffer reused from step to step (CPU).

On a CPU the activations a training step keeps for backward come from the C library's heap, among
the step's temporaries, and are freed in the reverse order they came; each step has a new token
count, so every size is new. The heap never closes the holes this leaves: after one epoch of the
benchmark, 813 of the 1,278 MB the heap held were free (mallinfo2) and still resident, and that is
what set the run's peak memory, not the activations themselves (bench/RESULTS.md).

Here a saved-tensor hook (torch.autograd.graph.saved_tensors_hooks, as torch's own save_on_cpu)
copies each kept tensor's storage into a buffer of its own, allocated once and mapped by the
kernel (the heap is not involved), and hands back a view of the copy in backward; the original goes
back to the heap as soon as forward is done with it, like any temporary. A storage kept by several
functions (the input that the query, key and value projections share) is copied once. The buffer is
reset after each step, grown (never shrunk) to the largest step seen with a quarter to spare; what
does not fit is kept as autograd keeps it, and the next step has room for it. Parameters, small
tensors (kept as they are: copying them saves nothing) and views into much larger storages are not copied.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

SMALLEST = 1 << 16  # bytes: smaller storages stay where they are
ALIGNMENT = 64  # bytes: each copy starts on a cache line
HEADROOM = 1.25  # the buffer's size over the largest step's needs


@dataclass(frozen=True)
class _Copy:
    """Where a kept tensor's storage lies in the buffer, and the tensor's view of it."""

    generation: int
    start: int
    nbytes: int
    dtype: torch.dtype
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int


class SavedTensorArena:
    """Hooks that keep autograd's saved tensors in one reused buffer; `holding()` around each training step."""

    def __init__(self, parameters=()):
        self.skipped = {p.untyped_storage().data_ptr() for p in parameters}
        self.buffer: torch.Tensor | None = None  # uint8
        self.used = 0  # bytes of the buffer this step
        self.needed = 0  # bytes this step would have used, fitting or not
        self.largest = 0  # the most any step needed
        self.copies: dict[int, tuple] = {}  # storage address -> (start in the buffer or None, the storage), this step
        self.generation = 0

    @contextlib.contextmanager
    def holding(self):
        """Keep the saved tensors of what runs inside (forward and backward) in the buffer; reset afterwards."""
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            self._next_step()

    def pack(self, tensor: torch.Tensor):
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        if (tensor.device.type != "cpu" or nbytes < SMALLEST or storage.data_ptr() in self.skipped
                or (tensor.requires_grad and tensor.is_leaf)
                or nbytes > 2 * tensor.numel() * tensor.element_size()):
            return tensor
        # the same storage, if still alive (an address is reused once its storage is freed)
        earlier = self.copies.get(storage.data_ptr())
        if earlier is not None and earlier[1]() is storage:
            start = earlier[0]
        else:
            start = self._reserve(nbytes)
            self.copies[storage.data_ptr()] = (start, weakref.ref(storage))
            if start is not None:
                source = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (nbytes,), (1,))
                self.buffer[start : start + nbytes].copy_(source)
        if start is None:
            return tensor
        return _Copy(self.generation, start, nbytes, tensor.dtype, tensor.size(), tensor.stride(),
                     tensor.storage_offset())

    def unpack(self, packed):
        if not isinstance(packed, _Copy):
            return packed
        if packed.generation != self.generation:
            raise RuntimeError("a saved tensor was read after its training step ended (its buffer is reused)")
        stored = self.buffer[packed.start : packed.start + packed.nbytes].view(packed.dtype)
        # as_strided counts its offset from the start of the whole buffer
        return stored.as_strided(packed.size, packed.stride, stored.storage_offset() + packed.storage_offset)

    def _reserve(self, nbytes: int) -> int | None:
        """Room for nbytes in the buffer, or None; either way counted in what this step needs."""
        self.needed = -(-self.needed // ALIGNMENT) * ALIGNMENT + nbytes
        start = -(-self.used // ALIGNMENT) * ALIGNMENT
        if self.buffer is None or start + nbytes > self.buffer.numel():
            return None
        self.used = start + nbytes
        return start

    def _next_step(self) -> None:
        self.largest = max(self.largest, self.needed)
        if self.buffer is None or self.buffer.numel() < self.largest:
            self.buffer = None  # the old one goes first
            self.buffer = torch.empty(int(self.largest * HEADROOM), dtype=torch.uint8)
        self.used = self.needed = 0
        self.copies = {}
        self.generation += 1
