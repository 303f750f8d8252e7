"""The KV cache: one object per layer, made by one factory from the model's config.

A `LayerCache` holds the keys and values of one layer for one sequence, each K or V row (one kv head,
one position) in a storage type's layout:

    f32    float32[hd]
    f16    uint16[hd]            IEEE half bits (Numba has no float16 on CPU)
    q8_0   uint8[hd/32 * 34]     blocks of (f16 d, int8 qs[32]),  w = d * q
    q4_0   uint8[hd/32 * 18]     blocks of (f16 d, qs[16]),       low nibble = elem j, high = j + 16, w = d * (q - 8)

(llama.cpp's block layouts, ggml/src/ggml-common.h, so a dump compares byte for byte with
gguf.quants.quantize; new rows are quantized exactly like ggml's quantize_row_q8_0_ref / q4_0_ref.)

Position p lives in slot p % capacity.  A global layer gets a full cache (capacity = n_ctx); a sliding-window
layer gets a ring (capacity = window + n_batch - 1, llama.cpp sizes its SWA cache the same way in
src/llama-kv-cache-iswa.cpp): a batch stored before it is attended must not overwrite a key its first
query still needs.  Attention reads the storage in place (edgelm/arch/attention.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numba as nb
import numpy as np
import psutil

from ..arch.attention import attend_decode, attend_prefill, f32_bits
from ..errors import ContextError, EdgeLMError, UnsupportedError
from ..quant.formats import dequantize


# ---------------------------------------------------------------------------------------------
# Row encoders: float32 rows -> storage, exactly as gguf-py quants.py / ggml's *_ref quantizers
# (no fastmath: every float32 operation in the reference's order)
# ---------------------------------------------------------------------------------------------

@nb.njit(cache=True, inline="always")
def _half_bits(x):
    """float32 -> IEEE binary16 bits, round to nearest even (what numpy's astype(float16) does)."""
    u = np.int64(f32_bits(x))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:                       # inf, nan
        return sign | (0x7E00 if a > 0x7F800000 else 0x7C00)
    if a >= 0x477FF000:                       # rounds to 65536 or more: inf
        return sign | 0x7C00
    if a < 0x38800000:                        # below 2**-14: a subnormal half (x * 2**24 is exact)
        return sign | np.int64(np.rint(np.abs(x) * np.float32(16777216.0)))
    return sign | ((a - (112 << 23) + 0xFFF + ((a >> 13) & 1)) >> 13)   # rebias 127 -> 15, round


@nb.njit(cache=True, inline="always")
def _put_half(dst, kh, s, o, x):
    h = _half_bits(x)
    dst[kh, s, o] = h & 0xFF
    dst[kh, s, o + 1] = h >> 8


@nb.njit(cache=True)
def _store_f32(x, dst, pos0, cap):
    for t in range(x.shape[0]):
        s = (pos0 + t) % cap
        for kh in range(x.shape[1]):
            for d in range(x.shape[2]):
                dst[kh, s, d] = x[t, kh, d]


@nb.njit(cache=True)
def _store_f16(x, dst, pos0, cap):
    for t in range(x.shape[0]):
        s = (pos0 + t) % cap
        for kh in range(x.shape[1]):
            for d in range(x.shape[2]):
                dst[kh, s, d] = _half_bits(x[t, kh, d])


@nb.njit(cache=True)
def _roundf(v):
    """Round half away from zero, as gguf-py's np_roundf (ggml's roundf)."""
    a = np.abs(v)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return -r if v < 0 else r


@nb.njit(cache=True)
def _store_q8_0(x, dst, pos0, cap):
    for t in range(x.shape[0]):
        s = (pos0 + t) % cap
        for kh in range(x.shape[1]):
            for b in range(x.shape[2] // 32):
                amax = np.float32(0.0)
                for i in range(32):
                    amax = max(amax, np.abs(x[t, kh, 32 * b + i]))
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                o = 34 * b
                _put_half(dst, kh, s, o, d)
                for i in range(32):
                    q = np.int64(_roundf(x[t, kh, 32 * b + i] * inv))
                    dst[kh, s, o + 2 + i] = q & 0xFF


@nb.njit(cache=True)
def _store_q4_0(x, dst, pos0, cap):
    for t in range(x.shape[0]):
        s = (pos0 + t) % cap
        for kh in range(x.shape[1]):
            for b in range(x.shape[2] // 32):
                base = 32 * b
                amax = np.float32(0.0)
                mx = np.float32(0.0)
                for i in range(32):            # the first element of largest magnitude, sign kept
                    v = x[t, kh, base + i]
                    if np.abs(v) > amax:
                        amax = np.abs(v)
                        mx = v
                d = mx / np.float32(-8.0)
                inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
                o = 18 * b
                _put_half(dst, kh, s, o, d)
                for j in range(16):
                    lo = min(15, np.int64(np.trunc(x[t, kh, base + j] * inv + np.float32(8.5))))
                    hi = min(15, np.int64(np.trunc(x[t, kh, base + 16 + j] * inv + np.float32(8.5))))
                    dst[kh, s, o + 2 + j] = lo | (hi << 4)


# ---------------------------------------------------------------------------------------------
# The storage-type table (one row per type, like ggml's type traits)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StorageType:
    name: str
    ggml_type: int         # GGMLQuantizationType id: the kernels' row decoder dispatches on it
    dtype: type            # element type of the storage array
    block: int             # elements per block (1: a float type)
    units: int             # storage elements per block
    store: Callable        # (x (T, n_kv, hd) f32, dst (n_kv, cap, units), pos0, cap) -> None
    rotated: bool = False  # rows stored in the Hadamard basis (see hadamard_rows)

    def row_units(self, head_dim: int) -> int:
        return head_dim // self.block * self.units

    def row_bytes(self, head_dim: int) -> int:
        return self.row_units(head_dim) * np.dtype(self.dtype).itemsize


CACHE_TYPES: dict[str, StorageType] = {
    "f32": StorageType("f32", 0, np.float32, 1, 1, _store_f32),
    "f16": StorageType("f16", 1, np.uint16, 1, 1, _store_f16),
    "q8_0": StorageType("q8_0", 8, np.uint8, 32, 34, _store_q8_0, rotated=True),
    "q4_0": StorageType("q4_0", 2, np.uint8, 32, 18, _store_q4_0, rotated=True),
}


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return (h / np.sqrt(n)).astype(np.float32)


_H32 = _sylvester(32)      # orthonormal and symmetric: H @ H = I


def hadamard_rows(x: np.ndarray) -> np.ndarray:
    """x (..., d) with d a multiple of 32, each 32-element block multiplied by the orthonormal Hadamard matrix.

    Quantized caches store K and V rows in this basis. A block's q8_0/q4_0 step is set by its largest element,
    and attention keys carry a few outlier channels (large RoPE-frequency pairs): rotated, an outlier spreads
    over its block and the step shrinks, so the same bytes hold the rows several times more accurately.
    Attention is unchanged by it: q.k = (qH).(kH), and the weighted sum of rotated values is rotated back
    (H is its own inverse). (The idea of QuaRot, arXiv 2404.00456; the layout stays llama.cpp's.)"""
    # Per 32-element block, the quantization block: a whole-head rotation (tried: 64 on SmolLM2) also mixes
    # the large low-frequency RoPE channels into the other block and doubles the error instead.
    # A Numba loop, not `x @ H`: NumPy's matmul wakes OpenBLAS's threads, which then spin on both cores while
    # the next kernels run (measured: a 4096-token q8_0 prefill took 20 s instead of 12).
    blocks = np.ascontiguousarray(x, np.float32).reshape(-1, 32)
    out = np.empty_like(blocks)
    _times_h32(blocks, _H32, out)
    return out.reshape(x.shape)


@nb.njit(cache=True, fastmath=True)
def _times_h32(x, h, out):
    """out = x @ h for x (n, 32): each row a sum of h's rows (contiguous 32-wide lanes: vectorized)."""
    for i in range(x.shape[0]):
        for j in range(32):
            out[i, j] = 0.0
        for k in range(32):
            xk = x[i, k]
            for j in range(32):
                out[i, j] += xk * h[k, j]


def storage_type(name: str, head_dim: int) -> StorageType:
    """The table row for a cache type name, checked against the head size it will store."""
    st = CACHE_TYPES.get(name) if isinstance(name, str) else None
    if st is None:
        raise EdgeLMError(f"KV cache type must be one of {', '.join(CACHE_TYPES)}, got {name!r}")
    if head_dim % st.block:
        raise UnsupportedError(f"KV cache type {name} needs a head size that is a multiple of {st.block}, "
                               f"this model's is {head_dim} (use f16 or f32)")
    return st


# ---------------------------------------------------------------------------------------------
# One layer's cache
# ---------------------------------------------------------------------------------------------

_NO_SINKS = np.zeros(0, np.float32)


class LayerCache:
    """K and V of one layer for one sequence.  window 0: a full cache (every position up to capacity);
    window W > 0: query p sees p-W+1..p, and a capacity below n_ctx makes it a ring."""

    def __init__(self, n_kv: int, head_dim: int, head_dim_v: int, type_k: str, type_v: str,
                 capacity: int, window: int = 0):
        self.n_kv, self.head_dim, self.head_dim_v = n_kv, head_dim, head_dim_v
        self.type_k, self.type_v = type_k, type_v
        self._sk, self._sv = storage_type(type_k, head_dim), storage_type(type_v, head_dim_v)
        self.capacity, self.window = capacity, window
        # np.zeros maps pages lazily: resident memory grows with the slots actually written
        self.k = np.zeros((n_kv, capacity, self._sk.row_units(head_dim)), self._sk.dtype)
        self.v = np.zeros((n_kv, capacity, self._sv.row_units(head_dim_v)), self._sv.dtype)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def oldest_kept(self, end: int) -> int:
        return max(0, end - self.capacity)

    def can_resume_at(self, n: int, end: int) -> bool:
        """Can evaluation continue at position n (a reused prefix of n tokens, a truncation) when positions
        < end have been stored?  The query at n must still find every key its window reaches."""
        return n <= end and self._first_needed(n) >= self.oldest_kept(end)

    def _first_needed(self, pos0: int) -> int:
        """The oldest key the query at pos0 attends to."""
        return max(0, pos0 - self.window + 1) if self.window else 0

    def store(self, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k (T, n_kv, hd), v (T, n_kv, hd_v) float32 for positions pos0..pos0+T-1."""
        T = k.shape[0]
        if self._first_needed(pos0) < pos0 + T - self.capacity:
            raise ContextError(f"{T} tokens at position {pos0} do not fit a KV cache of {self.capacity} "
                               f"slots (window {self.window}): evaluate in smaller batches or a larger context")
        self._sk.store(self._basis(k, self._sk), self.k, pos0, self.capacity)
        self._sv.store(self._basis(v, self._sv), self.v, pos0, self.capacity)

    @staticmethod
    def _basis(x: np.ndarray, st: StorageType) -> np.ndarray:
        """Rows as the storage type keeps them: float32, in the Hadamard basis for the quantized types."""
        return hadamard_rows(x) if st.rotated else np.ascontiguousarray(x, np.float32)

    def attend(self, q: np.ndarray, pos0: int, scale: float, sinks: np.ndarray | None,
               out: np.ndarray) -> None:
        """out (T, n_head, hd_v) = causal (and windowed) attention of q (T, n_head, hd) at positions
        pos0..pos0+T-1 over the stored keys; `sinks` (n_head,) join each softmax's denominator only."""
        if out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError("attend() writes into a C-contiguous float32 `out` (T, n_head, hd_v)")
        q = self._basis(q, self._sk)                  # scores are unchanged: q.k = (qH).(kH)
        sk, sv = self._sk, self._sv
        args = (sk.ggml_type, self.k, sk.row_bytes(self.head_dim), sv.ggml_type, self.v,
                sv.row_bytes(self.head_dim_v), self.capacity, pos0, self.window, np.float32(scale),
                _NO_SINKS if sinks is None else sinks)
        if q.shape[0] == 1:
            attend_decode(q[0], *args, out[0])
        else:
            attend_prefill(q, *args, out)
        if sv.rotated:                                # the values' weighted sum, back from the Hadamard basis
            out[...] = hadamard_rows(out)

    def rows_f32(self, which: str, positions: np.ndarray) -> np.ndarray:
        """The K ("k") or V ("v") rows of `positions` as float32 (n, n_kv, hd) (dequantized; for shifts,
        dumps and tests, not for the hot path)."""
        st, raw, hd = (self._sk, self.k, self.head_dim) if which == "k" else (self._sv, self.v, self.head_dim_v)
        rows = raw[:, np.asarray(positions, np.int64) % self.capacity]        # (n_kv, n, units)
        n = rows.shape[1]
        if n == 0:
            return np.zeros((0, self.n_kv, hd), np.float32)
        flat = np.ascontiguousarray(rows).view(np.uint8).reshape(self.n_kv * n, st.row_bytes(hd))
        x = dequantize(flat, st.ggml_type, hd).reshape(self.n_kv, n, hd).transpose(1, 0, 2).copy()
        return hadamard_rows(x) if st.rotated else x

    def shift(self, n_keep: int, n_discard: int, end: int, rotate) -> None:
        """Drop positions n_keep..n_keep+n_discard-1; move n_keep+n_discard..end-1 down by n_discard.
        Keys are dequantized, re-rotated by -n_discard (`rotate(k, delta)` in place) and requantized;
        values move as raw rows."""
        first = max(self.oldest_kept(end), n_keep + n_discard)
        if n_discard <= 0 or first >= end:
            return
        old = np.arange(first, end)
        k = self.rows_f32("k", old)
        rotate(k, -n_discard)
        v_rows = self.v[:, old % self.capacity].copy()            # gathered before any slot is rewritten
        new = old - n_discard
        self._sk.store(self._basis(k, self._sk), self.k, int(new[0]), self.capacity)
        self.v[:, new % self.capacity] = v_rows


# ---------------------------------------------------------------------------------------------
# The factory
# ---------------------------------------------------------------------------------------------

def _layer_shapes(config, n_ctx: int, n_batch: int) -> list[tuple[int, int]]:
    """(capacity, window) of every layer: the one place that decides ring vs full."""
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
        raise ContextError(f"context size must be a positive integer, got {n_ctx!r}")
    shapes = []
    for il in range(config.n_layer):
        if config.is_swa_layer(il):
            W = config.sliding_window
            shapes.append((min(n_ctx, W + n_batch - 1), W))
        else:
            shapes.append((n_ctx, 0))
    return shapes


def _row_bytes(config, type_k: str, type_v: str) -> int:
    """Bytes of K and V per kv head and position."""
    return (storage_type(type_k, config.head_dim).row_bytes(config.head_dim)
            + storage_type(type_v, config.head_dim_v).row_bytes(config.head_dim_v))


def cache_bytes(config, n_ctx: int, type_k: str = "f16", type_v: str = "f16", n_batch: int = 512) -> int:
    """Bytes make_caches() allocates for this context (the same shapes, nothing allocated)."""
    per_slot = config.n_head_kv * _row_bytes(config, type_k, type_v)
    return sum(cap for cap, _ in _layer_shapes(config, n_ctx, n_batch)) * per_slot


def cache_bytes_per_token(config, type_k: str = "f16", type_v: str = "f16") -> int:
    """Bytes one more token of context costs: the full (global) layers only; rings have a fixed size."""
    n_full = sum(1 for il in range(config.n_layer) if not config.is_swa_layer(il))
    return n_full * config.n_head_kv * _row_bytes(config, type_k, type_v)


def make_caches(config, n_ctx: int, type_k: str = "f16", type_v: str = "f16",
                n_batch: int = 512) -> list[LayerCache]:
    """One LayerCache per layer: rings for sliding-window layers, full caches for the others."""
    need = cache_bytes(config, n_ctx, type_k, type_v, n_batch)
    available = psutil.virtual_memory().available
    if need > available:
        raise ContextError(f"a KV cache for {n_ctx} tokens needs {need / 2**30:.1f} GiB, more than the "
                           f"{available / 2**30:.1f} GiB of memory available (use a smaller context, -c / n_ctx)")
    return [LayerCache(config.n_head_kv, config.head_dim, config.head_dim_v, type_k, type_v, cap, window)
            for cap, window in _layer_shapes(config, n_ctx, n_batch)]
