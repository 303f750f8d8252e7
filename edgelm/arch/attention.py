"""Causal attention over the KV cache: f16 (stored as uint16 bits: Numba has no float16 on CPU) or f32.

Prefill (many queries) converts the visible K/V slice to float32 once and uses BLAS; decode (one query)
runs a Numba kernel that converts f16 in registers, so the cache is never copied per token.
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from ..quant.formats import half_to_f32


@intrinsic
def _f16(typingctx, h):
    """uint16 bits of an IEEE half -> float32 (hardware conversion where the CPU has one; see quant/formats)."""
    def codegen(context, builder, signature, args):
        return half_to_f32(builder, args[0])
    return types.float32(types.uint16), codegen


@intrinsic
def f32_bits(typingctx, x):
    """float32 -> its IEEE bits as uint32 (a register bitcast; vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def f32_from_bits(typingctx, u):
    """int32/uint32 IEEE bits -> float32 (a register bitcast; vectorizes)."""
    if not isinstance(u, types.Integer) or u.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(u), codegen


def _kv_f32(x):
    """A cache element as float32: f16 bits (uint16) are converted, float32 passes through.
    (This body serves plain Python; compiled kernels use the overload below.)"""
    if isinstance(x, np.uint16):
        return np.float32(np.array(x, np.uint16).view(np.float16))
    return np.float32(x)


@overload(_kv_f32)
def _kv_f32_impl(x):
    if x == types.uint16:
        return lambda x: _f16(x)
    return lambda x: np.float32(x)


def kv_as_f32(a: np.ndarray) -> np.ndarray:
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


BLOCK = 64   # keys per parallel task in decode attention


def _decode_attention_py(q, kc, vc, n_keys, lo, scale, sinks, out):
    # q (n_head, hd) f32; kc/vc (n_kv, n_ctx, hd) uint16 (f16 bits); keys lo..n_keys-1 visible; out (n_head, hdv).
    # sinks: per-head logits of a virtual key with no value (gpt-oss), or an empty array.
    # Tasks are (kv head, block of keys): each K/V block is converted once and serves all heads of its group
    # (MQA/GQA), and short contexts still split across threads.
    n_head, hd = q.shape
    n_kv = kc.shape[0]
    hdv = vc.shape[2]
    group = n_head // n_kv
    n = n_keys - lo
    nblk = (n + BLOCK - 1) // BLOCK
    s = np.empty((n_head, n), np.float32)
    for t in nb.prange(n_kv * nblk):
        kh = t // nblk
        j0 = (t - kh * nblk) * BLOCK
        j1 = min(j0 + BLOCK, n)
        kf = np.empty(hd, np.float32)
        for j in range(j0, j1):
            for d in range(hd):
                kf[d] = _kv_f32(kc[kh, lo + j, d])
            for g in range(group):
                h = kh * group + g
                acc = np.float32(0.0)
                for d in range(hd):
                    acc += q[h, d] * kf[d]
                s[h, j] = acc * scale
    for h in range(n_head):          # softmax per head (n values: cheap, serial)
        m = s[h, 0]
        for j in range(1, n):
            m = max(m, s[h, j])
        tot = np.float32(0.0)
        if sinks.size:
            m = max(m, sinks[h])
            tot = np.exp(sinks[h] - m)
        for j in range(n):
            e = np.exp(s[h, j] - m)
            s[h, j] = e
            tot += e
        inv = np.float32(1.0) / tot
        for j in range(n):
            s[h, j] *= inv
    part = np.zeros((nblk, n_head, hdv), np.float32)
    for t in nb.prange(n_kv * nblk):
        kh = t // nblk
        b = t - kh * nblk
        j0 = b * BLOCK
        j1 = min(j0 + BLOCK, n)
        vf = np.empty(hdv, np.float32)
        for j in range(j0, j1):
            for d in range(hdv):
                vf[d] = _kv_f32(vc[kh, lo + j, d])
            for g in range(group):
                h = kh * group + g
                w = s[h, j]
                for d in range(hdv):
                    part[b, h, d] += w * vf[d]
    for h in range(n_head):
        for d in range(hdv):
            acc = np.float32(0.0)
            for b in range(nblk):
                acc += part[b, h, d]
            out[h, d] = acc


# Waking threads costs tens of µs per parallel region (passive OpenMP waits): short contexts run serially.
# error_model="numpy": NaN scores from corrupted weights give NaN, not ZeroDivisionError (blocks.py says more)
_decode_parallel = nb.njit(parallel=True, fastmath=True, cache=True, error_model="numpy")(_decode_attention_py)
_decode_serial = nb.njit(fastmath=True, cache=True, error_model="numpy")(_decode_attention_py)
SERIAL_MAX_WORK = 1 << 17   # heads x keys x head_dim below which one thread is faster


_NO_SINKS = np.zeros(0, np.float32)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, window: int,
              scale: float, sinks: np.ndarray | None = None) -> np.ndarray:
    """q (T, n_head, hd) for positions pos0..pos0+T-1, whose K/V are already in the cache.
    Query at position p sees keys max(0, p-window+1)..p (window 0 = all). `sinks` (n_head,) adds a logit per
    head to each softmax's denominator only (gpt-oss; transformers eager_attention_forward drops its column).
    Returns (T, n_head, hd_v)."""
    T, n_head, hd = q.shape
    n_kv, _, hdv = v_cache.shape
    end = pos0 + T
    if T == 1:
        lo = max(0, end - window) if window else 0
        out = np.empty((1, n_head, hdv), np.float32)
        kernel = _decode_serial if n_head * (end - lo) * hd <= SERIAL_MAX_WORK else _decode_parallel
        kernel(q[0], k_cache, v_cache, end, lo, np.float32(scale), _NO_SINKS if sinks is None else sinks, out[0])
        return out
    lo = max(0, pos0 - window + 1) if window else 0
    keys = kv_as_f32(k_cache[:, lo:end])    # (n_kv, n, hd)
    vals = kv_as_f32(v_cache[:, lo:end])
    group = n_head // n_kv
    qp = np.arange(pos0, end)[:, None]
    kp = np.arange(lo, end)[None, :]
    masked = kp > qp
    if window:
        masked |= (qp - kp) >= window
    out = np.empty((T, n_head, hdv), np.float32)
    for kh in range(n_kv):
        qg = q[:, kh * group:(kh + 1) * group].transpose(1, 0, 2)    # (group, T, hd)
        s = np.matmul(qg, keys[kh].T) * np.float32(scale)            # (group, T, n)
        s[:, masked] = -np.inf
        m = s.max(axis=-1, keepdims=True)
        if sinks is not None:
            sink = sinks[kh * group:(kh + 1) * group, None, None]
            m = np.maximum(m, sink)
        s -= m
        np.exp(s, out=s)
        denom = s.sum(axis=-1, keepdims=True)
        if sinks is not None:
            denom += np.exp(sink - m)
        s /= denom
        out[:, kh * group:(kh + 1) * group] = np.matmul(s, vals[kh]).transpose(1, 0, 2)
    return out
