"""Attention for bfloat16 decoding on CPUs from oneDNN's matrix products with float32 results.

Torch's CPU flash-attention kernel computes its two products (scores, then probabilities times
values) through a bfloat16 product with float32 results, which torch's public operators do not
offer (`torch.mm(..., out_dtype=...)` is refused on CPUs, and a bfloat16 `matmul` rounds its result
to bfloat16: scores off by up to 2^-9 of their size). Where the CPU has no AMX, the kernel reaches
that product through MKL, which runs it at float32 speed on AMD CPUs. oneDNN, the library torch
itself uses for bfloat16 products, has it at bfloat16 speed, but torch keeps its own copy's symbols
hidden. So this module calls oneDNN's matmul primitive (from the `onednn-cpu-gomp` package, which
shares torch's OpenMP runtime) through ctypes, and does the softmax in torch:

    scores = q @ k^T (float32)  ->  * scale + mask  ->  p = exp(scores - max)  (float32)
    out = bf16(p) @ v (float32) / sum(p),  lse = max + log(sum(p))

the same arithmetic as the flash kernel (bfloat16 inputs, float32 scores and sums, probabilities
rounded to bfloat16 for the second product), in one pass instead of the kernel's online one.

`attention(query, key, value, mask, scale)` has the flash kernel's contract (output and each
query's log-sum-exp) but returns the output in float32. `available()` says whether the library
loaded and runs a bfloat16 product here; nothing else in mathtune needs this package.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch

ENV = "MATHTUNE_LIBDNNL"  # a path to libdnnl.so.3 to use instead of the installed package's
SCORES_BYTES = 32 << 20  # float32 scores held at once: queries are taken in chunks under this
PRIMITIVES_KEPT = 256  # matmul primitives kept, by shape (a decoding step brings a few new ones)

_DIMS = ctypes.c_int64 * 12  # dnnl_dims_t
_BF16, _F32 = 2, 3  # dnnl_data_type_t
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS = 1, 17, 33
_CPU = 1  # dnnl_cpu
_P = ctypes.c_void_p


class _ExecArg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]


def library_paths() -> list[str]:
    """Where libdnnl may be, in order: $MATHTUNE_LIBDNNL, the onednn-cpu-gomp package's (it installs into
    the environment's lib/), then the system's."""
    paths = [os.environ[ENV]] if os.environ.get(ENV) else []
    paths.append(str(Path(sys.prefix) / "lib" / "libdnnl.so.3"))
    found = ctypes.util.find_library("dnnl")
    if found:
        paths.append(found)
    return paths


class _OneDNN:
    """The library, one engine and one stream, and the matmul primitives built so far."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        lib.dnnl_version.restype = ctypes.POINTER(_Version)
        version = lib.dnnl_version().contents
        if version.major < 3:  # the memory-descriptor and matmul calls below are oneDNN 3's
            raise OSError(f"{path} is oneDNN {version.major}.{version.minor}; version 3 or later is needed")
        lib.dnnl_memory_create.argtypes = [ctypes.POINTER(_P), _P, _P, _P]
        lib.dnnl_memory_set_data_handle.argtypes = [_P, _P]
        lib.dnnl_engine_create.argtypes = [ctypes.POINTER(_P), ctypes.c_int, ctypes.c_size_t]
        self.lib, self.path = lib, path
        self.version = f"{version.major}.{version.minor}.{version.patch}"
        self.engine, self.stream = _P(), _P()
        self._check(lib.dnnl_engine_create(ctypes.byref(self.engine), _CPU, 0), "engine")
        self._check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, 1), "stream")
        self.primitives: OrderedDict = OrderedDict()

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"oneDNN: {what} failed with status {status}")

    def _descriptor(self, tensor: torch.Tensor, data_type: int) -> _P:
        md = _P()
        self._check(self.lib.dnnl_memory_desc_create_with_strides(
            ctypes.byref(md), tensor.dim(), _DIMS(*tensor.shape), data_type, _DIMS(*tensor.stride())), "memory descriptor")
        return md

    def _primitive(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor):
        key = (tuple(a.shape), a.stride(), tuple(b.shape), b.stride(), tuple(out.shape), out.stride())
        if key in self.primitives:
            self.primitives.move_to_end(key)
            return self.primitives[key]
        lib = self.lib
        mds = [self._descriptor(a, _BF16), self._descriptor(b, _BF16), self._descriptor(out, _F32)]
        pd, primitive, memories = _P(), _P(), []
        try:
            self._check(lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), self.engine, mds[0], mds[1], None,
                                                              mds[2], None), "matmul descriptor")
            self._check(lib.dnnl_primitive_create(ctypes.byref(primitive), pd), "matmul primitive")
            for md in mds:
                memory = _P()
                self._check(lib.dnnl_memory_create(ctypes.byref(memory), md, self.engine, None), "memory")
                memories.append(memory)
        except RuntimeError:  # nothing half-built is kept
            if primitive:
                lib.dnnl_primitive_destroy(primitive)
            for memory in memories:
                lib.dnnl_memory_destroy(memory)
            raise
        finally:  # the primitive and the memories keep copies of these
            if pd:
                lib.dnnl_primitive_desc_destroy(pd)
            for md in mds:
                lib.dnnl_memory_desc_destroy(md)
        args = (_ExecArg * 3)(_ExecArg(_ARG_SRC, memories[0]), _ExecArg(_ARG_WEIGHTS, memories[1]),
                              _ExecArg(_ARG_DST, memories[2]))
        self.primitives[key] = entry = (primitive, memories, args)
        if len(self.primitives) > PRIMITIVES_KEPT:
            old_primitive, old_memories, _ = self.primitives.popitem(last=False)[1]
            lib.dnnl_primitive_destroy(old_primitive)
            for memory in old_memories:
                lib.dnnl_memory_destroy(memory)
        return entry

    def matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = a @ b over the leading (batch) dimensions: a, b bfloat16, out float32; any strides."""
        primitive, memories, args = self._primitive(a, b, out)
        for memory, tensor in zip(memories, (a, b, out)):
            self.lib.dnnl_memory_set_data_handle(memory, _P(tensor.data_ptr()))
        self._check(self.lib.dnnl_primitive_execute(primitive, self.stream, 3, args), "matmul")
        self._check(self.lib.dnnl_stream_wait(self.stream), "stream wait")
        return out


_library: _OneDNN | None = None
_failure: str | None = None


def _load() -> _OneDNN | None:
    """The library, loaded and checked once per process (a bfloat16 product against torch's); None where
    it is missing or fails, with the reason in why_unavailable()."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    reasons = []
    for path in library_paths():
        if not Path(path).exists() and "/" in path:
            reasons.append(f"{path}: not found")
            continue
        try:
            library = _OneDNN(path)
            a = torch.arange(-8, 8, dtype=torch.bfloat16).reshape(4, 4) / 4
            got = library.matmul(a, a.t(), torch.empty(4, 4))
            if not torch.equal(got, a.float() @ a.float().t()):  # small integers/4: exact in both
                raise RuntimeError("a bfloat16 product gave a wrong result")
        except (OSError, RuntimeError, AttributeError) as error:
            reasons.append(f"{path}: {error}")
            continue
        _library = library
        return _library
    _failure = "; ".join(reasons) or "no path to try"
    return None


def available() -> bool:
    """Whether oneDNN's bfloat16 products with float32 results can run here."""
    return _load() is not None


def version() -> str | None:
    """The loaded oneDNN's version ("3.2.0"), None where it is not available."""
    library = _load()
    return library.version if library else None


def why_unavailable() -> str | None:
    _load()
    return _failure


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b for bfloat16 a and b (any strides, batch dimensions alike), the result in float32 without
    rounding to bfloat16 in between. Raises RuntimeError where the library is not available."""
    library = _load()
    if library is None:
        raise RuntimeError(f"oneDNN is not available: {_failure}")
    if a.dtype != torch.bfloat16 or b.dtype != torch.bfloat16:
        raise TypeError(f"matmul takes bfloat16 tensors, not {a.dtype} and {b.dtype}")
    if out is None:
        out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=torch.float32)
    return library.matmul(a, b, out)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(query @ key^T * scale + mask) @ value and each query's log-sum-exp of its scores.

    query [B, H, M, D], key and value [B, H, N, D] (bfloat16, any strides: slices of a cache), mask
    additive ([B or 1, 1, M, N]) or None. Returns the output in float32 ([B, H, M, D]) and the
    log-sum-exp ([B, H, M], -inf for a query whose keys are all masked, whose output is then 0).
    Queries are taken in chunks so that no more than SCORES_BYTES of scores are held at once.
    """
    batch, heads, queries, dim = query.shape
    keys = key.shape[2]
    out = torch.empty(batch, heads, queries, dim, dtype=torch.float32)
    lse = torch.empty(batch, heads, queries, dtype=torch.float32)
    per_query = heads * keys * 4  # bytes of float32 scores
    if per_query * queries <= SCORES_BYTES:  # whole rows at a time
        rows, step = max(1, min(batch, SCORES_BYTES // max(per_query * queries, 1))), queries
    else:  # one row at a time, its queries in chunks
        rows, step = 1, max(1, SCORES_BYTES // per_query)
    key_t = key.transpose(-1, -2)
    for b0 in range(0, batch, rows):
        b1 = min(batch, b0 + rows)
        for m0 in range(0, queries, step):
            m1 = min(queries, m0 + step)
            scores = matmul(query[b0:b1, :, m0:m1], key_t[b0:b1])
            part = None if mask is None else mask[b0:b1] if mask.shape[0] > 1 else mask
            if part is not None:
                scores = torch.add(part[:, :, m0:m1], scores, alpha=scale)
            else:
                scores.mul_(scale)
            top = scores.amax(-1, keepdim=True)
            top.masked_fill_(top == float("-inf"), 0.0)  # all keys masked: exp gives 0s, not NaN
            probs = scores.sub_(top).exp_()
            total = probs.sum(-1, keepdim=True)
            chunk = out[b0:b1, :, m0:m1]
            matmul(probs.to(torch.bfloat16), value[b0:b1], chunk)
            chunk.div_(total.clamp_min(torch.finfo(torch.float32).tiny))
            lse[b0:b1, :, m0:m1] = (top + total.log()).squeeze(-1)
    return out, lse
