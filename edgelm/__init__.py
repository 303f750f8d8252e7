"""edgelm: quantized LLMs from GGUF files on laptop CPUs, in Python with NumPy + Numba.

    import edgelm
    m = edgelm.load("smollm2-135m")          # a catalog name or a path to a .gguf
    text = m.generate("The capital of France is", max_tokens=16, temperature=0)
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

# How Numba's OpenMP workers wait between parallel regions. A decode step runs ~100-200 regions, a few to
# tens of microseconds apart (Python's glue between kernels, so longer on a slower core). Sleeping at once
# (OMP_WAIT_POLICY=passive) makes every region pay a futex wake-up; spinning long (libgomp's default, ~3 ms)
# wastes a core that another process needs, and a descheduled spinner stalls the next barrier. A brief spin
# (GOMP_SPINCOUNT=2000: ~20 us at ~10 ns per spin, measured) covers the gaps inside one token and sleeps
# between tokens. SmolLM2 tg at 2 threads, t/s (docs/benchmarks.md, "Thread wait policy"), idle / next to one
# busy process: 2-core Intel Xeon VM: passive 60 / 71, 1000 spins 72 / 53, 2000 spins 110 / 49, 10000 spins
# 124 / 30 (llama.cpp 86 / 2); 2-core AMD EPYC VM: passive 70 / 64, 1000 spins 120 / 48, 10000 spins - / 18
# (llama.cpp 119 / 36). libgomp reads these when it loads (at the first parallel kernel call); a user's
# OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")
# Likewise NumPy's OpenBLAS (prefill attention) keeps its threads spinning ~0.1 s after each call, taking both
# cores from the Numba kernel that follows: pp512 measured 324 -> 500 t/s (Gemma 3) with a short timeout.
# It takes effect only if set before NumPy is first imported (true for the CLI and for `import edgelm` first).
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .errors import ContextError, EdgeLMError, GGUFError, ModelNotFoundError, UnsupportedError

if TYPE_CHECKING:
    from .model import Model

__version__ = "0.1.0"
__all__ = ["load", "Model", "EdgeLMError", "GGUFError", "UnsupportedError", "ContextError", "ModelNotFoundError"]


def load(model: str | os.PathLike | None = None, n_ctx: int | None = None, threads: int | None = None,
         cache_type_k: str = "f16", cache_type_v: str = "f16", kv_type: str | None = None) -> "Model":
    """Open a GGUF model: a file path, or a catalog name ("smollm2-135m", "gemma3-270m") fetched on first use.
    n_ctx: context size (default min(4096, training context)); threads: compute threads (default: all cores);
    cache_type_k / cache_type_v: KV cache storage, "f16" (default), "q8_0", "q4_0" or "f32" (llama.cpp's
    -ctk/-ctv); kv_type sets both (the older keyword)."""
    from .catalog import resolve
    from .model import Model
    return Model(str(resolve(model)), n_ctx=n_ctx, threads=threads, cache_type_k=cache_type_k,
                 cache_type_v=cache_type_v, kv_type=kv_type)


def __getattr__(name):
    if name == "Model":
        from .model import Model
        return Model
    raise AttributeError(name)
