"""The per-layer KV cache (edgelm/runtime/kv_cache.py) and the attention kernels reading it
(edgelm/arch/attention.py), against plain NumPy references: gguf.quants for the stored bytes, and a
dequantize-everything, full-masked-softmax attention."""
from __future__ import annotations

import types

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from edgelm.arch.attention import exp32
from edgelm.errors import EdgeLMError
from edgelm.runtime.kv_cache import (CACHE_TYPES, LayerCache, cache_bytes, cache_bytes_per_token,
                                     make_caches)

GGML = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}
TYPES = list(CACHE_TYPES)
assert TYPES == ["f32", "f16", "q8_0", "q4_0"]


def hadamard32(x: np.ndarray) -> np.ndarray:
    """Each 32-element block times the orthonormal Walsh-Hadamard matrix (built here independently, as 5
    Kronecker powers of [[1, 1], [1, -1]] / sqrt 2)."""
    h = np.ones((1, 1))
    for _ in range(5):
        h = np.kron(h, np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2))
    return (x.astype(np.float64).reshape(-1, 32) @ h).reshape(x.shape).astype(np.float32)


def reference_rows(x: np.ndarray, cache_type: str) -> np.ndarray:
    """What rows of float32 `x` (..., hd) read back as after storing them in `cache_type`: quantized types hold
    the rows' Hadamard transform in gguf.quants' blocks (and read back through the inverse, itself)."""
    if cache_type == "f32":
        return x.astype(np.float32)
    if cache_type == "f16":
        return x.astype(np.float16).astype(np.float32)
    blocks = quants.quantize(hadamard32(x), GGML[cache_type])
    return hadamard32(quants.dequantize(blocks, GGML[cache_type]).astype(np.float32))


