"""The quant format registry: one row per GGML type.

Each row carries the layout facts (block size, bytes per block) and an IR *emitter*: a small
Python function that, given an llvmlite builder and a pointer to one block, emits the LLVM vector
code that unpacks that block into `Piece`s: 32 integer codes as float32 lanes plus the scale,
offset and bias that turn them into weights.  `kernels.py` builds every kernel from these
emitters (the matvec row dot works on the factored form; row decode for matmul / get_rows /
dequantize evaluates it), so adding a type is adding one emitter and one table row here; nothing
else in the code branches on the type.

Decoding a piece follows gguf-py `quants.py` operation by operation, without fast-math flags, so a
decoded block equals `gguf.quants.dequantize` bit for bit.

Block layouts: ggml/src/ggml-common.h (block_q4_0 ... block_q6_K, block_mxfp4); the dequantize
formulas (and the exact float32 operation order) mirror gguf-py/gguf/quants.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import contextlib
import contextvars

import numpy as np
from llvmlite import ir

from edgelm.errors import UnsupportedError
from edgelm.quant import grids

__all__ = ["QuantFormat", "FORMATS", "format_for", "row_bytes", "dequantize", "LANES", "Piece"]

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


def _target_has(feature: str) -> bool:
    """Does numba's compilation target have this x86 feature ("+f16c", "+avx2")?  Honours
    NUMBA_CPU_FEATURES / NUMBA_CPU_NAME (e.g. "generic" for portable caches: assume nothing)."""
    import numba
    from llvmlite import binding

    if numba.config.CPU_FEATURES:
        return feature in numba.config.CPU_FEATURES
    if numba.config.CPU_NAME:
        return False
    return feature in binding.get_host_cpu_features().flatten()


def _target_is_arm64() -> bool:
    """Does numba compile for arm64 (AArch64: Apple silicon, Graviton, Linux on arm)?  NEON (ASIMD) and
    the half-precision conversions are part of its base architecture, so even a "generic" CPU has them."""
    import platform

    return platform.machine().lower() in ("arm64", "aarch64")


def _target_has_f16_convert() -> bool:
    """Can LLVM convert half -> float in hardware here (x86 F16C, any arm64: fcvtl)?  Else it would emit
    a libcall the JIT may not resolve, so we use the integer formula below."""
    return _ARM64 or _target_has("+f16c")


_ARM64 = _target_is_arm64()
_NATIVE_F16 = _target_has_f16_convert()
_AVX2 = _target_has("+avx2")
_SSSE3 = _target_has("+ssse3")
# A 16-byte table lookup by a vector of indexes: x86 SSSE3 pshufb, arm64 NEON tbl (same result for 0..15).
_BYTE_LOOKUP = "llvm.aarch64.neon.tbl1.v16i8" if _ARM64 else "llvm.x86.ssse3.pshuf.b.128" if _SSSE3 else None


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


def _f16_splat(b: ir.IRBuilder, p, off: int, n: int = 8):
    """The f16 at `off` as <n x float>, every lane equal (x86: vpbroadcastw + vcvtph2ps, two
    instructions, instead of a scalar convert and a broadcast on the busy shuffle ports)."""
    return half_to_f32(b, splat(b, _load(b, p, off, _I16), n))


def _opaque(b: ir.IRBuilder, v):
    """`v` unchanged, but hidden from LLVM's peephole rewrites (AVX2 targets; elsewhere `v`).
    Used for bit masks: `(x & (1 << j)) == (1 << j)` with visible constants becomes a variable
    shift (vpsllvd, on one of the two shuffle/shift ports) instead of and + compare (any port)."""
    if not _AVX2:
        return v
    return b.asm(ir.FunctionType(v.type, [v.type]), "", "=x,0", [v], side_effect=False)


def _k_scale_vectors(b: ir.IRBuilder, p):
    """Q4_K / Q5_K: a super-block's 8 sub-block scales and minimums as <8 x float>, (d * sc_j, dmin * m_j):
    ggml's get_scale_min_k4 (ggml-quants.c) for all 8 sub-blocks at once, by byte shuffles of scales[12]."""
    t8 = _vec(_I8, 16)
    s = _load(b, p, 4, t8)                 # scales[12] (and 4 bytes of qs, unused)

    def pick(idx):
        return b.zext(b.shuffle_vector(s, ir.Constant(t8, ir.Undefined), ir.Constant(_vec(_I32, 8), idx)),
                      _vec(_I32, 8))

    lo = pick([0, 1, 2, 3, 8, 9, 10, 11])   # j < 4: s[j];     j >= 4: s[j + 4]
    hi = pick([4, 5, 6, 7, 0, 1, 2, 3])     # j < 4: s[j + 4]; j >= 4: s[j - 4]
    mid = pick([4, 5, 6, 7, 4, 5, 6, 7])    #                  j >= 4: s[j]
    t = lo.type
    first = ir.Constant(_vec(ir.IntType(1), 8), [1] * 4 + [0] * 4)
    sc = b.select(first, b.and_(lo, _c(t, 63)), b.or_(b.and_(lo, _c(t, 15)), b.shl(b.lshr(hi, _c(t, 6)), _c(t, 4))))
    mn = b.select(first, b.and_(hi, _c(t, 63)), b.or_(b.lshr(lo, _c(t, 4)), b.shl(b.lshr(mid, _c(t, 6)), _c(t, 4))))
    f = _vec(_F32, 8)
    return [b.fmul(_f16_splat(b, p, 0), b.uitofp(sc, f))], b.fmul(_f16_splat(b, p, 2), b.uitofp(mn, f))


def _q6_k_scale_vectors(b: ir.IRBuilder, p):
    """Q6_K: the 16 int8 scales of a super-block times d, as two <8 x float> (scales 0-7, 8-15); no minimums.
    Scale m belongs to elements 16m .. 16m + 15 (piece m // 2, half m % 2)."""
    d = _f16_splat(b, p, 208)
    return [b.fmul(d, b.sitofp(_load(b, p, 192 + 8 * g, _vec(_I8, 8)), _vec(_F32, 8))) for g in range(2)], None


