"""The lattice tables of the grid i-quants (IQ1_S ... IQ3_S) and the IR that looks them up.

A grid i-quant stores, per group of 8 (IQ1, IQ2) or 4 (IQ3) weights, the index of a point on a fixed
lattice; the weights are that point's coordinates (small integers) times a scale and a sign.  The
lattices are constants of the formats: we read them once from gguf-py's quants.py (classes IQ2_XXS ...
IQ1_S, `grid_hex` / `grid_map`, the same tables as llama.cpp's ggml-common.h iq2xxs_grid ... iq1s_grid),
so our decode and the reference decode use the very same numbers.

In the emitted code a table is an internal constant array of the function's LLVM module: one row per
lattice point, the coordinates as the bytes of one i64 (8 of them) or i32 (4), so a lookup is one load.
"""

from __future__ import annotations

import functools

import numpy as np
from llvmlite import ir

_I32 = ir.IntType(32)


@functools.cache
def grid_rows(name: str) -> tuple[tuple[int, ...], int]:
    """gguf-py's lattice of class `name` as (rows packed little-endian, bits per row: 64 or 32)."""
    import gguf.quants

    cls = getattr(gguf.quants, name)
    cls.init_grid()
    points = np.asarray(cls.grid, np.float32).reshape(cls.grid_shape)
    coords = points.astype(np.int8)
    if not np.array_equal(coords, points):    # every lattice here has small integer coordinates
        raise AssertionError(f"{name}: lattice coordinates are not small integers")
    width = 8 * points.shape[1]
    rows = np.ascontiguousarray(coords).view(f"<i{points.shape[1]}").ravel()
    return tuple(int(v) for v in rows), width


@functools.cache
def ksign_masks() -> tuple[int, ...]:
    """IQ2_XXS / IQ2_XS / IQ3_XXS signs: a 7-bit index picks 8 sign bits (the 8th is the parity of the other
    seven; gguf-py quants.py IQ2_XXS.ksigns = ggml-common.h ksigns_iq2xs).  Here each entry is the i64 whose
    byte j is 0xFF where sign bit j is set (negative) and 0 elsewhere, ready for (v ^ m) - m."""
    import gguf.quants

    signs = np.frombuffer(gguf.quants.IQ2_XXS.ksigns, np.uint8)
    masks = (((signs[:, None] >> np.arange(8)) & 1) * 0xFF).astype(np.uint8)
    return tuple(int(v) for v in np.ascontiguousarray(masks).view("<i8").ravel())


def table(b: ir.IRBuilder, name: str, rows, width: int) -> ir.GlobalVariable:
    """The constant array `name` in the module being built (created on first use)."""
    module = b.module
    g = module.globals.get(name)
    if g is None:
        ty = ir.ArrayType(ir.IntType(width), len(rows))
        g = ir.GlobalVariable(module, ty, name=name)
        g.initializer = ir.Constant(ty, list(rows))
        g.global_constant = True
        g.linkage = "internal"
        g.align = 64
    return g


def gather(b: ir.IRBuilder, g: ir.GlobalVariable, indexes) -> ir.Value:
    """Rows `indexes` (i32 values, in range by construction of the formats) of table `g`, concatenated into
    one vector of bytes (4 rows of i64 or 8 of i32: <32 x i8>).  One scalar load per row: AVX2's gather
    instructions (vpgatherdq, with the indexes computed as a vector) measured 1.4-1.9x slower per weight on
    Zen 4."""
    elem = g.value_type.element
    vt = ir.VectorType(elem, len(indexes))
    v = ir.Constant(vt, ir.Undefined)
    zero = ir.Constant(_I32, 0)
    for k, idx in enumerate(indexes):
        row = b.load(b.gep(g, [zero, idx], inbounds=True))
        v = b.insert_element(v, row, ir.Constant(_I32, k))
    return b.bitcast(v, ir.VectorType(ir.IntType(8), len(indexes) * elem.width // 8))
