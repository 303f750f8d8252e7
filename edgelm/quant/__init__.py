"""Quantized weights: the format registry (formats.py) and the Numba kernels over it (kernels.py)."""

from edgelm.quant.formats import FORMATS, QuantFormat, dequantize, format_for, row_bytes
from edgelm.quant.kernels import FusedLinear, get_rows, matmul, matmul_multi, matvec, matvec_multi

__all__ = [
    "FORMATS", "QuantFormat", "dequantize", "format_for", "row_bytes", "get_rows", "matmul", "matvec",
    "FusedLinear", "matvec_multi", "matmul_multi",
]
