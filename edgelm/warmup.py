"""First run on a machine: say once that the kernels are being compiled, and compile them right away.

Numba caches compiled kernels on disk (`cache=True`), so only the first run pays ~10-30 s. A marker file
keyed by the kernel sources, the Numba version and the CPU records that the cache is filled; without it,
loading a model logs one line and runs a tiny forward pass (prefill and decode paths) to compile everything
up front instead of stalling in the middle of the first reply.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
from pathlib import Path

import numpy as np

log = logging.getLogger("edgelm")

_KERNEL_SOURCES = ("quant/formats.py", "quant/grids.py", "quant/kernels.py", "arch/attention.py", "arch/blocks.py",
                   "runtime/kv_cache.py")


def _marker() -> Path:
    import numba
    here = Path(__file__).parent
    h = hashlib.sha256()
    for rel in _KERNEL_SOURCES:
        h.update((here / rel).read_bytes())
    h.update(f"{numba.__version__}|{platform.machine()}|{platform.processor()}|{_cpu_name()}".encode())
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgelm" / "compiled"
    return base / h.hexdigest()[:20]


def _cpu_name() -> str:
    try:
        from llvmlite import binding
        return binding.get_host_cpu_name()
    except Exception:
        return ""


def ensure_compiled(model) -> None:
    """Compile (or load from Numba's cache) every kernel the model uses, announcing it the first time."""
    marker = _marker()
    if marker.exists():
        return
    log.warning("compiling edgelm's kernels for this machine (first run only, this takes a little while)...")
    s = model.create_session()                 # a scratch session: the model's default one stays untouched
    from .quant.kernels import BATCH_ROWS
    ids = [(1 + i) % model.config.n_vocab for i in range(BATCH_ROWS + 1)]
    s.prefill(ids)                             # prefill path (more than BATCH_ROWS): matmul, blockwise attention
    s.decode(ids[0])                           # decode path: matvec, serial decode attention
    _compile_parallel_decode_attention(s)
    del s
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass
    log.warning("compiled; later runs start fast")


def _compile_parallel_decode_attention(session) -> None:
    """Long contexts switch decode attention to its parallel kernel: compile it now too, by calling a layer's
    attend with the serial threshold at 0 (a short context never gets there on its own)."""
    from .arch import attention
    threshold = attention.SERIAL_MAX_WORK
    cfg = session.model.config
    q = np.zeros((1, cfg.n_head, cfg.head_dim), np.float32)
    out = np.empty((1, cfg.n_head, cfg.head_dim_v), np.float32)
    try:
        attention.SERIAL_MAX_WORK = -1
        session.caches[0].attend(q, 2, 1.0, None, out)
    finally:
        attention.SERIAL_MAX_WORK = threshold