def reference_attention(q, keys, vals, positions, pos0, window, scale, sinks):
    """q (T, n_head, hd) at pos0..; keys/vals (n, n_kv, hd) f32 at `positions`; full masked softmax."""
    T, n_head, _ = q.shape
    n_kv = keys.shape[1]
    group = n_head // n_kv
    out = np.zeros((T, n_head, vals.shape[2]), np.float64)
    for t in range(T):
        p = pos0 + t
        seen = (positions <= p) & ((p - positions < window) if window else True)
        for h in range(n_head):
            s = keys[seen, h // group].astype(np.float64) @ q[t, h].astype(np.float64) * scale
            m = s.max() if sinks is None else max(s.max(), sinks[h])
            e = np.exp(s - m)
            denom = e.sum() + (0.0 if sinks is None else np.exp(sinks[h] - m))
            out[t, h] = (e / denom) @ vals[seen, h // group]
    return out.astype(np.float32)


class History:
    """Every K/V row ever stored, as float32, so the reference can see what the cache holds."""

    def __init__(self, type_k, type_v):
        self.type_k, self.type_v = type_k, type_v
        self.k, self.v = {}, {}

    def add(self, pos0, k, v):
        rk, rv = reference_rows(k, self.type_k), reference_rows(v, self.type_v)
        for t in range(k.shape[0]):
            self.k[pos0 + t], self.v[pos0 + t] = rk[t], rv[t]

    def expect(self, q, pos0, window, scale, sinks):
        pos = np.array(sorted(p for p in self.k if p < pos0 + q.shape[0]))
        keys = np.stack([self.k[p] for p in pos])
        vals = np.stack([self.v[p] for p in pos])
        return reference_attention(q, keys, vals, pos, pos0, window, scale, sinks)


def run(cache, hist, rng, pos0, T, n_head, sinks=None, scale=0.125):
    hd, hdv, n_kv = cache.head_dim, cache.head_dim_v, cache.n_kv
    k = rng.standard_normal((T, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((T, n_kv, hdv)).astype(np.float32)
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    cache.store(pos0, k, v)
    hist.add(pos0, k, v)
    out = np.empty((T, n_head, hdv), np.float32)
    cache.attend(q, pos0, scale, sinks, out)
    return out, hist.expect(q, pos0, cache.window, scale, sinks)


# ---- storage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("cache_type", TYPES)
def test_stored_bytes_match_the_block_format(cache_type):
    rng = np.random.default_rng(1)
    n_kv, hd, T = 2, 64, 5
    x = (rng.standard_normal((T, n_kv, hd)) * rng.uniform(0.01, 100, (T, n_kv, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0                       # an all-zero block (d = 0)
    x[1, 0, 5] = -np.abs(x[1, 0, :32]).max() * 2  # a negative extreme (q4_0 keeps its sign)
    x[2, 1, :] *= 1e-6                       # subnormal f16 scales
    c = LayerCache(n_kv, hd, hd, cache_type, cache_type, capacity=8)
    c.store(3, x, x)
    got = c.k[:, 3:3 + T]                    # (n_kv, T, units)
    if cache_type == "f32":
        want = x
    elif cache_type == "f16":
        want = x.astype(np.float16).view(np.uint16)
    else:
        want = quants.quantize(hadamard32(x), GGML[cache_type]).view(np.uint8)
    assert np.array_equal(got.transpose(1, 0, 2), want.reshape(got.transpose(1, 0, 2).shape))
    assert np.array_equal(c.v, c.k)


@pytest.mark.parametrize("cache_type", ["q8_0", "q4_0"])
def test_hadamard_basis_holds_keys_with_outlier_channels_better(cache_type):
    """Keys with a few large channels (as RoPE's low frequencies make them): stored in the Hadamard basis they
    read back more accurately than plain blocks of the same bytes would hold them (q8_0: over twice; q4_0,
    whose 16 steps dominate its error, by less)."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((256, 1, 64)).astype(np.float32)
    x[..., 60:64] *= 40.0
    plain = quants.dequantize(quants.quantize(x, GGML[cache_type]), GGML[cache_type])
    c = LayerCache(1, 64, 64, cache_type, cache_type, capacity=256)
    c.store(0, x, x)
    got = c.rows_f32("k", np.arange(256))
    err_plain, err_got = np.abs(plain - x).mean(), np.abs(got - x).mean()
    assert err_got < err_plain * {"q8_0": 0.5, "q4_0": 0.9}[cache_type], (err_got, err_plain)
    np.testing.assert_allclose(got, reference_rows(x, cache_type), rtol=1e-5, atol=1e-5)


def test_f16_rounding_matches_numpy_everywhere():
    rng = np.random.default_rng(2)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    x = bits.view(np.float32)
    x = x[np.isfinite(x)]
    x = np.concatenate([x, np.float32([0.0, -0.0, 65504, 65519.99, 65520, -65520, 2**-24, 2**-25,
                                       3 * 2**-26, 6.1e-5, 1e-8])])
    c = LayerCache(1, x.size, x.size, "f16", "f16", capacity=1)
    c.store(0, x.reshape(1, 1, -1), x.reshape(1, 1, -1))
    with np.errstate(over="ignore"):
        assert np.array_equal(c.k[0, 0], x.astype(np.float16).view(np.uint16))


def test_unknown_type_and_bad_head_size_are_one_line_errors():
    with pytest.raises(EdgeLMError, match="q5_0") as e:
        LayerCache(1, 64, 64, "q5_0", "f16", capacity=4)
    assert "\n" not in str(e.value)
    with pytest.raises(EdgeLMError, match="q8_0.*72") as e:
        LayerCache(1, 72, 72, "f16", "q8_0", capacity=4)
    assert "\n" not in str(e.value)


def _config(n_layer=6, window=16, pattern=3, hd=64):
    traits = types.SimpleNamespace(swa_pattern=pattern)
    cfg = types.SimpleNamespace(n_layer=n_layer, n_head_kv=2, head_dim=hd, head_dim_v=hd,
                                sliding_window=window, traits=traits)
    cfg.is_swa_layer = lambda il: bool(window) and pattern > 0 and (pattern == 1 or (il + 1) % pattern != 0)
    return cfg


@pytest.mark.parametrize("tk,tv", [("f16", "f16"), ("q8_0", "q4_0"), ("f32", "q8_0")])
def test_cache_bytes_is_what_make_caches_allocates(tk, tv):
    cfg = _config()
    caches = make_caches(cfg, 1000, tk, tv, n_batch=8)
    assert cache_bytes(cfg, 1000, tk, tv, n_batch=8) == sum(c.nbytes for c in caches)
    assert [c.window for c in caches] == [16, 16, 0, 16, 16, 0]
    assert [c.capacity for c in caches] == [23, 23, 1000, 23, 23, 1000]
    full = [c for c in caches if not c.window]
    assert cache_bytes_per_token(cfg, tk, tv) * 1000 == sum(c.nbytes for c in full)


# ---- attention vs the reference --------------------------------------------------------------

def _tol(type_k, type_v):
    return 2e-3 if "q4_0" in (type_k, type_v) else 1e-4


@pytest.mark.parametrize("type_k,type_v", [(t, t) for t in TYPES] + [("q8_0", "f16")])
def test_prefill_then_decode_matches_reference(type_k, type_v):
    rng = np.random.default_rng(3)
    n_kv, n_head, hd = 2, 6, 64
    c = LayerCache(n_kv, hd, hd, type_k, type_v, capacity=300)
    h = History(type_k, type_v)
    for pos0, T in [(0, 70), (70, 1), (71, 45), (116, 1), (117, 1)]:
        got, want = run(c, h, rng, pos0, T, n_head)
        np.testing.assert_allclose(got, want, atol=_tol(type_k, type_v), rtol=0)


@pytest.mark.parametrize("n_head,n_kv,hd", [(4, 1, 256), (9, 3, 64), (2, 2, 32)])
def test_gqa_shapes_and_sinks(n_head, n_kv, hd):
    rng = np.random.default_rng(4)
    sinks = rng.standard_normal(n_head).astype(np.float32) * 2
    c = LayerCache(n_kv, hd, hd, "f16", "f16", capacity=700)
    h = History("f16", "f16")
    for pos0, T in [(0, 33), (33, 1), (34, 600), (634, 1)]:
        got, want = run(c, h, rng, pos0, T, n_head, sinks=sinks)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cache_type", ["f16", "q8_0"])
def test_ring_equals_full_cache_with_window_over_three_windows(cache_type):
    """A ring of window + batch - 1 slots gives what a full cache with the window mask gives, through
    batched prefill, decode, and a rewind to a position the ring still holds."""
    rng = np.random.default_rng(5)
    W, n_batch, n_kv, n_head, hd = 40, 16, 1, 3, 64
    ring = LayerCache(n_kv, hd, hd, cache_type, cache_type, capacity=W + n_batch - 1, window=W)
    full = LayerCache(n_kv, hd, hd, cache_type, cache_type, capacity=4 * W, window=W)
    h = History(cache_type, cache_type)

    def step(pos0, T):
        k = rng.standard_normal((T, n_kv, hd)).astype(np.float32)
        v = rng.standard_normal((T, n_kv, hd)).astype(np.float32)
        q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
        outs = []
        for c in (ring, full):
            c.store(pos0, k, v)
            o = np.empty((T, n_head, hd), np.float32)
            c.attend(q, pos0, 0.125, None, o)
            outs.append(o)
        h.add(pos0, k, v)
        np.testing.assert_array_equal(outs[0], outs[1])
        np.testing.assert_allclose(outs[0], h.expect(q, pos0, W, 0.125, None), atol=1e-4, rtol=0)

    pos = 0
    for T in [16] * 5 + [1] * 30 + [7, 16, 16]:
        step(pos, T)
        pos += T
    assert pos >= 3 * W
    # rewind (truncate / prefix reuse) as far back as the ring allows, then continue
    back = ring.oldest_kept(pos) + W - 1
    assert ring.can_resume_at(back, pos) and not ring.can_resume_at(back - 1, pos)
    for p in list(h.k):
        if p >= back:
            del h.k[p], h.v[p]
    pos = back
    for T in [5, 1, 1, 16]:
        step(pos, T)
        pos += T


def test_a_batch_that_would_overwrite_needed_keys_is_refused():
    c = LayerCache(1, 32, 32, "f16", "f16", capacity=10, window=5)
    x = np.zeros((7, 1, 32), np.float32)
    with pytest.raises(EdgeLMError, match="window 5"):
        c.store(20, x, x)


def _rope(k, positions, base=10000.0):
    """Neox-style rotation of k (n, n_kv, hd) by `positions` (n,) in float64."""
    hd = k.shape[-1]
    inv = base ** (-np.arange(0, hd, 2) / hd)
    ang = positions[:, None, None] * inv[None, None, :]
    a, b = k[..., :hd // 2], k[..., hd // 2:]
    cos, sin = np.cos(ang), np.sin(ang)
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)


@pytest.mark.parametrize("cache_type,window,cap", [("f16", 0, 64), ("q8_0", 0, 64), ("f32", 24, 31)])
def test_shift_moves_and_rerotates(cache_type, window, cap):
    rng = np.random.default_rng(6)
    n_kv, hd, end, n_keep, n_discard = 2, 64, 60 if not window else 50, 4, 20
    raw = rng.standard_normal((end, n_kv, hd))
    k = _rope(raw, np.arange(end)).astype(np.float32)
    v = rng.standard_normal((end, n_kv, hd)).astype(np.float32)
    c = LayerCache(n_kv, hd, hd, cache_type, cache_type, capacity=cap, window=window)
    for p0 in range(0, end, 5):
        c.store(p0, k[p0:p0 + 5], v[p0:p0 + 5])
    first = max(c.oldest_kept(end), n_keep + n_discard)
    v_before = c.rows_f32("v", np.arange(first, end))

    def rotate(x, delta):
        x[...] = _rope(x.astype(np.float64), np.full(x.shape[0], float(delta)))

    c.shift(n_keep, n_discard, end, rotate)
    new = np.arange(first, end) - n_discard
    want = _rope(raw[first:end], new.astype(np.float64)).astype(np.float32)
    tol = {"f32": 1e-5, "f16": 4e-3, "q8_0": 0.05}[cache_type]
    np.testing.assert_allclose(c.rows_f32("k", new), want, atol=tol * np.abs(want).max())
    np.testing.assert_array_equal(c.rows_f32("v", new), v_before)
    if not window:   # the kept prefix is untouched
        np.testing.assert_allclose(c.rows_f32("k", np.arange(n_keep)), reference_rows(k[:n_keep], cache_type),
                                   rtol=1e-5, atol=1e-6)


def test_exp32_is_close_to_numpy():
    x = np.concatenate([np.linspace(-100, 0, 100_001, dtype=np.float32), np.float32([-np.inf, 0, 5, 80])])
    import numba as nb
    f = nb.njit(lambda a: np.array([exp32(v) for v in a], np.float32))
    got = f(x)
    want = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=2e-38)   # below e**-87: 0


@pytest.mark.parametrize("cache_type,hd,hdv", [("f16", 64, 32), ("f32", 20, 12), ("q8_0", 96, 64)])
def test_head_sizes_of_k_and_v_may_differ(cache_type, hd, hdv):
    rng = np.random.default_rng(7)
    c = LayerCache(2, hd, hdv, cache_type, cache_type, capacity=200)
    h = History(cache_type, cache_type)
    for pos0, T in [(0, 90), (90, 1), (91, 17)]:
        got, want = run(c, h, rng, pos0, T, 4)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
