"""Float rows -> the bytes of a block type: the one entry point of `quantize` and `convert`.

K-quants come from our Numba writers (kquant_writer.py, byte-equal to llama.cpp's reference quantizers); the
legacy types from gguf-py's reference quantizer (gguf.quants.quantize, byte-equal to llama.cpp's); float types
by a cast.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize as reference_quantize

from . import kquant_writer

_FLOATS = {Q.F32: np.float32, Q.F16: np.float16}


def encode(x: np.ndarray, qtype: Q, importance: np.ndarray | None = None) -> np.ndarray:
    """`x` (..., n_in) floats in `qtype`: float arrays for F32/F16, else uint8 (..., bytes per row).
    importance (n_in,): an importance matrix's weights for llama.cpp's weighted searches (K-quants, Q4_0 ...
    Q5_1; Q8_0 has none, as in llama.cpp)."""
    qtype = Q(qtype)
    if qtype in _FLOATS:
        return np.ascontiguousarray(x, dtype=_FLOATS[qtype])
    if qtype.name in kquant_writer.BLOCK_BYTES or (importance is not None and qtype.name in kquant_writer.LEGACY_BYTES):
        return kquant_writer.quantize(x, qtype.name, importance)
    return reference_quantize(np.asarray(x, np.float32), qtype)
