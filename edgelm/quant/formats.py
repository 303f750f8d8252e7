"""The quant format registry: one row per GGML type.

Each row carries the layout facts (block size, bytes per block) and an IR *emitter*: a small
Python function that, given an llvmlite builder and a pointer to one block, emits the LLVM vector
code that turns that block into float32 values.  `kernels.py` builds every kernel (row dot for
matvec, row decode for matmul / get_rows / dequantize) from these emitters, so adding a type is
adding one emitter and one table row here; nothing else in the code branches on the type.

Emitted arithmetic follows gguf-py `quants.py` operation by operation; decoding emits it without
fast-math flags, so a decoded block equals `gguf.quants.dequantize` bit for bit (inside a dot
product the kernels allow contraction, e.g. d*q + m as one FMA).

Block layouts: ggml/src/ggml-common.h (block_q4_0 ... block_q6_K); the dequantize formulas
(and the exact float32 operation order) mirror gguf-py/gguf/quants.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
from llvmlite import ir

from edgelm.errors import UnsupportedError

__all__ = ["QuantFormat", "FORMATS", "format_for", "row_bytes", "dequantize", "LANES"]

# Every emitter hands back <LANES x float> vectors (LLVM splits them into the target's registers:
# 4 x ymm on AVX2, 8 x q-registers on NEON).
LANES = 32

_I8, _I16, _I32, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_F32 = ir.FloatType()


# ---------------------------------------------------------------------------------------------
# IR helpers (all operate on the llvmlite builder `b`; `p` is an i8* to the block start)
# ---------------------------------------------------------------------------------------------

def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _c(ty: ir.Type, v) -> ir.Constant:
    """Constant `v`, splatted when `ty` is a vector type."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [v] * ty.count)
    return ir.Constant(ty, v)


def _load(b: ir.IRBuilder, p, off: int, ty: ir.Type):
    """Unaligned load of `ty` at byte offset `off` from `p` (blocks are only 2-byte aligned)."""
    q = b.gep(p, [ir.Constant(_I64, off)]) if off else p
    return b.load(b.bitcast(q, ty.as_pointer()), align=1)


def splat(b: ir.IRBuilder, v, n: int = LANES):
    """Scalar -> <n x scalar> (every lane = v)."""
    vt = _vec(v.type, n)
    one = b.insert_element(ir.Constant(vt, ir.Undefined), v, ir.Constant(_I32, 0))
    return b.shuffle_vector(one, ir.Constant(vt, ir.Undefined), ir.Constant(_vec(_I32, n), [0] * n))


def _concat(b: ir.IRBuilder, lo, hi):
    n = lo.type.count
    return b.shuffle_vector(lo, hi, ir.Constant(_vec(_I32, 2 * n), list(range(2 * n))))


def _f32_of(ty: ir.Type) -> ir.Type:
    return _vec(_F32, ty.count) if isinstance(ty, ir.VectorType) else _F32


def _i32_of(ty: ir.Type) -> ir.Type:
    return _vec(_I32, ty.count) if isinstance(ty, ir.VectorType) else _I32


def _target_has_f16_convert() -> bool:
    """Can LLVM convert half -> float in hardware here (x86 F16C, any arm64)?  Else it would emit
    a libcall the JIT may not resolve, so we use the integer formula below."""
    import platform

    import numba
    from llvmlite import binding

    if platform.machine().lower() in ("arm64", "aarch64"):
        return True
    if numba.config.CPU_FEATURES:
        return "+f16c" in numba.config.CPU_FEATURES
    if numba.config.CPU_NAME:  # e.g. "generic" for portable caches: assume nothing
        return False
    return "+f16c" in binding.get_host_cpu_features().flatten()


_NATIVE_F16 = _target_has_f16_convert()


