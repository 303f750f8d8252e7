"""Quantizer speed and equality: edgelm quantize next to llama.cpp's quantizer on the 1B-class F16 file of
tools/make_bench_model.py (issue 13's target: Q4_K_M in <= 2x llama.cpp's time on 2 threads).

Writes the F16 file to a temporary folder, quantizes it with llama.cpp (llama-cpp-python's
llama_model_quantize, no imatrix) and with edgelm (`edgelm quantize`, its own process) at the same thread
count, alternating, and prints wall times, their ratio, and whether every tensor's bytes are the same.

    ~/.cache/edgelm-reference/venv/bin/python tools/bench_quantize.py [--ftypes q4_k_m,q6_k] [-t 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bench_model import quantize as llamacpp_quantize, write_f16  # noqa: E402


def main(argv=None) -> int:
    import gguf
    from edgelm.catalog import resolve
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ftypes", default="q4_k_m")
    ap.add_argument("-t", "--threads", type=int, default=2)
    a = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=ROOT, NUMBA_NUM_THREADS=str(a.threads))
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "f16.gguf")
        write_f16(src, str(resolve("smollm2-135m")))
        for ft in a.ftypes.split(","):
            ref, ours = os.path.join(tmp, "llamacpp.gguf"), os.path.join(tmp, "edgelm.gguf")
            t0 = time.perf_counter()
            llamacpp_quantize(src, ref, ft.upper(), a.threads)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "edgelm", "quantize", src, ours, ft], env=env,
                               capture_output=True, text=True)
            t_ours = time.perf_counter() - t0
            if p.returncode:
                raise SystemExit(p.stderr[-800:])
            x = {t.name: t for t in gguf.GGUFReader(ref).tensors}
            y = {t.name: t for t in gguf.GGUFReader(ours).tensors}
            same = x.keys() == y.keys() and all(
                x[n].tensor_type == y[n].tensor_type and np.array_equal(np.asarray(x[n].data), np.asarray(y[n].data))
                for n in x)
            print(f"{ft}: llama.cpp {t_ref:.1f} s, edgelm {t_ours:.1f} s ({t_ours / t_ref:.2f}x, process start and "
                  f"compilation included), {a.threads} threads; every tensor byte-identical: {same}", flush=True)
            os.remove(ref)
            os.remove(ours)
    return 0


if __name__ == "__main__":
    sys.exit(main())
