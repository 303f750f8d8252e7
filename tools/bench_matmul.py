"""Prefill matmul speed per quant type next to float32 SGEMM (the BLAS NumPy ships), in GFLOP/s:

    python3 tools/bench_matmul.py                     # 512 tokens, the 1B-class shapes, 1 and 2 threads
    python3 tools/bench_matmul.py --tokens 128 --types Q4_0,Q8_0 -t 4 --shapes 4096x4096

Each shape (out x in) is timed as `FusedLinear(W)(X)` on random blocks (the prefill path: weight tiles
decoded to float32, register-blocked FMAs) and as `X @ W.T` with float32 NumPy arrays of the same shape;
best of --reps.  Thread counts run in separate processes, since OpenBLAS reads OPENBLAS_NUM_THREADS once.
Prints a markdown table (docs/benchmarks.md, "Prefill at the float32 limit").
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SHAPES = "8192x2048,3072x2048,2048x8192"   # gate/up, fused q/k/v, down of the 1B-class model


def measure(a) -> dict:
    import numpy as np

    from edgelm.quant import FORMATS, FusedLinear
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_matvec import best_seconds as best
    from bench_matvec import random_weights

    rng = np.random.default_rng(0)
    out = {}
    for shape in a.shapes.split(","):
        n_out, n_in = (int(v) for v in shape.split("x"))
        X = rng.standard_normal((a.tokens, n_in)).astype(np.float32)
        flops = 2.0 * a.tokens * n_in * n_out
        Wf = rng.standard_normal((n_out, n_in)).astype(np.float32)
        row = {"SGEMM": flops / best(lambda: X @ Wf.T, a.reps) / 1e9}
        for name in a.types.split(","):
            ggml_type = next(t for t, f in FORMATS.items() if f.name == name)
            lin = FusedLinear([(random_weights(name, n_out, n_in, rng), ggml_type, n_out)], n_in)
            row[name] = flops / best(lambda: lin(X), a.reps) / 1e9
        out[shape] = row
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--shapes", default=SHAPES, help="out x in, comma-separated")
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0,Q4_0")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(measure(a)))
        return 0
    threads = [int(t) for t in a.threads.split(",")]
    results = {}
    for nt in threads:
        env = dict(os.environ, OPENBLAS_NUM_THREADS=str(nt), NUMBA_NUM_THREADS=str(nt))
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "--tokens", str(a.tokens),
               "--shapes", a.shapes, "--types", a.types, "--reps", str(a.reps)]
        results[nt] = json.loads(subprocess.run(cmd, env=env, check=True, capture_output=True,
                                                text=True).stdout.strip().splitlines()[-1])
    cols = ["SGEMM"] + a.types.split(",")
    per = " / ".join(str(t) for t in threads)
    print(f"GFLOP/s, {a.tokens} tokens, threads {per}\n")
    print("| shape (out × in) | " + " | ".join(f"{c} {per}" for c in cols) + " |")
    print("| --- |" + " ---: |" * len(cols))
    for shape in a.shapes.split(","):
        cells = [" / ".join(f"{results[t][shape][c]:.0f}" for t in threads) for c in cols]
        print(f"| {shape.replace('x', ' × ')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
