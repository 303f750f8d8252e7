"""Attention kernel timings of the per-layer caches (runtime/kv_cache.py LayerCache.attend) per storage type,
for SmolLM2's and Gemma 3 270M's head shapes. (The model-wide f16 kernels they replaced measured, on the same
machine: SmolLM2 shape at depth 8192 0.76 ms per layer call against 0.33, prefill 8192 1.64 s against 0.76;
see docs/benchmarks.md.)

    python3 tools/bench_attention.py                  # decode at depths 512/4096/8192 + prefill 8192
    python3 tools/bench_attention.py --no-prefill
Decode: one query per step, time per layer call (mean of many).  Prefill: the attention time of
evaluating `depth` tokens in 512-token batches, one layer.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from edgelm.runtime.kv_cache import LayerCache

SHAPES = {"smollm2": (9, 3, 64), "gemma3": (4, 1, 256)}


def _timeit(fn, min_s=0.5):
    """The fastest of repeated runs (other processes on the machine only ever add time)."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + min_s
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _inputs(name, depth, n_queries):
    """Random K, V (depth, n_kv, hd) and queries (n_queries, n_head, hd) for a model's head shape."""
    n_head, n_kv, hd = SHAPES[name]
    rng = np.random.default_rng(0)
    k = rng.standard_normal((depth, n_kv, hd)).astype(np.float32)
    v = rng.standard_normal((depth, n_kv, hd)).astype(np.float32)
    q = rng.standard_normal((n_queries, n_head, hd)).astype(np.float32)
    return k, v, q


def bench_decode(name, depth, types):
    n_head, n_kv, hd = SHAPES[name]
    k, v, q = _inputs(name, depth, 1)
    row = {}
    out = np.empty((1, n_head, hd), np.float32)
    for t in types:
        c = LayerCache(n_kv, hd, hd, t, t, capacity=depth)
        for p0 in range(0, depth, 512):
            c.store(p0, k[p0:p0 + 512], v[p0:p0 + 512])
        row[t] = _timeit(lambda: c.attend(q, depth - 1, 0.125, None, out))
    return row


def bench_decode_token(name, depth, types, n_layer=30):
    """One decode step over n_layer caches of `depth` keys: the KV does not fit the CPU caches, as in a
    real model (SmolLM2: 30 layers x 3 kv heads x 8192 keys of f16 = 189 MB)."""
    n_head, n_kv, hd = SHAPES[name]
    k, v, q = _inputs(name, depth, 1)
    row = {}
    out = np.empty((1, n_head, hd), np.float32)
    for t in types:
        caches = [LayerCache(n_kv, hd, hd, t, t, capacity=depth) for _ in range(n_layer)]
        for c in caches:
            for p0 in range(0, depth, 512):
                c.store(p0, k[p0:p0 + 512], v[p0:p0 + 512])
        row[t] = _timeit(lambda: [c.attend(q, depth - 1, 0.125, None, out) for c in caches])
    return row


def bench_prefill(name, depth, batch, types, reps=2):
    """Seconds of attention to evaluate `depth` tokens in `batch`-token batches (one layer), the fastest
    of `reps` interleaved rounds."""
    n_head, n_kv, hd = SHAPES[name]
    k, v, q = _inputs(name, depth, depth)
    caches = {}
    for t in types:
        caches[t] = LayerCache(n_kv, hd, hd, t, t, capacity=depth)
        caches[t].store(0, k, v)
    out = np.empty((batch, n_head, hd), np.float32)

    def new(c):
        for p0 in range(0, depth, batch):
            c.attend(q[p0:p0 + batch], p0, 0.125, None, out)

    for c in caches.values():
        c.attend(q[:batch], 0, 0.125, None, out)
    row = {}
    for _ in range(reps):
        for label, fn in [(t, lambda c=c: new(c)) for t, c in caches.items()]:
            t0 = time.perf_counter()
            fn()
            row[label] = min(row.get(label, float("inf")), time.perf_counter() - t0)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--types", default="f16,q8_0,q4_0,f32")
    ap.add_argument("--depths", default="512,4096,8192")
    ap.add_argument("--no-prefill", action="store_true")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--token", type=int, default=0, help="also time a decode step over this many layers")
    a = ap.parse_args()
    types = a.types.split(",")
    if not a.no_decode:
        print("decode, ms per layer call:", "  ".join(types))
        for name in SHAPES:
            for depth in map(int, a.depths.split(",")):
                r = bench_decode(name, depth, types)
                print(f"{name:8s} {depth:6d}  " + "  ".join(f"{r[c] * 1e3:8.3f}" for c in r))
    if a.token:
        print(f"decode step over {a.token} layers, ms per token:", "  ".join(types))
        for name in SHAPES:
            for depth in map(int, a.depths.split(",")):
                r = bench_decode_token(name, depth, types, a.token)
                print(f"{name:8s} {depth:6d}  " + "  ".join(f"{r[c] * 1e3:8.3f}" for c in r))
    if not a.no_prefill:
        print("prefill 8192 in 512-token batches, s per layer:", "  ".join(types))
        for name in SHAPES:
            r = bench_prefill(name, 8192, 512, types)
            print(f"{name:8s}  " + "  ".join(f"{r[c]:8.3f}" for c in r))


if __name__ == "__main__":
    main()