def _q2_k_scale_vectors(b: ir.IRBuilder, p):
    """Q2_K: the 16 scales times d and the 16 minimums times dmin, each as two <8 x float> (sub-blocks 0-7,
    8-15 of 16 elements): ([d * (sc & 15)], [dmin * (sc >> 4)]) from scales[16]."""
    t = _vec(_I32, 8)
    d, dmin = _f16_splat(b, p, 80), _f16_splat(b, p, 82)
    scales, mins = [], []
    for g in range(2):
        sc = b.zext(_load(b, p, 8 * g, _vec(_I8, 8)), t)
        scales.append(b.fmul(d, b.uitofp(b.and_(sc, _c(t, 15)), _vec(_F32, 8))))
        mins.append(b.fmul(dmin, b.uitofp(b.lshr(sc, _c(t, 4)), _vec(_F32, 8))))
    return scales, mins


def _q3_k_scale_vectors(b: ir.IRBuilder, p):
    """Q3_K: the 16 scales (6-bit, minus 32) times d as two <8 x float> (scales 0-7, 8-15), by byte picks and
    per-lane shifts of scales[12]: scale i has its low 4 bits in nibble i // 8 of byte i % 8 and its high 2
    bits at bits 2 * (i // 4) of byte 8 + i % 4 (gguf-py quants.py Q3_K); no minimums."""
    t8 = _vec(_I8, 16)
    s = _load(b, p, 94, t8)                 # bytes 94..109: scales[12] at lanes 2..13 (the block's last 16 bytes)
    t = _vec(_I32, 8)

    def pick(idx):
        return b.zext(b.shuffle_vector(s, ir.Constant(t8, ir.Undefined), ir.Constant(t, idx)), t)
    low = pick([2 + i for i in range(8)])           # scales[0..7]
    high = pick([10, 11, 12, 13] * 2)               # scales[8..11], twice
    d = _f16_splat(b, p, 108)
    out = []
    for g in range(2):                      # scales 8g .. 8g + 7
        lo = b.and_(low, _c(t, 15)) if g == 0 else b.lshr(low, _c(t, 4))
        hi = b.and_(b.lshr(high, ir.Constant(t, [4 * g + 2 * (i // 4) for i in range(8)])), _c(t, 3))
        sc = b.sub(b.or_(lo, b.shl(hi, _c(t, 4))), _c(t, 32))
        out.append(b.fmul(d, b.sitofp(sc, _vec(_F32, 8))))
    return out, None


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
# Emitters: emit(b, p, n) yields Pieces, in element order, covering n elements of a row.
# (Generators, so the caller consumes each piece as soon as it exists: fewer live registers.)
# Quant types always get n == block_size and yield block_size / 32 pieces of 32 lanes.
# Float types get n == 32 (a run of elements) or n == 1 (the scalar tail of a row).
#
# A piece is the weights of 32 consecutive elements in factored form, w = scale * (q + bias) + offset:
#   q       <n x float>: integer codes (exact in float32), centred on zero where the format allows
#           (Q4_*: code - 8, Q5_*: code - 16, Q6_K: code - 32), or the weights themselves
#   scale   None (q are the weights), a float (a scalar, or <8 x float> with equal lanes), or a
#           pair of scalars (lanes 0-15, 16-31)
#   offset  None or a float (as scale) added after scaling (the minimum of Q4_1 / Q5_1 / Q*_K)
#   bias    None or the integer the centring took from q, for formats with an offset
# Decoding (kernels.decode_piece) evaluates exactly gguf-py's expression (q + bias is the stored
# code, exact), so a decoded block equals `gguf.quants.dequantize` bit for bit.  A dot product
# instead sums q * x over the piece first, scales once, and adds (scale * bias + offset) * sum(x);
# centred codes keep both terms small, so this loses no precision to cancellation.
# ---------------------------------------------------------------------------------------------

class Piece(NamedTuple):
    q: ir.Value
    scale: object = None
    offset: object = None
    bias: int | None = None
    lanes: list | None = None   # quant types: the integer codes as parts (see `_run`; the integer dot's input)


def _int_piece(b: ir.IRBuilder, lanes, *factors) -> Piece:
    """A piece of integer codes (parts covering lanes 0..31, see `_run`): q as floats and the parts themselves."""
    return Piece(_codes(b, lanes), *factors, lanes=lanes)


# Codes are expanded from bytes straight into 32-bit lanes, 8 at a time (x86: vpmovzxbd ymm, m64;
# one instruction per 8 weights), and combined there: cheaper than widening <32 x i8> registers,
# which costs a chain of shuffles on AVX2.  The integer dot (kernels._dot_rows_int) wants 16-bit
# lanes instead, 16 at a time (vpmovzxbw ymm, m128: one instruction per 16 weights, and every
# and / shift / subtract on the codes then covers 16 of them): it emits inside `with code_bits(16):`,
# and the helpers below widen to that.  A *part* is one such vector, <8 x i32> or <16 x i16>; a
# piece's 32 codes are the parts of `_run`, in lane order.
_CODE_BITS: contextvars.ContextVar[int] = contextvars.ContextVar("code_bits", default=32)


@contextlib.contextmanager
def code_bits(bits: int):
    """Emit integer codes in `bits`-bit lanes (32 or 16) inside this block (consume the emitter here:
    emitters are generators)."""
    token = _CODE_BITS.set(bits)
    try:
        yield
    finally:
        _CODE_BITS.reset(token)


def _lane_int() -> ir.IntType:
    return ir.IntType(_CODE_BITS.get())


def _part_lanes() -> int:
    """Codes per part: 8 x i32, or 16 x i16 (both 256 bits)."""
    return 256 // _CODE_BITS.get()


def _ext(b: ir.IRBuilder, p, off: int, signed: bool = False):
    """The bytes at `off` -> one part (8 bytes -> <8 x i32>, or 16 -> <16 x i16>, see code_bits)."""
    n = _part_lanes()
    v = _load(b, p, off, _vec(_I8, n))
    return (b.sext if signed else b.zext)(v, _vec(_lane_int(), n))


def _run(b: ir.IRBuilder, p, off: int, n_bytes: int = 32, signed: bool = False):
    """`n_bytes` consecutive bytes at `off`, widened: the parts covering them, in order."""
    n = _part_lanes()
    return [_ext(b, p, off + n * k, signed) for k in range(n_bytes // n)]


def _regroup(b: ir.IRBuilder, parts):
    """Parts of 8 lanes -> the current part width (pairs concatenated for 16-bit parts)."""
    n = _part_lanes()
    if parts[0].type.count == n:
        return parts
    return [_concat(b, parts[k], parts[k + 1]) for k in range(0, len(parts), 2)]


def _codes(b: ir.IRBuilder, parts):
    """Parts of small integers (lanes 0..31, see `_run`) -> <32 x float> (exact)."""
    f = [b.sitofp(v, _vec(_F32, v.type.count)) for v in parts]
    while len(f) > 1:
        f = [_concat(b, f[k], f[k + 1]) for k in range(0, len(f), 2)]
    return f[0]


def _nibble_lanes(b: ir.IRBuilder, p, off: int, minus: int = 0):
    """16 bytes at `off` -> elements 0..31 as parts: low nibbles (0..15), high (16..31),
    each minus `minus`."""
    raw = _run(b, p, off, 16)
    t = raw[0].type
    parts = [b.and_(v, _c(t, 0x0F)) for v in raw] + [b.lshr(v, _c(t, 4)) for v in raw]
    return [b.sub(v, _c(t, minus)) for v in parts] if minus else parts


def _add_bit_lanes(b: ir.IRBuilder, p, off: int, parts, value: int, minus: int = 0):
    """parts (lanes 0..31) + `value` where bit j of the u32 at `off` is set, minus `minus`
    (qh of Q5_0 / Q5_1: value 16; minus 16 gives lo - (bit clear ? 16 : 0))."""
    word = _load(b, p, off, _I32)
    n = parts[0].type.count
    bits_of_lane = lambda j: -(1 << 15) if (n == 16 and j == 15) else 1 << j  # noqa: E731  (i16's top bit)
    out = []
    for k, part in enumerate(parts):
        t = part.type
        if t.element.width < 32:   # the n bits of this part, moved to bits 0..n-1 of a narrow lane
            v = splat(b, b.trunc(b.lshr(word, ir.Constant(_I32, n * k)), t.element), n)
            bits = _opaque(b, ir.Constant(t, [bits_of_lane(j) for j in range(n)]))
        else:
            v = splat(b, word, n)
            bits = _opaque(b, ir.Constant(t, [1 << j for j in range(n * k, n * k + n)]))
        hit = b.icmp_unsigned("==", b.and_(v, bits), bits)
        out.append(b.add(part, b.select(hit, _c(t, value - minus), _c(t, -minus))))
    return out


def _shift_to(b: ir.IRBuilder, v, bit: int, to: int):
    """Move bit `bit` of every lane to bit `to` (other bits: caller masks)."""
    if bit < to:
        return b.shl(v, _c(v.type, to - bit))
    return b.lshr(v, _c(v.type, bit - to)) if bit > to else v


def _emit_f32(b, p, n):
    yield Piece(_load(b, p, 0, _vec(_F32, n)))


def _emit_f16(b, p, n):
    yield Piece(half_to_f32(b, _load(b, p, 0, _vec(_I16, n))))


def _emit_bf16(b, p, n):
    it = _vec(_I32, n)
    yield Piece(b.bitcast(b.shl(b.zext(_load(b, p, 0, _vec(_I16, n)), it), _c(it, 16)), _vec(_F32, n)))


def _emit_q8_0(b, p, n):
    # block_q8_0: f16 d; int8 qs[32].  w = q * d
    yield _int_piece(b, _run(b, p, 2, signed=True), _f16_splat(b, p, 0))


def _emit_q4_0(b, p, n):
    # block_q4_0: f16 d; qs[16] (low nibble = elem j, high = elem j+16).  w = d * (q - 8)
    yield _int_piece(b, _nibble_lanes(b, p, 2, minus=8), _f16_splat(b, p, 0))


def _emit_q4_1(b, p, n):
    # block_q4_1: f16 d, f16 m; qs[16].  w = d * q + m
    yield _int_piece(b, _nibble_lanes(b, p, 4, minus=8), _f16_splat(b, p, 0), _f16_splat(b, p, 2), 8)


def _emit_q5_0(b, p, n):
    # block_q5_0: f16 d; u32 qh (bit j = 5th bit of elem j); qs[16].  w = d * (q - 16)
    q = _add_bit_lanes(b, p, 2, _nibble_lanes(b, p, 6), 16, minus=16)
    yield _int_piece(b, q, _f16_splat(b, p, 0))


def _emit_q5_1(b, p, n):
    # block_q5_1: f16 d, f16 m; u32 qh; qs[16].  w = d * q + m
    q = _add_bit_lanes(b, p, 4, _nibble_lanes(b, p, 8), 16, minus=16)
    yield _int_piece(b, q, _f16_splat(b, p, 0), _f16_splat(b, p, 2), 16)


# MXFP4 (OCP microscaling FP4).  Layout: ggml/src/ggml-common.h block_mxfp4 (u8 e; qs[16]; low
# nibble = elem j, high = elem j+16); decoding: gguf-py gguf/quants.py class MXFP4: the E2M1 codes
# are looked up in kvalues (the E2M1 values doubled, so integers) and multiplied by
# e8m0_to_fp32_half(e) = 2^(e-128) (ggml_e8m0_to_fp32_half in ggml-impl.h).
_MXFP4_KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
_MXFP4_MAGS = 0xC8643210  # kvalues[0..7], one per nibble (index code & 7)


def _e8m0_half(b: ir.IRBuilder, p, off: int, n: int = 8):
    """The E8M0 byte at `off` as float32 2^(e-128) in <n x float>, bit for bit gguf-py's
    e8m0_to_fp32_half: e < 2 -> subnormal bits 0x00200000 << e, else (e - 1) << 23 (e = 255 is
    2^127, not NaN)."""
    k = lambda v: ir.Constant(_I32, v)  # noqa: E731
    e = b.zext(_load(b, p, off, _I8), _I32)
    sub = b.shl(k(0x00200000), b.and_(e, k(1)))  # & 1: no over-wide shift, even unselected
    bits = b.select(b.icmp_unsigned("<", e, k(2)), sub, b.shl(b.sub(e, k(1)), k(23)))
    return splat(b, b.bitcast(bits, _F32), n)


def _e2m1_codes(b: ir.IRBuilder, v):
    """<8 x i32> of 4-bit E2M1 codes (bits above 3 ignored) -> kvalues[code] (-12..12)."""
    t = v.type
    # the magnitude: a variable shift of the packed table is the lookup
    mag = b.and_(b.lshr(_c(t, _MXFP4_MAGS), b.and_(b.shl(v, _c(t, 2)), _c(t, 28))), _c(t, 15))
    # bit 3 (the sign) -> 0 / -1 by and + compare (any vector port; _opaque stops LLVM from
    # turning it into two shifts, which compete with the lookup's shifts for the shift ports)
    sign = _opaque(b, _c(t, 8))
    neg = b.sext(b.icmp_unsigned("==", b.and_(v, sign), sign), t)
    return b.sub(b.xor(mag, neg), neg)  # integer negation: code 8 is +0 as in gguf-py


# IQ4_NL: 16 non-uniform int8 levels.  Layout: ggml/src/ggml-common.h block_iq4_nl (f16 d; qs[16], low
# nibble = elem j, high = elem j+16); levels: kvalues_iq4nl in ggml-common.h (= gguf-py quants.py
# IQ4_NL.kvalues); decoding: gguf-py quants.py class IQ4_NL, w = d * kvalues[q].
_IQ4NL_KVALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _byte_table_codes(table):
    """A portable lookup of 16 signed byte levels for 4-bit codes in 32-bit lanes: the levels packed
    4 to a word, the word picked by code >> 2 (three selects), the byte by a shift of (code & 3) * 8."""
    words = [sum((table[4 * w + k] & 0xFF) << (8 * k) for k in range(4)) for w in range(4)]

    def codes(b: ir.IRBuilder, v):
        t = v.type
        hi = b.and_(b.lshr(v, _c(t, 2)), _c(t, 3))
        word = _c(t, words[3])
        for w in (2, 1, 0):
            word = b.select(b.icmp_unsigned("==", hi, _c(t, w)), _c(t, words[w]), word)
        byte = b.and_(b.lshr(word, b.shl(b.and_(v, _c(t, 3)), _c(t, 3))), _c(t, 0xFF))
        return b.sub(b.xor(byte, _c(t, 0x80)), _c(t, 0x80))           # sign-extend the byte
    return codes


def _table_lanes(b: ir.IRBuilder, p, off: int, table, portable, shuffle: bool | None = None):
    """16 bytes of 4-bit code pairs at `off` -> table[code] of elements 0..31 (low nibbles, then high)
    as parts (see `_run`).  x86 with SSSE3 and arm64: a byte shuffle (pshufb / tbl) looks up 16 codes at once
    (LLVM IR has no variable-index shuffle); elsewhere `portable(b, <8 x i32> codes)` (about 2x the
    instructions).  `shuffle` forces a path (tests); default: the byte shuffle where the target has one."""
    n = _part_lanes()
    lane = _vec(_lane_int(), n)
    if not (_BYTE_LOOKUP is not None if shuffle is None else shuffle):
        token = _CODE_BITS.set(32)           # the portable lookups shift by up to 28 bits
        try:
            a, c = _run(b, p, off, 16)
        finally:
            _CODE_BITS.reset(token)
        t = a.type
        codes = [portable(b, v) for v in (a, c, b.lshr(a, _c(t, 4)), b.lshr(c, _c(t, 4)))]
        return codes if t.element == lane.element else _regroup(b, [b.trunc(v, _vec(lane.element, 8)) for v in codes])
    t = _vec(_I8, 16)
    name = _BYTE_LOOKUP
    fn = b.module.globals.get(name) or ir.Function(b.module, ir.FunctionType(t, [t, t]), name=name)
    v = _load(b, p, off, t)
    consts = ir.Constant(t, list(table))
    out = []
    for idx in (b.and_(v, _c(t, 0x0F)), b.lshr(v, _c(t, 4))):  # indexes 0..15 (bit 7 clear)
        q = b.call(fn, [consts, idx])
        for h in range(16 // n):
            half = b.shuffle_vector(q, ir.Constant(t, ir.Undefined),
                                    ir.Constant(_vec(_I32, n), list(range(n * h, n * h + n))))
            out.append(b.sext(half, lane))
    return out


def _mxfp4_lanes(b: ir.IRBuilder, p, off: int, shuffle: bool | None = None):
    """MXFP4's E2M1 codes -> kvalues (see `_table_lanes`; the portable path is `_e2m1_codes`)."""
    return _table_lanes(b, p, off, _MXFP4_KVALUES, _e2m1_codes, shuffle)


_iq4nl_portable = _byte_table_codes(_IQ4NL_KVALUES)


def _iq4nl_lanes(b: ir.IRBuilder, p, off: int, shuffle: bool | None = None):
    """IQ4_NL's codes -> kvalues_iq4nl (see `_table_lanes`)."""
    return _table_lanes(b, p, off, _IQ4NL_KVALUES, _iq4nl_portable, shuffle)


def _emit_mxfp4(b, p, n):
    # block_mxfp4: u8 e (E8M0); qs[16] (low nibble = elem j, high = elem j+16).  w = d * kvalues[q]
    yield _int_piece(b, _mxfp4_lanes(b, p, 1), _e8m0_half(b, p, 0))


def _emit_iq4_nl(b, p, n):
    # block_iq4_nl: f16 d; qs[16] (low nibble = elem j, high = elem j+16).  w = d * kvalues_iq4nl[q]
    yield _int_piece(b, _iq4nl_lanes(b, p, 2), _f16_splat(b, p, 0))


def _emit_iq4_xs(b, p, n):
    # block_iq4_xs (ggml-common.h): f16 d; u16 scales_h; u8 scales_l[4]; qs[128].  Sub-block j of 32:
    # ls = (scales_l[j/2] >> 4*(j%2)) & 15 | ((scales_h >> 2j) & 3) << 4; qs[16j : 16j+16] as in IQ4_NL.
    # w = (d * (ls - 32)) * kvalues_iq4nl[q]   (gguf-py quants.py class IQ4_XS: dl = d * scales; dl * q)
    d = _f16_at(b, p, 0)
    scales_h = b.zext(_load(b, p, 2, _I16), _I32)
    k = lambda v: ir.Constant(_I32, v)  # noqa: E731
    for j in range(8):
        lo = b.and_(b.lshr(b.zext(_load(b, p, 4 + j // 2, _I8), _I32), k(4 * (j % 2))), k(15))
        hi = b.and_(b.lshr(scales_h, k(2 * j)), k(3))
        ls = b.sub(b.or_(lo, b.shl(hi, k(4))), k(32))
        yield _int_piece(b, _iq4nl_lanes(b, p, 8 + 16 * j), b.fmul(d, b.sitofp(ls, _F32)))


def _emit_qk_45(b, p, with_qh: bool):
    # block_q4_K: f16 d, f16 dmin, scales[12], qs[128]
    # block_q5_K: f16 d, f16 dmin, scales[12], qh[32], qs[128]
    # 8 sub-blocks of 32: sub 2c / 2c+1 = low / high nibbles of qs[32c : 32c+32];
    # Q5_K's 5th bit of sub i is bit i of qh[l].  w = (d * sc) * q - (dmin * m)
    d, dmin = _f16_at(b, p, 0), _f16_at(b, p, 2)
    qs_off = 48 if with_qh else 16
    qh = _run(b, p, 16) if with_qh else None
    scales = _k_scales(b, p, 4)
    for c in range(4):
        qs = _run(b, p, qs_off + 32 * c)
        for half in range(2):
            i = 2 * c + half
            q = [b.and_(v, _c(v.type, 0x0F)) if half == 0 else b.lshr(v, _c(v.type, 4)) for v in qs]
            if with_qh:
                q = [b.or_(v, b.and_(_shift_to(b, h, i, 4), _c(h.type, 16))) for v, h in zip(q, qh)]
            # Codes are centred for the float dot (small terms, no cancellation); the integer dot's sums
            # are exact, so it takes them as stored (bias 0) and saves the subtractions.
            centre = 0 if _CODE_BITS.get() == 16 else (16 if with_qh else 8)
            if centre:
                q = [b.sub(v, _c(v.type, centre)) for v in q]
            sc, mn = scales[i]
            # x - y == x + (-y) exactly, so the offset form decodes like gguf-py's subtraction
            yield _int_piece(b, q, b.fmul(d, b.uitofp(sc, _F32)),
                        b.fneg(b.fmul(dmin, b.uitofp(mn, _F32))), centre)


def _emit_q4_k(b, p, n):
    return _emit_qk_45(b, p, with_qh=False)


def _emit_q5_k(b, p, n):
    return _emit_qk_45(b, p, with_qh=True)


def _emit_q6_k(b, p, n):
    # block_q6_K: ql[128], qh[64], int8 scales[16], f16 d (last!).
    # Element 128h + 32t + l (h<2, t<4, l<32): low 4 bits from ql[64h + 32(t&1) + l] (nibble t>>1),
    # high 2 bits = (qh[32h + l] >> 2t) & 3; w = (d * scales[e // 16]) * (q - 32)
    d = _f16_at(b, p, 208)
    for h in range(2):
        qh = _run(b, p, 128 + 32 * h)
        ql = [_run(b, p, 64 * h + 32 * s) for s in range(2)]
        for t in range(4):
            q = []
            for lo, hi in zip(ql[t & 1], qh):
                lo = b.and_(lo, _c(lo.type, 0x0F)) if t < 2 else b.lshr(lo, _c(lo.type, 4))
                hi = b.and_(_shift_to(b, hi, 2 * t, 4), _c(hi.type, 0x30))
                q.append(b.sub(b.or_(lo, hi), _c(lo.type, 32)))
            s0 = 192 + 8 * h + 2 * t  # two 16-element scale groups per 32 lanes
            dl0 = b.fmul(d, b.sitofp(_load(b, p, s0, _I8), _F32))
            dl1 = b.fmul(d, b.sitofp(_load(b, p, s0 + 1, _I8), _F32))
            yield _int_piece(b, q, (dl0, dl1))


def _byte_parts(b: ir.IRBuilder, v):
    """<32 x i8> of signed codes (lanes 0..31) -> the current parts (see `_run`), sign-extended."""
    n = _part_lanes()
    lane = _vec(_lane_int(), n)
    return [b.sext(b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                    ir.Constant(_vec(_I32, n), list(range(n * k, n * k + n)))), lane)
            for k in range(32 // n)]


def _crumbs(b: ir.IRBuilder, p, off: int):
    """The 2-bit fields of the 64 bytes at `off` in the K-quants' order, one piece at a time: piece c =
    4h + s (h < 2, s < 4) is (qs[32h + l] >> 2s) & 3 for l < 32, as <32 x i8> (Q2_K, Q3_K, TQ2_0)."""
    t = _vec(_I8, 32)
    for h in range(2):
        qs = _load(b, p, off + 32 * h, t)
        for s in range(4):
            yield 4 * h + s, b.and_(_shift_to(b, qs, 2 * s, 0), _c(t, 3))


def _pair(b: ir.IRBuilder, vectors, c: int):
    """Per-16 values 2c and 2c + 1 (piece c's halves) out of two <8 x float> of 16 (scale_vectors' form)."""
    v = vectors[c // 4]
    return tuple(b.extract_element(v, ir.Constant(_I32, 2 * (c % 4) + k)) for k in range(2))


def _emit_tq2_0(b, p, n):
    # block_tq2_0: qs[64], f16 d (last).  Element 128h + 32s + l: q = ((qs[32h + l] >> 2s) & 3) - 1;
    # w = d * q   (gguf-py quants.py class TQ2_0)
    d = _f16_splat(b, p, 64)
    for _, code in _crumbs(b, p, 0):
        yield _int_piece(b, _byte_parts(b, b.sub(code, _c(code.type, 1))), d)


def _trits(b: ir.IRBuilder, v, mults):
    """Base-3 digits of TQ1_0's packed bytes: ((u8)(v * mult) * 3) >> 8, minus 1, per byte lane (the
    multiply wraps at 256 as in gguf-py's uint8 arithmetic, moving the wanted digit to the top)."""
    t = v.type
    m = b.mul(v, ir.Constant(t, list(mults)))
    w = _vec(_I16, t.count)
    top = b.lshr(b.mul(b.zext(m, w), _c(w, 3)), _c(w, 8))
    return b.sub(b.trunc(top, t), _c(t, 1))


def _emit_tq1_0(b, p, n):
    # block_tq1_0: qs[48], qh[4], f16 d.  5 trits per byte of qs, 4 per byte of qh; digit m of a byte
    # is ((u8)(byte * 3^m) * 3) >> 8.  Elements: 32m + l from qs[l] (m < 5, l < 32); 160 + 16m + l from
    # qs[32 + l] (l < 16); 240 + 4m + l from qh[l] (m, l < 4).  w = d * (digit - 1)
    # (gguf-py quants.py class TQ1_0)
    t = _vec(_I8, 32)
    d = _f16_splat(b, p, 52)
    qs0 = _load(b, p, 0, t)
    for m in range(5):
        yield _int_piece(b, _byte_parts(b, _trits(b, qs0, [3 ** m] * 32)), d)
    t16 = _vec(_I8, 16)
    qs1 = _load(b, p, 32, t16)
    both = b.shuffle_vector(qs1, qs1, ir.Constant(_vec(_I32, 32), list(range(16)) * 2))
    for m in (0, 2):
        yield _int_piece(b, _byte_parts(b, _trits(b, both, [3 ** m] * 16 + [3 ** (m + 1)] * 16)), d)
    qh = b.shuffle_vector(_load(b, p, 48, _vec(_I8, 4)), ir.Constant(_vec(_I8, 4), ir.Undefined),
                          ir.Constant(_vec(_I32, 16), list(range(4)) * 4))
    last = b.shuffle_vector(qs1, qh, ir.Constant(_vec(_I32, 32), list(range(16)) + [16 + l for l in range(4)] * 4))
    mults = [81] * 16 + [3 ** (k // 4) for k in range(16)]
    yield _int_piece(b, _byte_parts(b, _trits(b, last, mults)), d)


def _ternary_scale_vectors(offset: int):
    """TQ1_0 / TQ2_0: one scale d per super-block, for all 8 pieces; no minimums."""
    def vectors(b: ir.IRBuilder, p):
        return [_f16_splat(b, p, offset)], None
    return vectors


def _emit_q2_k(b, p, n):
    # block_q2_K: scales[16] (low nibble: scale, high: minimum, per 16 elements), qs[64], f16 d, f16 dmin.
    # Element 128h + 32s + l (h < 2, s < 4, l < 32): q = (qs[32h + l] >> 2s) & 3;
    # w = (d * (sc & 15)) * q - (dmin * (sc >> 4)), sc = scales[e // 16]   (gguf-py quants.py class Q2_K)
    scales, mins = _q2_k_scale_vectors(b, p)
    # centred codes for the float dot (as Q4_K); the integer dot takes them as stored
    centre = 0 if _CODE_BITS.get() == 16 else 2
    for c, code in _crumbs(b, p, 16):
        q = b.sub(code, _c(code.type, centre)) if centre else code
        ml = tuple(b.fneg(m) for m in _pair(b, mins, c))   # x - y == x + (-y): decodes as gguf-py's subtraction
        yield _int_piece(b, _byte_parts(b, q), _pair(b, scales, c), ml, centre)


def _emit_q3_k(b, p, n):
    # block_q3_K: hmask[32], qs[64], scales[12] (6-bit, packed), f16 d (last).  Element 128h + 32s + l
    # (h < 2, s < 4, l < 32): low 2 bits (qs[32h + l] >> 2s) & 3, high bit (hmask[l] >> (4h + s)) & 1;
    # q = low - (high ? 0 : 4); w = (d * (scale[e // 16] - 32)) * q   (gguf-py quants.py class Q3_K)
    # The bit work runs on 32 bytes at once, before the codes are widened (byte shifts are word shifts
    # plus the mask, which drops the bits shifted across).
    scales, _ = _q3_k_scale_vectors(b, p)
    hmask = _load(b, p, 0, _vec(_I8, 32))
    for c, low in _crumbs(b, p, 32):
        t = low.type
        high = b.and_(_shift_to(b, hmask, c, 2), _c(t, 4))
        yield _int_piece(b, _byte_parts(b, b.sub(b.or_(low, high), _c(t, 4))), _pair(b, scales, c))


# --- The grid i-quants: per group of 8 (or 4) weights an index into a lattice (grids.py), signs, and a
# scale per 32 (or 16) weights.  Layouts: ggml-common.h block_iq2_xxs ... block_iq1_m; decoding: gguf-py
# quants.py, classes IQ2_XXS ... IQ1_M.  The codes of a piece are the lattice coordinates with their signs
# applied (exact), so a piece is w = scale * q as for the other types, and the integer dot takes the codes
# as they are.

def _u(b: ir.IRBuilder, p, off: int, ty: ir.IntType = _I8):
    """The unsigned integer of type `ty` at `off`, as i32."""
    v = _load(b, p, off, ty)
    return v if ty == _I32 else b.zext(v, _I32)


def _i(v: int) -> ir.Constant:
    return ir.Constant(_I32, v)


def _field(b: ir.IRBuilder, v, shift: int, mask: int):
    """(v >> shift) & mask of an i32."""
    return b.and_(b.lshr(v, _i(shift)) if shift else v, _i(mask))


def _points(b: ir.IRBuilder, name: str, indexes):
    """The lattice points of gguf-py class `name` at `indexes` (<4 or 8 x i32>), concatenated: <32 x i8>."""
    rows, width = grids.grid_rows(name)
    return grids.gather(b, grids.table(b, f"edgelm_grid_{name}", rows, width), indexes)


def _ksigns(b: ir.IRBuilder, indexes):
    """Sign masks (<32 x i8>, -1 = negative) of 4 groups of 8 from their 7-bit sign indexes (<4 x i32>)."""
    return grids.gather(b, grids.table(b, "edgelm_ksign_masks", grids.ksign_masks(), 64), indexes)


def _sign_bytes(b: ir.IRBuilder, p, off: int):
    """Sign masks (<32 x i8>, -1 = negative) from the 4 bytes at `off`: bit j of byte k is element 8k + j."""
    t = _vec(_I8, 32)
    four = _load(b, p, off, _vec(_I8, 4))
    spread = b.shuffle_vector(four, ir.Constant(four.type, ir.Undefined),
                              ir.Constant(_vec(_I32, 32), [k // 8 for k in range(32)]))
    bits = ir.Constant(t, [1 << (k % 8) for k in range(32)])
    return b.sext(b.icmp_unsigned("!=", b.and_(spread, bits), _c(t, 0)), t)


def _signed(b: ir.IRBuilder, v, masks):
    """v negated where masks is -1: (v ^ m) - m."""
    return b.sub(b.xor(v, masks), masks)


def _half_plus(b: ir.IRBuilder, d, ls, factor: float):
    """(d * (0.5 + ls)) * factor, gguf-py's order (IQ2_XXS, IQ2_XS, IQ2_S: 0.25; IQ3_XXS: 0.5)."""
    return b.fmul(b.fmul(d, b.fadd(ir.Constant(_F32, 0.5), b.sitofp(ls, _F32))), ir.Constant(_F32, factor))


def _bytes_at(b: ir.IRBuilder, p, off: int, n: int):
    """The n bytes at `off`, each as an i32 (lattice indexes: scalar, one load per table row follows)."""
    return [_u(b, p, off + k) for k in range(n)]


def _high_bits(b: ir.IRBuilder, low, v, shifts, mask: int):
    """Lattice indexes: low[k] | ((v >> shifts[k]) & mask) << 8."""
    return [b.or_(lo, b.shl(_field(b, v, s, mask), _i(8))) for lo, s in zip(low, shifts)]


def _emit_xxs(b, p, grid: str, n_indexes: int, aux_at, factor: float):
    """IQ2_XXS / IQ3_XXS sub-blocks of 32: n_indexes lattice index bytes at 2 + 8j, and a u32 (at aux_at(j))
    holding 4 sign indexes (7 bits at 7l, 8 elements each) and ls (bits 28..31).
    w = (d * (0.5 + ls) * factor) * grid * sign."""
    d = _f16_at(b, p, 0)
    for j in range(8):
        aux = _u(b, p, aux_at(j), _I32)
        q = _signed(b, _points(b, grid, _bytes_at(b, p, 2 + 8 * j, n_indexes)),
                    _ksigns(b, [_field(b, aux, 7 * l, 127) for l in range(4)]))
        yield _int_piece(b, _byte_parts(b, q), _half_plus(b, d, b.lshr(aux, _i(28)), factor))


def _emit_iq2_xxs(b, p, n):
    # block_iq2_xxs: f16 d; u16 qs[32].  Sub-block j: two u32 at 2 + 8j, the first 4 lattice indexes (a byte
    # per 8 elements), the second the signs and ls.
    return _emit_xxs(b, p, "IQ2_XXS", 4, lambda j: 6 + 8 * j, 0.25)


def _emit_iq2_xs(b, p, n):
    # block_iq2_xs: f16 d; u16 qs[32]; u8 scales[8].  Group g of 8 elements: qs[g] & 511 is its lattice
    # index, qs[g] >> 9 its sign index; sub-block j has scales[j] (low nibble: elements 0-15, high: 16-31).
    d = _f16_at(b, p, 0)
    for j in range(8):
        qs = [_u(b, p, 2 + 8 * j + 2 * l, _I16) for l in range(4)]
        q = _signed(b, _points(b, "IQ2_XS", [_field(b, v, 0, 511) for v in qs]),
                    _ksigns(b, [b.lshr(v, _i(9)) for v in qs]))
        sc = _u(b, p, 66 + j)
        yield _int_piece(b, _byte_parts(b, q), tuple(_half_plus(b, d, _field(b, sc, 4 * h, 15), 0.25)
                                                     for h in range(2)))


def _emit_iq2_s(b, p, n):
    # block_iq2_s: f16 d; qs[64] (32 low index bytes, then 32 sign bytes); qh[8]; scales[8].  Group g:
    # index qs[g] | ((qh[g / 4] >> 2(g % 4)) & 3) << 8, signs: the bits of qs[32 + g]; scales as IQ2_XS.
    d = _f16_at(b, p, 0)
    for j in range(8):
        idx = _high_bits(b, _bytes_at(b, p, 2 + 4 * j, 4), _u(b, p, 66 + j), (0, 2, 4, 6), 3)
        q = _signed(b, _points(b, "IQ2_S", idx), _sign_bytes(b, p, 34 + 4 * j))
        sc = _u(b, p, 74 + j)
        yield _int_piece(b, _byte_parts(b, q), tuple(_half_plus(b, d, _field(b, sc, 4 * h, 15), 0.25)
                                                     for h in range(2)))


def _emit_iq3_xxs(b, p, n):
    # block_iq3_xxs: f16 d; qs[96]: 64 lattice indexes (a byte per 4 elements), then the u32 of signs and ls
    # per sub-block.
    return _emit_xxs(b, p, "IQ3_XXS", 8, lambda j: 66 + 4 * j, 0.5)


def _emit_iq3_s(b, p, n):
    # block_iq3_s: f16 d; qs[64]; qh[8]; signs[32]; scales[4].  Group k of 4 elements in sub-block j: index
    # qs[8j + k] | ((qh[j] >> k) & 1) << 8; signs: the bits of signs[4j .. 4j + 3]; scale nibble j of
    # scales (byte j / 2, low nibble first).  w = (d * (1 + 2 * s)) * grid * sign
    d = _f16_at(b, p, 0)
    for j in range(8):
        idx = _high_bits(b, _bytes_at(b, p, 2 + 8 * j, 8), _u(b, p, 66 + j), range(8), 1)
        q = _signed(b, _points(b, "IQ3_S", idx), _sign_bytes(b, p, 74 + 4 * j))
        s = _field(b, _u(b, p, 106 + j // 2), 4 * (j % 2), 15)
        yield _int_piece(b, _byte_parts(b, q), b.fmul(d, b.sitofp(b.add(b.shl(s, _i(1)), _i(1)), _F32)))


# IQ1: w = dl * (grid + delta) with grid in {-1, 0, 1} and delta = +-1/8.  As integer codes: 8 * grid +- 1,
# with scale dl / 8.  dl / 8 is exact (a power of two; dl is 0 or >= 2^-24, far from underflow), and
# (dl / 8) * (8g +- 1) rounds the same real number as dl * (g +- 1/8) (g +- 1/8 is exact in float32), so the
# decode stays bit-exact and the integer dot gets small integers.
_IQ1_DELTA = 1 / 8


def _iq1_codes(b: ir.IRBuilder, points, negative):
    """8 * grid + delta per element; `negative`: one i1 per group of 8 (delta -1 where set), or one for all."""
    t = points.type
    deltas = [b.select(neg, ir.Constant(_I8, -1), ir.Constant(_I8, 1)) for neg in negative]
    if len(deltas) == 1:
        spread = splat(b, deltas[0], t.count)
    else:
        four = ir.Constant(_vec(_I8, 4), ir.Undefined)
        for k, v in enumerate(deltas):
            four = b.insert_element(four, v, _i(k))
        spread = b.shuffle_vector(four, ir.Constant(four.type, ir.Undefined),
                                  ir.Constant(_vec(_I32, 32), [k // 8 for k in range(32)]))
    return b.add(b.shl(points, _c(t, 3)), spread)


def _emit_iq1_s(b, p, n):
    # block_iq1_s: f16 d; qs[32]; u16 qh[8].  Sub-block j: group l's index qs[4j + l] | ((qh[j] >> 3l) & 7) << 8;
    # dl = d * (2 * ((qh[j] >> 12) & 7) + 1); delta = -1/8 where bit 15 of qh[j] is set, else +1/8.
    d = _f16_at(b, p, 0)
    eighth = ir.Constant(_F32, _IQ1_DELTA)
    for j in range(8):
        qh = _u(b, p, 34 + 2 * j, _I16)
        idx = _high_bits(b, _bytes_at(b, p, 2 + 4 * j, 4), qh, (0, 3, 6, 9), 7)
        neg = b.icmp_unsigned("!=", _field(b, qh, 15, 1), _i(0))
        q = _iq1_codes(b, _points(b, "IQ1_S", idx), [neg])
        dl = b.fmul(d, b.sitofp(b.add(b.shl(_field(b, qh, 12, 7), _i(1)), _i(1)), _F32))
        yield _int_piece(b, _byte_parts(b, q), b.fmul(dl, eighth))


def _emit_iq1_m(b, p, n):
    # block_iq1_m: qs[32]; qh[16]; u16 scales[4].  d (f16) is the top nibbles of scales[0..3], lowest first;
    # scale k of 16 elements is (scales[k / 4] >> 3(k % 4)) & 7, dl = d * (2s + 1).  Group g of 8: nibble
    # qh[g / 2] >> 4(g % 2), index qs[g] | (nibble & 7) << 8, delta -1/8 where nibble bit 3 is set, else +1/8.
    sc = [_u(b, p, 48 + 2 * k, _I16) for k in range(4)]
    bits = b.or_(b.or_(b.lshr(sc[0], _i(12)), b.and_(b.lshr(sc[1], _i(8)), _i(0xF0))),
                 b.or_(b.and_(b.lshr(sc[2], _i(4)), _i(0xF00)), b.and_(sc[3], _i(0xF000))))
    d = half_to_f32(b, b.trunc(bits, _I16))
    eighth = ir.Constant(_F32, _IQ1_DELTA)
    for j in range(8):
        qh = _u(b, p, 32 + 2 * j, _I16)      # the nibbles of groups 4j .. 4j + 3, lowest first
        idx = _high_bits(b, _bytes_at(b, p, 4 * j, 4), qh, (0, 4, 8, 12), 7)
        neg = [b.icmp_unsigned("!=", _field(b, qh, 4 * l + 3, 1), _i(0)) for l in range(4)]
        q = _iq1_codes(b, _points(b, "IQ1_S", idx), neg)
        dl = [b.fmul(d, b.sitofp(b.add(b.shl(_field(b, sc[(2 * j + h) // 4], 3 * ((2 * j + h) % 4), 7), _i(1)),
                                       _i(1)), _F32)) for h in range(2)]
        yield _int_piece(b, _byte_parts(b, q), tuple(b.fmul(v, eighth) for v in dl))


# ---------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------

Emitter = Callable[[ir.IRBuilder, ir.Value, int], Iterator[Piece]]


@dataclass(frozen=True)
class QuantFormat:
    ggml_type: int          # gguf.GGMLQuantizationType value
    name: str
    block_size: int         # elements per block (1 for plain float types)
    type_size: int          # bytes per block
    emit: Emitter           # IR for one block -> Pieces (see "Emitters" above)
    # Super-block types (8 pieces): their scales as <8 x float> vectors, ([d * sc_j], dmin * m_j) for Q4_K /
    # Q5_K, ([d * s_0..7, d * s_8..15], None) for Q6_K and Q3_K, and with per-16 minimums as a pair of vectors
    # too for Q2_K, so the integer dot scales a whole super-block at once.
    scale_vectors: Callable | None = None
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
        (10, "Q2_K", 256, 84, _emit_q2_k),
        (34, "TQ1_0", 256, 54, _emit_tq1_0),
        (35, "TQ2_0", 256, 66, _emit_tq2_0),
        (11, "Q3_K", 256, 110, _emit_q3_k),
        (12, "Q4_K", 256, 144, _emit_q4_k),
        (13, "Q5_K", 256, 176, _emit_q5_k),
        (14, "Q6_K", 256, 210, _emit_q6_k),
        (39, "MXFP4", 32, 17, _emit_mxfp4),
        (20, "IQ4_NL", 32, 18, _emit_iq4_nl),
        (23, "IQ4_XS", 256, 136, _emit_iq4_xs),
        (16, "IQ2_XXS", 256, 66, _emit_iq2_xxs),
        (17, "IQ2_XS", 256, 74, _emit_iq2_xs),
        (22, "IQ2_S", 256, 82, _emit_iq2_s),
        (18, "IQ3_XXS", 256, 98, _emit_iq3_xxs),
        (21, "IQ3_S", 256, 110, _emit_iq3_s),
        (19, "IQ1_S", 256, 50, _emit_iq1_s),
        (29, "IQ1_M", 256, 56, _emit_iq1_m),
    ]
    vectors = {10: _q2_k_scale_vectors, 11: _q3_k_scale_vectors, 12: _k_scale_vectors, 13: _k_scale_vectors,
               14: _q6_k_scale_vectors, 34: _ternary_scale_vectors(52), 35: _ternary_scale_vectors(64)}
    return {t: QuantFormat(t, name, bs, ts, fn, vectors.get(t)) for t, name, bs, ts, fn in specs}


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


def dequantize(raw_u8_2d: np.ndarray, ggml_type: int, n_in: int, kinds: int = 0) -> np.ndarray:
    """All rows of a quantized 2-D tensor as float32 (rows, n_in); equals gguf.quants.dequantize.
    kinds: as for kernels.get_rows."""
    from edgelm.quant.kernels import get_rows  # kernels import this module; import late

    ids = np.arange(raw_u8_2d.shape[0], dtype=np.int64)
    return get_rows(raw_u8_2d, ggml_type, n_in, ids, kinds=kinds)
