"""Decode speed of every quant type, edgelm next to llama.cpp on the same files (issue 12's speed check at
model level).

For each type it writes a random-block llama model whose every matrix has that type (tests/quant_model.py,
a larger shape: d 2048, 4 layers, ff 5632, vocabulary 512, ~190 M weights), then measures tg (single-token
decode steps, as llama-bench) in edgelm (`edgelm bench -p 0 -n N -t T -o json`, its own process) and in
llama.cpp (llama-cpp-python, in this process), alternating, and prints a markdown table: t/s of both, their
ratio, and each runtime's time per weight byte relative to its own Q4_K (how much slower than Q4_K a type is
per byte read: what issue 12's 1.5x asks of edgelm, and what llama.cpp reaches).

Run with a Python that has llama-cpp-python (the reference venv of ../shared/tools/setup-reference.sh):
    ~/.cache/edgelm-reference/venv/bin/python tools/bench_quant_types.py [--types Q4_K,IQ2_XXS] [-t 1,2]
Files go to a temporary folder and are removed (never commit them). Close other work first.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.quant_model import SHAPE, T, write_model  # noqa: E402

BENCH_SHAPE = dict(SHAPE, n_embd=2048, n_layer=4, n_head=16, n_head_kv=4, n_ff=5632)
TYPES = ["Q4_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q3_K", "Q2_K", "TQ2_0", "TQ1_0",
         "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


def weight_bytes(path: str) -> int:
    return sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors if t.name != "token_embd.weight")


def edgelm_tg(path: str, n: int, threads: int, reps: int) -> float:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "edgelm", "bench", "-m", path, "-p", "0", "-n", str(n),
                        "-t", str(threads), "-r", str(reps), "-o", "json"],
                       capture_output=True, text=True, env=env, timeout=1800)
    if p.returncode:
        raise SystemExit(f"edgelm bench failed on {path}: {p.stderr.strip()[-500:]}")
    return float(json.loads(p.stdout)[0]["avg_ts"])


def llamacpp_tg(path: str, n: int, threads: int, reps: int) -> float:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=n + 8, n_threads=threads, n_threads_batch=threads, verbose=False)
    rng = np.random.default_rng(0)
    rates = []
    for rep in range(reps + 1):                  # the first run warms up, as edgelm bench's does
        llm.reset()
        llm.eval([1])
        t = time.perf_counter()
        for _ in range(n):
            llm.eval([int(rng.integers(3, llm.n_vocab()))])
        if rep:
            rates.append(n / (time.perf_counter() - t))
    llm.close()
    return statistics.mean(rates)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("-t", "--threads", default="1,2")
    ap.add_argument("-n", type=int, default=32, help="tokens per tg run")
    ap.add_argument("-r", "--reps", type=int, default=3)
    a = ap.parse_args(argv)
    threads = [int(t) for t in a.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.types.split(","):
            path = os.path.join(tmp, f"{name}.gguf")
            write_model(path, T[name], shape=BENCH_SHAPE)
            size = weight_bytes(path)
            for t in threads:
                ours, theirs = edgelm_tg(path, a.n, t, a.reps), llamacpp_tg(path, a.n, t, a.reps)
                rows.append((name, t, size, ours, theirs))
                print(f"{name:8s} t={t} {size / 2**20:7.1f} MiB  edgelm {ours:7.2f} t/s  llama.cpp {theirs:7.2f} t/s",
                      file=sys.stderr, flush=True)
            os.remove(path)
    base = {(t, who): size * rate for name, t, size, *rates in rows if name == "Q4_K"
            for who, rate in zip((0, 1), rates)}                 # Q4_K's bytes per second, per runtime
    print("| type | threads | weights MiB | edgelm t/s | llama.cpp t/s | edgelm / llama.cpp "
          "| time per byte vs Q4_K: edgelm | llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, t, size, ours, theirs in rows:
        rel = [f"{base[(t, who)] / (size * rate):.2f}×" if (t, who) in base else "-"
               for who, rate in ((0, ours), (1, theirs))]
        print(f"| {name} | {t} | {size / 2**20:.1f} | {ours:.2f} | {theirs:.2f} | {ours / theirs:.2f}× "
              f"| {rel[0]} | {rel[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
