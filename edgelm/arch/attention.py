"""Causal attention over the f16 KV cache (stored as uint16 bits: Numba has no float16 on CPU).

Prefill (many queries) converts the visible K/V slice to float32 once and uses BLAS; decode (one query)
runs a Numba kernel that converts f16 in registers, so the cache is never copied per token.
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(inline="always")
def _f16_to_f32(h):
    # Bit conversion of IEEE half to single, incl. subnormals, inf, nan (F. Giesen's "half to float").
    h32 = np.uint32(h)
    o = (h32 & np.uint32(0x7FFF)) << np.uint32(13)
    exp = o & np.uint32(0x0F800000)
    o = o + np.uint32(112 << 23)
    if exp == np.uint32(0x0F800000):
        o = o + np.uint32(112 << 23)
    elif exp == np.uint32(0):
        o = o + np.uint32(1 << 23)
        f = np.array([o], dtype=np.uint32).view(np.float32)[0] - np.float32(6.103515625e-05)
        o = np.array([f], dtype=np.float32).view(np.uint32)[0]
    o = o | ((h32 & np.uint32(0x8000)) << np.uint32(16))
    return o


@nb.njit(parallel=True, fastmath=True, cache=True)
def _decode_attention(q, kc, vc, n_keys, lo, scale, out):
    # q (n_head, hd) f32; kc/vc (n_kv, n_ctx, hd) uint16; keys lo..n_keys-1 are visible; out (n_head, hdv)
    n_head, hd = q.shape
    n_kv = kc.shape[0]
    hdv = vc.shape[2]
    group = n_head // n_kv
    n = n_keys - lo
    for h in nb.prange(n_head):
        kh = h // group
        s = np.empty(n, np.float32)
        kf = np.empty(hd, np.uint32)
        m = np.float32(-np.inf)
        for j in range(n):
            krow = kc[kh, lo + j]
            for d in range(hd):
                kf[d] = _f16_to_f32(krow[d])
            kv = kf.view(np.float32)
            acc = np.float32(0.0)
            for d in range(hd):
                acc += q[h, d] * kv[d]
            acc *= scale
            s[j] = acc
            if acc > m:
                m = acc
        tot = np.float32(0.0)
        for j in range(n):
            e = np.exp(s[j] - m)
            s[j] = e
            tot += e
        inv = np.float32(1.0) / tot
        o = np.zeros(hdv, np.float32)
        vf = np.empty(hdv, np.uint32)
        for j in range(n):
            w = s[j] * inv
            vrow = vc[kh, lo + j]
            for d in range(hdv):
                vf[d] = _f16_to_f32(vrow[d])
            vv = vf.view(np.float32)
            for d in range(hdv):
                o[d] += w * vv[d]
        out[h, :] = o


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, pos0: int, window: int,
              scale: float) -> np.ndarray:
    """q (T, n_head, hd) for positions pos0..pos0+T-1, whose K/V are already in the cache.
    Query at position p sees keys max(0, p-window+1)..p (window 0 = all). Returns (T, n_head, hd_v)."""
    T, n_head, hd = q.shape
    n_kv, _, hdv = v_cache.shape
    end = pos0 + T
    if T == 1:
        lo = max(0, end - window) if window else 0
        out = np.empty((1, n_head, hdv), np.float32)
        _decode_attention(q[0], k_cache, v_cache, end, lo, np.float32(scale), out[0])
        return out
    lo = max(0, pos0 - window + 1) if window else 0
    keys = k_cache[:, lo:end].view(np.float16).astype(np.float32)    # (n_kv, n, hd)
    vals = v_cache[:, lo:end].view(np.float16).astype(np.float32)
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
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        out[:, kh * group:(kh + 1) * group] = np.matmul(s, vals[kh]).transpose(1, 0, 2)
    return out
