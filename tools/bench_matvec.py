"""Decode matvec speed per quant type: GB/s of weights streamed and ns per weight, at each thread count,
next to the machine's plain memory-read bandwidth (a Numba loop summing the same number of bytes).

    python tools/bench_matvec.py                      # all types, threads 1 and 2, 256 MiB per matrix
    python tools/bench_matvec.py -t 1,2,4 --types Q4_0,Q4_K --mib 128 --md

Each matrix is bigger than any last-level cache, so the kernel streams it from RAM as decode does with a
model's layers. Blocks are random bytes with their float16 scale fields set to small normal values (block
layouts: ggml/src/ggml-common.h), so every weight is finite and no denormals slow the arithmetic.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("GOMP_SPINCOUNT", "1000")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from edgelm.quant import kernels  # noqa: E402
from edgelm.quant.formats import FORMATS, row_bytes  # noqa: E402

# Byte offsets of the float16 scale fields inside one block (ggml-common.h block_* structs).
_F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
               "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_NL": [0], "IQ4_XS": [0], "Q3_K": [108],
               "Q2_K": [80, 82], "TQ1_0": [52], "TQ2_0": [64], "IQ2_XXS": [0], "IQ2_XS": [0], "IQ2_S": [0],
               "IQ3_XXS": [0], "IQ3_S": [0], "IQ1_S": [0]}


def random_weights(name: str, n_out: int, n_in: int, rng) -> np.ndarray:
    ggml_type = next(t for t, f in FORMATS.items() if f.name == name)
    rb = row_bytes(ggml_type, n_in)
    raw = rng.integers(0, 256, size=(n_out, rb), dtype=np.uint8)
    fmt = FORMATS[ggml_type]
    if name in ("F32", "F16", "BF16"):
        vals = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        raw = {"F32": vals, "F16": vals.astype(np.float16),
               "BF16": (vals.view(np.uint32) >> 16).astype(np.uint16)}[name].view(np.uint8).reshape(n_out, rb)
        return np.ascontiguousarray(raw)
    if name == "MXFP4":                      # e8m0 scale byte first: keep it near 2^0
        blocks = raw.reshape(n_out, -1, fmt.type_size)
        blocks[:, :, 0] = rng.integers(120, 128, size=blocks.shape[:2], dtype=np.uint8)
        return raw
    blocks = raw.reshape(n_out, -1, fmt.type_size)
    if name == "IQ1_M":                      # d is the top nibbles of the four u16 scales (bytes 48..55)
        sc = blocks[:, :, 48:56].copy().view(np.uint16)
        d = int(np.float16(0.01).view(np.uint16))
        for k in range(4):
            sc[:, :, k] = (sc[:, :, k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        blocks[:, :, 48:56] = sc.view(np.uint8)
        return raw
    scales = np.full(blocks.shape[:2], 0.01, np.float16).view(np.uint8).reshape(*blocks.shape[:2], 2)
    for off in _F16_FIELDS[name]:
        blocks[:, :, off:off + 2] = scales
    return raw


@njit(cache=True)
def _sum_words(words, lo, hi):
    s = np.uint64(0)
    for w in words[lo:hi]:   # iterating a slice vectorizes; `for i in range(lo, hi)` did not (5 vs 30 GB/s)
        s += w
    return s


@njit(parallel=True, cache=True)
def _read_all(words, nchunks):
    """Sum every 64-bit word (the memory read the kernels compete with), split like the matvec: integer
    adds over a slice, which LLVM vectorizes, so this is bound by memory, not by the adds."""
    n = words.size
    acc = np.zeros(nchunks, np.uint64)
    for t in prange(nchunks):
        acc[t] = _sum_words(words, n * t // nchunks, n * (t + 1) // nchunks)
    return acc.sum()


def best_seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("--types", default="F16,Q8_0,Q4_0,Q4_1,Q5_0,Q5_1,Q4_K,Q5_K,Q6_K,MXFP4,"
                                       "IQ4_NL,IQ4_XS,Q3_K,Q2_K,TQ1_0,TQ2_0,IQ3_S,IQ3_XXS,IQ2_S,IQ2_XS,"
                                       "IQ2_XXS,IQ1_M,IQ1_S")
    ap.add_argument("--n-in", type=int, default=2048)
    ap.add_argument("--mib", type=int, default=256, help="size of each weight matrix")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--passes", default="0,1,2", help="matvec modes (kernels.set_matvec_passes)")
    ap.add_argument("--md", action="store_true", help="print a markdown table")
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(a.n_in).astype(np.float32)
    rows = []
    words = np.ones(a.mib * 2 ** 20 // 8, np.uint64)
    for nt in threads:
        numba.set_num_threads(nt)
        s = best_seconds(lambda: _read_all(words, kernels._NCHUNKS), a.reps)
        rows.append(("memory read", nt, words.nbytes / s / 1e9, float("nan")))
    words = None                       # free it before the weights
    for name in a.types.split(","):
        ggml_type = next(t for t, f in FORMATS.items() if f.name == name)
        n_out = a.mib * 2 ** 20 // row_bytes(ggml_type, a.n_in)
        raw = random_weights(name, n_out, a.n_in, rng)
        y = np.empty(n_out, np.float32)
        for passes in [int(p) for p in a.passes.split(",")]:
            kernels.set_matvec_passes(passes)
            label = name if passes == 0 or name in ("F32", "F16", "BF16") else f"{name} int{passes}"
            if label != name or passes == 0:
                for nt in threads:
                    numba.set_num_threads(nt)
                    s = best_seconds(lambda: kernels.matvec(raw, ggml_type, n_out, a.n_in, x, out=y), a.reps)
                    rows.append((label, nt, raw.nbytes / s / 1e9, s / (n_out * a.n_in) * 1e9))
        raw = y = None
    if a.md:
        print("| type | threads | GB/s | ns / weight |\n| --- | ---: | ---: | ---: |")
        for name, nt, gbs, ns in rows:
            print(f"| {name} | {nt} | {gbs:.1f} | {'' if ns != ns else f'{ns:.3f}'} |")
    else:
        for name, nt, gbs, ns in rows:
            print(f"{name:12s} t={nt:2d} {gbs:7.1f} GB/s {ns:8.3f} ns/weight")
    return 0


if __name__ == "__main__":
    sys.exit(main())