def half_to_f32(b: ir.IRBuilder, h, native: bool | None = None):
    """IEEE binary16 bits (i16 or <n x i16>) -> float32.  Exact for every non-NaN value; a NaN
    stays NaN (the hardware path quiets signalling NaNs, numpy and the integer path keep the
    payload).  `native` forces a path (tests); default: hardware where the target has it."""
    if _NATIVE_F16 if native is None else native:
        ht = _vec(ir.HalfType(), h.type.count) if isinstance(h.type, ir.VectorType) else ir.HalfType()
        return b.fpext(b.bitcast(h, ht), _f32_of(h.type))
    it, ft = _i32_of(h.type), _f32_of(h.type)
    h32 = b.zext(h, it)
    e = b.and_(b.lshr(h32, _c(it, 10)), _c(it, 0x1F))
    m = b.and_(h32, _c(it, 0x3FF))
    sign = b.shl(b.and_(h32, _c(it, 0x8000)), _c(it, 16))
    normal = b.add(b.shl(b.and_(h32, _c(it, 0x7FFF)), _c(it, 13)), _c(it, 112 << 23))  # rebias 15 -> 127
    infnan = b.or_(b.shl(m, _c(it, 13)), _c(it, 0x7F800000))
    subnormal = b.bitcast(b.fmul(b.uitofp(m, ft), _c(ft, 2.0 ** -24)), it)  # m * 2^-24 is exact
    bits = b.select(b.icmp_unsigned("==", e, _c(it, 0)), subnormal,
                    b.select(b.icmp_unsigned("==", e, _c(it, 31)), infnan, normal))
    return b.bitcast(b.or_(bits, sign), ft)


def _f16_at(b: ir.IRBuilder, p, off: int):
    return half_to_f32(b, _load(b, p, off, _I16))


def _to_f32(b: ir.IRBuilder, v, signed: bool):
    """Small integer vector -> float vector (exact)."""
    return (b.sitofp if signed else b.uitofp)(v, _f32_of(v.type))


def _nibbles32(b: ir.IRBuilder, p, off: int):
    """16 bytes at `off` -> <32 x i8>: low nibbles (elements 0..15) then high nibbles (16..31)."""
    qs = _load(b, p, off, _vec(_I8, 16))
    t = qs.type
    return _concat(b, b.and_(qs, _c(t, 0x0F)), b.lshr(qs, _c(t, 4)))


