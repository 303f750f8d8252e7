"""Long context, one backend per process: prefill N random tokens, then decode G tokens at that depth.

    python tools/long_context_bench.py edgelm MODEL.gguf --ctx 8192 --prefill 8192 --decode 32 [-ctk f16 -ctv f16]
    ~/.cache/edgelm-reference/venv/bin/python tools/long_context_bench.py llama MODEL.gguf --ctx 8192 ...
    python tools/long_context_bench.py both MODEL.gguf ...   # runs each backend in its own process, prints the ratios

Prints one JSON line per backend: prefill t/s, decode t/s (G single-token steps after the prefill), peak RSS of
the process (ru_maxrss) and RSS growth over the load. Token ids are random (seeded), as llama-bench's are;
tokenization and sampling are not timed. llama.cpp runs through llama-cpp-python with n_batch 512 and its
default f16 cache (or the -ctk/-ctv types), the same thread count for prompt and generation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

LLAMA_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}   # ggml_type ids (ggml.h)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def run_edgelm(a) -> dict:
    import edgelm
    rss0 = current_rss_mib()
    m = edgelm.load(a.model, n_ctx=a.ctx, threads=a.threads, cache_type_k=a.ctk, cache_type_v=a.ctv)
    rng = np.random.default_rng(a.seed)
    ids = [int(t) for t in rng.integers(100, m.config.n_vocab - 100, size=a.prefill)]
    s = m.create_session()
    t = time.perf_counter()
    s.prefill(ids)
    pp = a.prefill / (time.perf_counter() - t)
    steps = [int(t) for t in rng.integers(100, m.config.n_vocab - 100, size=a.decode)]
    t = time.perf_counter()
    for tok in steps:
        s.decode(tok)
    tg = a.decode / (time.perf_counter() - t)
    return dict(backend="edgelm", pp_ts=round(pp, 2), tg_ts=round(tg, 2), peak_rss_mib=round(peak_rss_mib(), 1),
                rss_growth_mib=round(current_rss_mib() - rss0, 1))


def run_llama(a) -> dict:
    from llama_cpp import Llama
    rss0 = current_rss_mib()
    llm = Llama(model_path=a.model, n_ctx=a.ctx, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512,
                verbose=False, type_k=LLAMA_TYPES[a.ctk], type_v=LLAMA_TYPES[a.ctv],
                flash_attn=a.ctv != "f16" or a.ctk != "f16")   # llama.cpp needs flash attention for a quantized V
    vocab = llm.n_vocab()
    rng = np.random.default_rng(a.seed)
    ids = [int(t) for t in rng.integers(100, vocab - 100, size=a.prefill)]
    t = time.perf_counter()
    llm.eval(ids)
    pp = a.prefill / (time.perf_counter() - t)
    steps = [int(t) for t in rng.integers(100, vocab - 100, size=a.decode)]
    t = time.perf_counter()
    for tok in steps:
        llm.eval([tok])
    tg = a.decode / (time.perf_counter() - t)
    return dict(backend="llama.cpp", pp_ts=round(pp, 2), tg_ts=round(tg, 2), peak_rss_mib=round(peak_rss_mib(), 1),
                rss_growth_mib=round(current_rss_mib() - rss0, 1))


def run_both(a, argv) -> None:
    here = os.path.abspath(__file__)
    ref = os.path.expanduser("~/.cache/edgelm-reference/venv/bin/python")
    results = {}
    for backend, python in (("edgelm", sys.executable), ("llama", ref)):
        p = subprocess.run([python, here, backend, *argv[2:]], capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{backend} failed:\n{p.stderr[-3000:]}")
        results[backend] = json.loads(p.stdout.strip().splitlines()[-1])
        print(json.dumps(results[backend]), flush=True)
    e, l = results["edgelm"], results["llama"]
    print(json.dumps(dict(model=os.path.basename(a.model), ctx=a.ctx, prefill=a.prefill, decode=a.decode,
                          ctk=a.ctk, ctv=a.ctv, threads=a.threads,
                          pp_ratio=round(e["pp_ts"] / l["pp_ts"], 3), tg_ratio=round(e["tg_ts"] / l["tg_ts"], 3),
                          peak_rss_ratio=round(e["peak_rss_mib"] / l["peak_rss_mib"], 3))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backend", choices=["edgelm", "llama", "both"])
    ap.add_argument("model")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--prefill", type=int, default=8160)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-ctk", "--cache-type-k", dest="ctk", default="f16", choices=sorted(LLAMA_TYPES))
    ap.add_argument("-ctv", "--cache-type-v", dest="ctv", default="f16", choices=sorted(LLAMA_TYPES))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if a.prefill + a.decode > a.ctx:
        ap.error("--prefill + --decode must fit in --ctx")
    if a.backend == "both":
        run_both(a, sys.argv)
        return
    print(json.dumps(run_edgelm(a) if a.backend == "edgelm" else run_llama(a)))


if __name__ == "__main__":
    main()