def _bits_to_lanes(b: ir.IRBuilder, p, off: int, value: int):
    """u32 at `off` -> <32 x i8>, lane j = `value` if bit j is set else 0 (qh of Q5_0 / Q5_1)."""
    vt = _vec(_I8, 32)
    qh = _load(b, p, off, _vec(_I8, 4))
    spread = b.shuffle_vector(qh, qh, ir.Constant(_vec(_I32, 32), [j // 8 for j in range(32)]))
    hit = b.and_(spread, ir.Constant(vt, [1 << (j % 8) for j in range(32)]))
    return b.select(b.icmp_unsigned("!=", hit, _c(vt, 0)), _c(vt, value), _c(vt, 0))


def _k_scales(b: ir.IRBuilder, p, off: int):
    """The 8 packed 6-bit (scale, min) pairs of Q4_K / Q5_K as i32 (ggml get_scale_min_k4)."""
    s = [b.zext(_load(b, p, off + i, _I8), _I32) for i in range(12)]
    k = lambda v: ir.Constant(_I32, v)  # noqa: E731
    pairs = [(b.and_(s[j], k(63)), b.and_(s[j + 4], k(63))) for j in range(4)]
    for j in range(4, 8):
        sc = b.or_(b.and_(s[j + 4], k(15)), b.shl(b.lshr(s[j - 4], k(6)), k(4)))
        mn = b.or_(b.lshr(s[j + 4], k(4)), b.shl(b.lshr(s[j], k(6)), k(4)))
        pairs.append((sc, mn))
    return pairs


# ---------------------------------------------------------------------------------------------
# Emitters: emit(b, p, n, fm) yields float vectors, in element order, covering n elements.
# (Generators, so the caller consumes each vector as soon as it exists: fewer live registers.)
# Quant types always get n == block_size and yield block_size / 32 vectors of 32 lanes.
# Float types get n == 32 (a run of elements) or n == 1 (the scalar tail of a row).
# `fm` are fast-math flags for the dequant arithmetic: () when decoding (bit-exact with gguf-py),
# ("contract",) inside a dot product, where d*q + m may become one FMA.
# ---------------------------------------------------------------------------------------------

def _emit_f32(b, p, n, fm):
    yield _load(b, p, 0, _vec(_F32, n))


def _emit_f16(b, p, n, fm):
    yield half_to_f32(b, _load(b, p, 0, _vec(_I16, n)))


def _emit_bf16(b, p, n, fm):
    it = _vec(_I32, n)
    yield b.bitcast(b.shl(b.zext(_load(b, p, 0, _vec(_I16, n)), it), _c(it, 16)), _vec(_F32, n))


def _emit_q8_0(b, p, n, fm):
    # block_q8_0: f16 d; int8 qs[32].  w = q * d
    d = splat(b, _f16_at(b, p, 0))
    yield b.fmul(_to_f32(b, _load(b, p, 2, _vec(_I8, 32)), True), d, flags=fm)


def _emit_q4_0(b, p, n, fm):
    # block_q4_0: f16 d; qs[16] (low nibble = elem j, high = elem j+16).  w = d * (q - 8)
    d = splat(b, _f16_at(b, p, 0))
    q = b.sub(_nibbles32(b, p, 2), _c(_vec(_I8, 32), 8))
    yield b.fmul(d, _to_f32(b, q, True), flags=fm)


def _emit_q4_1(b, p, n, fm):
    # block_q4_1: f16 d, f16 m; qs[16].  w = d * q + m
    d, m = splat(b, _f16_at(b, p, 0)), splat(b, _f16_at(b, p, 2))
    yield b.fadd(b.fmul(d, _to_f32(b, _nibbles32(b, p, 4), False), flags=fm), m, flags=fm)


def _emit_q5_0(b, p, n, fm):
    # block_q5_0: f16 d; u32 qh (bit j = 5th bit of elem j); qs[16].  w = d * (q - 16)
    d = splat(b, _f16_at(b, p, 0))
    q = b.or_(_nibbles32(b, p, 6), _bits_to_lanes(b, p, 2, 16))
    q = b.sub(q, _c(q.type, 16))
    yield b.fmul(d, _to_f32(b, q, True), flags=fm)


def _emit_q5_1(b, p, n, fm):
    # block_q5_1: f16 d, f16 m; u32 qh; qs[16].  w = d * q + m
    d, m = splat(b, _f16_at(b, p, 0)), splat(b, _f16_at(b, p, 2))
    q = b.or_(_nibbles32(b, p, 8), _bits_to_lanes(b, p, 4, 16))
    yield b.fadd(b.fmul(d, _to_f32(b, q, False), flags=fm), m, flags=fm)


def _emit_qk_45(b, p, fm, with_qh: bool):
    # block_q4_K: f16 d, f16 dmin, scales[12], qs[128]
    # block_q5_K: f16 d, f16 dmin, scales[12], qh[32], qs[128]
    # 8 sub-blocks of 32: sub 2c / 2c+1 = low / high nibbles of qs[32c : 32c+32];
    # Q5_K's 5th bit of sub i is bit i of qh[l].  w = (d * sc) * q - (dmin * m)
    d, dmin = _f16_at(b, p, 0), _f16_at(b, p, 2)
    qs_off = 48 if with_qh else 16
    vt = _vec(_I8, 32)
    qh = _load(b, p, 16, vt) if with_qh else None
    scales = _k_scales(b, p, 4)
    for c in range(4):
        qs = _load(b, p, qs_off + 32 * c, vt)
        for half, q in enumerate((b.and_(qs, _c(vt, 0x0F)), b.lshr(qs, _c(vt, 4)))):
            i = 2 * c + half
            sc, mn = scales[i]
            dl = splat(b, b.fmul(d, b.uitofp(sc, _F32)))
            ml = splat(b, b.fmul(dmin, b.uitofp(mn, _F32)))
            if with_qh:
                q = b.or_(q, b.shl(b.and_(b.lshr(qh, _c(vt, i)), _c(vt, 1)), _c(vt, 4)))
            yield b.fsub(b.fmul(dl, _to_f32(b, q, False), flags=fm), ml, flags=fm)


def _emit_q4_k(b, p, n, fm):
    return _emit_qk_45(b, p, fm, with_qh=False)


def _emit_q5_k(b, p, n, fm):
    return _emit_qk_45(b, p, fm, with_qh=True)


def _emit_q6_k(b, p, n, fm):
    # block_q6_K: ql[128], qh[64], int8 scales[16], f16 d (last!).
    # Element 128h + 32t + l (h<2, t<4, l<32): low 4 bits from ql[64h + 32(t&1) + l] (nibble t>>1),
    # high 2 bits = (qh[32h + l] >> 2t) & 3; w = (d * scales[e // 16]) * (q - 32)
    d = _f16_at(b, p, 208)
    vt = _vec(_I8, 32)
    for h in range(2):
        qh = _load(b, p, 128 + 32 * h, vt)
        ql = [_load(b, p, 64 * h, vt), _load(b, p, 64 * h + 32, vt)]
        for t in range(4):
            lo = ql[t & 1]
            lo = b.and_(lo, _c(vt, 0x0F)) if t < 2 else b.lshr(lo, _c(vt, 4))
            hi = b.shl(b.and_(b.lshr(qh, _c(vt, 2 * t)), _c(vt, 3)), _c(vt, 4))
            q = b.sub(b.or_(lo, hi), _c(vt, 32))
            s0 = 192 + 8 * h + 2 * t  # two 16-element scale groups per 32 lanes
            dl0 = b.fmul(d, b.sitofp(_load(b, p, s0, _I8), _F32))
            dl1 = b.fmul(d, b.sitofp(_load(b, p, s0 + 1, _I8), _F32))
            dl = _concat(b, splat(b, dl0, 16), splat(b, dl1, 16))
            yield b.fmul(dl, _to_f32(b, q, True), flags=fm)


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

Emitter = Callable[[ir.IRBuilder, ir.Value, int, tuple], Iterator[ir.Value]]


@dataclass(frozen=True)
class QuantFormat:
    ggml_type: int          # gguf.GGMLQuantizationType value
    name: str
    block_size: int         # elements per block (1 for plain float types)
    type_size: int          # bytes per block
    emit: Emitter           # IR for one block -> float32 vectors (see "Emitters" above)
    # Future per-type fast paths (int8 dot, repacked layouts) hang off this row as extra fields.

    @property
    def step(self) -> int:
        """Elements the kernels decode per emitter call (a block, or a 32-element run of floats)."""
        return self.block_size if self.block_size > 1 else LANES

    @property
    def step_bytes(self) -> int:
        return self.step // self.block_size * self.type_size


def _table() -> dict[int, QuantFormat]:
    # ggml_type ids are fixed by the GGUF spec (ggml.h enum ggml_type); sizes from ggml-common.h.
    specs = [
        (0, "F32", 1, 4, _emit_f32),
        (1, "F16", 1, 2, _emit_f16),
        (30, "BF16", 1, 2, _emit_bf16),
        (8, "Q8_0", 32, 34, _emit_q8_0),
        (2, "Q4_0", 32, 18, _emit_q4_0),
        (3, "Q4_1", 32, 20, _emit_q4_1),
        (6, "Q5_0", 32, 22, _emit_q5_0),
        (7, "Q5_1", 32, 24, _emit_q5_1),
        (12, "Q4_K", 256, 144, _emit_q4_k),
        (13, "Q5_K", 256, 176, _emit_q5_k),
        (14, "Q6_K", 256, 210, _emit_q6_k),
    ]
    return {t: QuantFormat(t, name, bs, ts, fn) for t, name, bs, ts, fn in specs}


FORMATS: dict[int, QuantFormat] = _table()


def _type_name(ggml_type) -> str:
    try:
        import gguf
        return gguf.GGMLQuantizationType(int(ggml_type)).name
    except Exception:  # unknown id, or gguf not importable
        return str(ggml_type)


def format_for(ggml_type: int) -> QuantFormat:
    try:
        return FORMATS[ggml_type]
    except (KeyError, TypeError):
        raise UnsupportedError(f"quant type {_type_name(ggml_type)} is not supported") from None


def row_bytes(ggml_type: int, n_in: int) -> int:
    fmt = format_for(ggml_type)
    if n_in <= 0 or n_in % fmt.block_size:
        raise ValueError(f"{fmt.name} rows need a positive multiple of {fmt.block_size} elements, "
                         f"got {n_in}")
    return n_in // fmt.block_size * fmt.type_size


def dequantize(raw_u8_2d: np.ndarray, ggml_type: int, n_in: int) -> np.ndarray:
    """All rows of a quantized 2-D tensor as float32 (rows, n_in); equals gguf.quants.dequantize."""
    from edgelm.quant.kernels import get_rows  # kernels import this module; import late

    ids = np.arange(raw_u8_2d.shape[0], dtype=np.int64)
    return get_rows(raw_u8_2d, ggml_type, n_in, ids)
