"""Numba kernels over quantized weights: matvec (decode), matmul (prefill), get_rows (embeddings).

Precision policy: activations keep float32-level accuracy.  Prefill (matmul) decodes weight blocks to
float32 and multiplies them with the float32 activations.  Decode (matvec) multiplies the weights'
integer codes with the activations written in fixed point per 32 elements, x = S * X1 with int16 X1
and S = max|x| / 32767: the integer sums are exact (x86: vpmaddwd), and x is represented to 2^-16 of
its block's largest element -- 32x finer than the f16 KV cache stores every key and value, and far
from int8's 2^-8.  Teacher-forced decode against transformers (256 tokens, tools/decode_fidelity.py):
KL 8.7e-7 / 7.7e-7 on SmolLM2 / Gemma 3 against 7.7e-7 / 6.5e-7 for the float dot, top-1 1.000 on
both, and greedy text identical to the float path's.  set_matvec_passes(2) (env EDGELM_MATVEC_PASSES=2)
adds a second int16 pass for the remainder (x to ~2^-31 of the block maximum: KL 7.8e-7 / 6.7e-7) at
~0.7x the speed; set_matvec_passes(0) restores the float dot (speed per type: docs/benchmarks.md).
No int8 activation path (it flips answers on small models).

Structure
  * A *plan* describes one or more weight matrices that share an input (a row per matrix: address
    of its mapped bytes, row bytes, ggml type, n_out, first output row, first byte).  `FusedLinear`
    builds it once; `matvec` / `matmul` build a one-row plan per call.  One kernel call computes a
    whole plan in ONE parallel region, whatever mix of types it holds (gemma's q/k are Q5_0 and v
    is Q8_0): the work is split by weight bytes (matvec) or rows (matmul) across the matrices.
  * matvec takes one activation row (decode) or up to BATCH_ROWS (a draft being verified, a step of
    several sequences): each weight row is read once and decoded once per group of up to 4 activation
    rows, and a row's result is the same bits whatever the batch (so speculative and batched decoding
    give exactly plain decoding's logits).  Longer batches (prompts) go to matmul.
  * Intrinsics do the per-type work, generated from `formats.FORMATS`:
      _mv_rows(kid, addr, row_bytes, r0, r1, n_in, M, x, ..., y, y_off, n_out)
                                                      y[y_off + m * n_out + r] = W[r] . x_m, m < M
      _decode_row(kid, addr, row_bytes, r, n_in, dst, off)             W[r] -> dst[off : off+n_in]
    Each emits one `switch` on the ggml type id with one vectorised loop per type, for the types in
    the kernel's `kinds` mask (a compile-time constant, `numba.literally`): a model compiles its kernels
    once, for exactly the types its file holds (Weights.kinds), so a first run pays only for those
    (all 25 types in every kernel took 44 s to compile cold, against ~12-20 s for one model's few).
    The vector IR is target independent (AVX2, AVX-512, NEON: LLVM picks the instructions).
  * The dot product works in the emitters' factored form (w = scale * (q + bias) + offset per 32
    weights, codes centred on zero): it sums q * x over each piece, multiplies by the scale once,
    and adds the constant part times sum(x), from sums of x computed once per call.
  * matmul packs the activations once per call (panels of 16 rows, 32 with AVX-512; k-major, transposed
    8 x 8 in registers by `_matmul_panel`); each thread takes an equal share of the rows of all matrices,
    decodes them a tile at a time and runs a 6x16 (AVX-512: 8x32) register-blocked micro-kernel
    (`_matmul_tile`, outer products as in BLAS) over every panel, k in passes of <= 128 for accuracy.
  * Float flags are {"contract"} only (FMA): the IR fixes every summation order, so a result does
    not depend on the thread split, on serial vs parallel, or on fused vs single calls.
  * The numba kernels live inside `_build()`, a closure over a fingerprint of formats.py, grids.py and this
    file: numba's on-disk cache only watches the file a kernel is defined in, and the closure value is part
    of its cache key, so editing an emitter or intrinsic recompiles every kernel that inlines it (attention's
    too) instead of silently reusing stale machine code.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from types import SimpleNamespace
from typing import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgelm.quant import formats as _formats
from edgelm.quant import grids as _grids
from edgelm.quant.formats import FORMATS, LANES, Piece, QuantFormat, format_for, row_bytes, splat

__all__ = ["matvec", "matmul", "get_rows", "FusedLinear", "matvec_multi", "matmul_multi", "decode_piece"]

_I32, _I64, _F32 = ir.IntType(32), ir.IntType(64), ir.FloatType()
_I8P = ir.IntType(8).as_pointer()
_VW = 8                                  # lanes of the dot-product accumulators
_V8F = ir.VectorType(_F32, _VW)
_V32F = ir.VectorType(_F32, LANES)
# Matvec tuning (2-core Zen 3, measured): two accumulators per row keep the dependency chains
# short; rows are done one at a time, in address order, so each thread reads one sequential
# stream (doing 4 rows at once shares x loads and is faster in cache, but interleaving 4 streams
# defeated the hardware prefetcher: 6.3 instead of 22 GB/s from RAM); a software prefetch 4 KiB
# ahead adds ~15% on big matrices.
_NACC = 2
_PF_BYTES = 4096
# Float flags of the matvec / matmul kernels: only FMA contraction.  The IR fixes every summation
# order itself, so without reassociation a row's result is the same bit for bit wherever the row
# is computed (serial or parallel call, any split across threads, fused or single).
_FASTMATH = {"contract"}

# A matvec runs on the calling thread unless it is worth waking the workers (~17 us with
# OMP_WAIT_POLICY=passive on the 2-core VM): measured, one thread does ~0.13 ns per weight for the
# 4/5/6-bit types and ~0.075 for Q8_0 and floats, and the parallel call wins from ~35 us of work.
_PAR_MIN_WORK = 280_000  # weights, counting Q8_0 / float weights 0.6


def _work(ggml_type: int, n_weights: int) -> float:
    return n_weights * (0.6 if ggml_type in (0, 1, 8, 30) else 1.0)


# Decode's dot products: 0 = float32 activations; 1 or 2 = the integer dot with activations as int16 codes
# (see set_matvec_passes and the module docstring for the accuracy of each).
_PASSES = [int(os.environ.get("EDGELM_MATVEC_PASSES", "1"))]


def set_matvec_passes(passes: int) -> None:
    """How matvec multiplies quantized rows by x: 1 (the default) exact integer dot products of the codes
    with x as int16 fixed point (x to 2^-16 of its block maximum); 2 a second int16 pass for the remainder
    (x to ~2^-31, as accurate as the float path); 0 float32 FMAs on decoded weights."""
    if passes not in (0, 1, 2):
        raise ValueError(f"matvec passes must be 0, 1 or 2, got {passes}")
    _PASSES[0] = int(passes)


# Batches of up to this many rows run as matvecs sharing each weight read (matvec_batch): a draft being
# verified or a step of several sequences gets, row for row, the bits of decoding each token alone, and
# below ~16 rows it is faster than decoding weight tiles to float32 for the matmul micro-kernel.
BATCH_ROWS = 16

_PAR_MIN_ROWS_BYTES = 64 * 1024  # float32 bytes written by get_rows / dequantize
# Work is split into this many chunks (numba.get_num_threads() costs ~2 us per call; if a caller
# lowers the thread count with numba.set_num_threads, the chunks just share fewer threads).
_NCHUNKS = numba.config.NUMBA_NUM_THREADS

# plan columns
_P_ADDR, _P_RB, _P_KID, _P_NOUT, _P_ROW0, _P_BYTE0, _P_BLOCK, _P_TSIZE = range(8)
_F32D = np.dtype(np.float32)


# ---------------------------------------------------------------------------------------------
# IR helpers
# ---------------------------------------------------------------------------------------------

def _i64(v):
    return ir.Constant(_I64, v)


def _data_ptr(context, builder, ty, val, offset=None):
    ptr = context.make_array(ty)(context, builder, value=val).data
    return builder.gep(ptr, [offset]) if offset is not None else ptr


def kinds_mask(ggml_types) -> int:
    """The set of types a kernel is compiled for, as a bit mask (bit t: ggml type t)."""
    mask = 0
    for t in ggml_types:
        mask |= 1 << format_for(t).ggml_type
    return mask


def _kinds(kinds) -> int | None:
    """The literal type mask a kernel specialisation is compiled for (see the module docstring); None while
    numba types the kernel before `literally` has made the mask a constant (the intrinsic then declines)."""
    return kinds.literal_value if isinstance(kinds, types.IntegerLiteral) else None


def _per_format(builder, kid, body, kinds: int):
    """switch (kid) { case t: body(FORMATS[t]) ... } for the types in the mask `kinds`; other ids fall
    through (callers make sure the mask covers every type they pass)."""
    merge = builder.append_basic_block("quant.merge")
    sw = builder.switch(kid, merge)
    for t, fmt in sorted(FORMATS.items()):
        if not kinds >> t & 1:
            continue
        bb = builder.append_basic_block(f"quant.{fmt.name}")
        sw.add_case(ir.Constant(_I64, t), bb)
        builder.position_at_end(bb)
        body(fmt)
        builder.branch(merge)
    builder.position_at_end(merge)


def _at(builder, ptr, index, scale):
    """&ptr[index * scale] (element units of ptr's type)."""
    return builder.gep(ptr, [builder.mul(index, _i64(scale))])


def _vload(builder, fptr, off, vt=_V8F):
    q = builder.gep(fptr, [_i64(off)]) if off else fptr
    return builder.load(builder.bitcast(q, vt.as_pointer()), align=4)


def _lanes(builder, vec, lo, n):
    """Lanes lo .. lo+n-1 of `vec` as an n-vector."""
    return builder.shuffle_vector(vec, ir.Constant(vec.type, ir.Undefined),
                                  ir.Constant(ir.VectorType(_I32, n), list(range(lo, lo + n))))


def _lane0(builder, vec):
    return builder.extract_element(vec, ir.Constant(_I32, 0))


def _hsum(builder, v):
    """Pairwise tree over the lanes of v (explicit, so no reassociation flag is needed)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(_lanes(builder, v, 0, n), _lanes(builder, v, n, n))
    return _lane0(builder, v)


def _steps(builder, fmt, n_in):
    """(number of whole emitter steps in a row, element index where the scalar tail starts)."""
    n_steps = builder.sdiv(n_in, _i64(fmt.step))
    return n_steps, builder.mul(n_steps, _i64(fmt.step))


def _bcast(b, v, n=_VW):
    """A float as <n x float>: scalars are splatted, equal-lane vectors re-shaped; a pair (per-16-lane
    values, Q6_K / Q3_K scales, Q2_K minimums) fills the first n/2 lanes and the last n/2 (the halves of a
    piece, or of its 8 lanes of x sums, which hold elements 0-15 in lanes 0-3)."""
    if isinstance(v, tuple):
        lo, hi = v
        return b.shuffle_vector(splat(b, lo, n // 2), splat(b, hi, n // 2),
                                ir.Constant(ir.VectorType(_I32, n), list(range(n))))
    if isinstance(v.type, ir.VectorType):
        if v.type.count == n:
            return v
        return b.shuffle_vector(v, ir.Constant(v.type, ir.Undefined),
                                ir.Constant(ir.VectorType(_I32, n), [0] * n))
    return splat(b, v, n)


def decode_piece(b, pc: Piece):
    """The weights of a piece, evaluated exactly as gguf-py does: scale * (q + bias), + offset."""
    q, n = pc.q, pc.q.type.count
    if pc.bias:  # back to the stored code (a small integer: exact)
        q = b.fadd(q, ir.Constant(q.type, [float(pc.bias)] * n))
    if pc.scale is None:
        w = q
    else:                              # (a pair: per-16-lane scales, see _bcast)
        w = b.fmul(_bcast(b, pc.scale, n), q)
    if pc.offset is not None:
        w = b.fadd(w, _bcast(b, pc.offset, n))
    return w


def _piece_dot(b, pc: Piece, xv, acc):
    """acc (a list of _NACC <8 x float>) += the piece's weights . x, where xv are the 4 x vectors
    of its lanes.

    Pieces with a scale sum q * x over a group of lanes first and multiply by the scale once per
    group (one group per accumulator, which keeps the dependency chains short); the offset (block
    minimum, zero point) is handled by the caller from sums of x."""
    nv = LANES // _VW
    q = [_lanes(b, pc.q, _VW * k, _VW) for k in range(nv)]
    acc = list(acc)
    if pc.scale is None:
        for k in range(nv):
            acc[k % _NACC] = b.fadd(acc[k % _NACC], b.fmul(q[k], xv[k]))
        return acc
    scales = [pc.scale[k * _VW // (LANES // 2)] for k in range(nv)] if isinstance(pc.scale, tuple) \
        else [pc.scale] * nv
    per = nv // _NACC
    for g in range(_NACC):
        ks = range(g * per, (g + 1) * per)
        part, s = None, None
        for k in ks:
            if part is not None and scales[k] is not s:  # a new scale inside the group
                acc[g] = b.fadd(acc[g], b.fmul(_bcast(b, s), part))
                part = None
            t = b.fmul(q[k], xv[k])
            part, s = (t if part is None else b.fadd(part, t)), scales[k]
        acc[g] = b.fadd(acc[g], b.fmul(_bcast(b, s), part))
    return acc


def _prefetch(b, ptr):
    """llvm.prefetch(ptr, read, locality 3, data cache)."""
    mod = b.module
    name = "llvm.prefetch.p0i8"
    fn = mod.globals.get(name)
    if fn is None:
        fn = ir.Function(mod, ir.FunctionType(ir.VoidType(), [_I8P, _I32, _I32, _I32]), name=name)
    b.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 2), ir.Constant(_I32, 1)])


def _dot_rows(b, fmt: QuantFormat, rows, n_in, xp, xsp, pf_bytes=0):
    """Dot products of the rows at byte pointers `rows` with x; returns one float per row.

    xsp: sums of x, 8 lanes per 32 elements (xs8[8g + l] = sum_k x[32g + 4l + k], k < 4: lanes 0-3 sum the
    first 16 elements, so a pair of per-16 offsets applies as one vector, see _bcast)."""
    zero = ir.Constant(_V8F, [0.0] * _VW)
    acc_p = [[cgutils.alloca_once_value(b, zero) for _ in range(_NACC)] for _ in rows]
    off_p = [cgutils.alloca_once_value(b, zero) for _ in rows]
    tail_p = [cgutils.alloca_once_value(b, ir.Constant(_F32, 0.0)) for _ in rows]
    n_steps, tail0 = _steps(b, fmt, n_in)
    with cgutils.for_range(b, n_steps) as loop:
        i = loop.index
        xs = _at(b, xp, i, fmt.step)
        xss = _at(b, xsp, i, fmt.step // LANES * _VW)
        acc = [[b.load(p) for p in ps] for ps in acc_p]
        off = [b.load(p) for p in off_p]
        blocks = [_at(b, r, i, fmt.step_bytes) for r in rows]
        if pf_bytes:
            for blk in blocks:
                _prefetch(b, b.gep(blk, [_i64(pf_bytes)]))
        gens = [fmt.emit(b, blk, fmt.step) for blk in blocks]
        for j, pieces in enumerate(zip(*gens)):
            xv = [_vload(b, xs, LANES * j + _VW * k) for k in range(LANES // _VW)]
            xsv = None
            for r, pc in enumerate(pieces):
                acc[r] = _piece_dot(b, pc, xv, acc[r])
                # w = scale * (q + bias) + offset: the constant part times sum(x)
                o = None
                if pc.offset is not None:
                    o = _bcast(b, pc.offset)
                    if pc.bias:
                        bias = ir.Constant(_V8F, [float(pc.bias)] * _VW)
                        o = b.fadd(b.fmul(_bcast(b, pc.scale), bias), o)
                if o is not None:
                    if xsv is None:
                        xsv = _vload(b, xss, _VW * j)
                    off[r] = b.fadd(off[r], b.fmul(o, xsv))
        for ps, vs in zip(acc_p, acc):
            for p, v in zip(ps, vs):
                b.store(v, p)
        for p, v in zip(off_p, off):
            b.store(v, p)
    if fmt.block_size == 1:  # plain float rows: n_in need not be a multiple of 32
        with cgutils.for_range(b, n_in, start=tail0) as loop:
            i = loop.index
            xi = b.load(b.gep(xp, [i]))
            for r, tp in zip(rows, tail_p):
                w = _lane0(b, next(fmt.emit(b, _at(b, r, i, fmt.type_size), 1)).q)
                b.store(b.fadd(b.load(tp), b.fmul(w, xi)), tp)
    sums = []
    for ps, o, t in zip(acc_p, off_p, tail_p):
        v = b.load(o)
        for p in ps:
            v = b.fadd(v, b.load(p))
        sums.append(b.fadd(_hsum(b, v), b.load(t)))
    return sums


_V16S = ir.VectorType(ir.IntType(16), 16)
_V8I = ir.VectorType(_I32, _VW)
# Activations in fixed point for the integer dot (see the module docstring): per 32 elements a scale S and
# `passes` int16 codes per element, x ~= S * (X1 + X2 / 2^15).
_XQ_MAX = 32767.0
_XQ_LOW = 2.0 ** -15


def _madd16(b, a, c):
    """<16 x i16> a, c -> <8 x i32>: a[2i] * c[2i] + a[2i+1] * c[2i+1], exact (x86: vpmaddwd)."""
    if _formats._AVX2:
        name = "llvm.x86.avx2.pmadd.wd"
        fn = b.module.globals.get(name) or ir.Function(
            b.module, ir.FunctionType(_V8I, [_V16S, _V16S]), name=name)
        return b.call(fn, [a, c])
    wide = ir.VectorType(_I32, 16)
    p = b.mul(b.sext(a, wide), b.sext(c, wide))
    pick = lambda o: b.shuffle_vector(p, ir.Constant(wide, ir.Undefined),  # noqa: E731
                                      ir.Constant(_V8I, list(range(o, 16, 2))))
    return b.add(pick(0), pick(1))


def _codes16(b, lanes):
    """A piece's codes (parts of lanes 0..31, each fits int16) -> 2 x <16 x i16> (lanes 0-15, 16-31).
    Emitters inside `code_bits(16)` already give that; 4 x <8 x i32> parts are narrowed."""
    if len(lanes) == 2 and lanes[0].type == _V16S:
        return list(lanes)
    out = []
    for lo, hi in ((lanes[0], lanes[1]), (lanes[2], lanes[3])):
        v = b.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_I32, 16), list(range(16))))
        out.append(v if v.type == _V16S else b.trunc(v, _V16S))
    return out


_NACC_INT = 4   # accumulators of the integer dot: one FMA chain each, so 4 blocks are in flight at once


def _sum_lanes8(b, vs):
    """8 vectors <8 x float> or <8 x i32> -> one whose lane j is the sum of vs[j]'s lanes (a
    transpose-and-add tree)."""
    add = b.add if isinstance(vs[0].type.element, ir.IntType) else b.fadd

    def pairs(a, c, idx_a, idx_b):
        mask = lambda idx: ir.Constant(ir.VectorType(_I32, _VW), idx)  # noqa: E731
        return add(b.shuffle_vector(a, c, mask(idx_a)), b.shuffle_vector(a, c, mask(idx_b)))
    u = [pairs(vs[k], vs[k + 1], [0, 8, 2, 10, 4, 12, 6, 14], [1, 9, 3, 11, 5, 13, 7, 15]) for k in (0, 2, 4, 6)]
    v = [pairs(u[k], u[k + 1], [0, 1, 8, 9, 4, 5, 12, 13], [2, 3, 10, 11, 6, 7, 14, 15]) for k in (0, 2)]
    return pairs(v[0], v[1], [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15])


def _dot_rows_int(b, fmt: QuantFormat, row, n_in, xsets, passes: int, pf_bytes=0):
    """The dot products of one quantized row with activation vectors given in fixed point: xsets lists, per
    vector, (xqp: int16 codes, 32 * passes per block of 32; xscp: the block scales; xsp, xbsp: sums of x);
    returns one float per vector.  Per piece, integer sums of codes times codes (exact), then (weight scale *
    S) times their float value; the offsets (block minimums) use the float sums of x, as in `_dot_rows`.
    Pieces rotate over _NACC_INT accumulators and short blocks are unrolled so that the FMA latency (4 cycles)
    does not bound the loop: one accumulator per block ran at ~1 block per 4 cycles.

    The row's blocks are decoded once per step and applied to every vector; each vector's arithmetic is the
    same code in the same order whatever the number of vectors, so its result is the same bits as with that
    vector alone (a batch of tokens gives what that many decode steps give)."""
    zero = ir.Constant(_V8F, [0.0] * _VW)
    acc_p = [[cgutils.alloca_once_value(b, zero) for _ in range(_NACC_INT)] for _ in xsets]
    off_p = [cgutils.alloca_once_value(b, zero) for _ in xsets]
    n_steps, _ = _steps(b, fmt, n_in)
    per_step = fmt.step // LANES
    unroll = max(1, _NACC_INT // per_step)
    low = ir.Constant(_V8F, [_XQ_LOW] * _VW)

    def step(i, accs, offs, rot):
        blk = _at(b, row, i, fmt.step_bytes)
        if pf_bytes:   # every cache line of the block (a super-block spans 2-4 lines)
            for line in range(0, fmt.step_bytes, 64):
                _prefetch(b, b.gep(blk, [_i64(pf_bytes + line)]))
        with _formats.code_bits(16):
            pieces = list(fmt.emit(b, blk, fmt.step))
        q16s = [_codes16(b, pc.lanes) for pc in pieces]
        sv = fmt.scale_vectors(b, blk) if fmt.scale_vectors is not None else None
        for s, (xqp, xscp, xsp, xbsp) in enumerate(xsets):
            x = (_at(b, xqp, i, fmt.step * passes), _at(b, xscp, i, per_step), _at(b, xsp, i, per_step * _VW),
                 _at(b, xbsp, i, per_step))
            if sv is not None:            # Q4_K / Q5_K / Q6_K: scale the super-block at once
                offs[s] = _superblock(x, pieces, q16s, sv, accs[s], offs[s], rot)
            else:
                offs[s] = _blocks(x, pieces, q16s, accs[s], offs[s], rot)

    def _blocks(x, pieces, q16s, acc, off, rot):
        xqs, xscs, xss, _ = x
        for j, pc in enumerate(pieces):
            q16 = q16s[j]
            sx = b.load(b.gep(xscs, [_i64(j)]))
            halves = []  # per pass: (lanes 0-15, lanes 16-31) as <8 x i32> pair sums
            for p in range(passes):
                base = (j * passes + p) * LANES
                xv = [b.load(b.bitcast(b.gep(xqs, [_i64(base + 16 * h)]), _V16S.as_pointer()), align=2)
                      for h in range(2)]
                halves.append([_madd16(b, q16[h], xv[h]) for h in range(2)])
            k = (rot + j) % _NACC_INT
            if isinstance(pc.scale, tuple):   # a scale per 16 lanes (Q6_K): keep the halves apart
                for h in range(2):
                    f = b.sitofp(halves[0][h], _V8F)
                    for p in range(1, passes):
                        f = b.fadd(f, b.fmul(b.sitofp(halves[p][h], _V8F), low))
                    s = splat(b, b.fmul(pc.scale[h], sx), _VW)
                    kh = (k + 2 * h) % _NACC_INT
                    acc[kh] = b.fadd(acc[kh], b.fmul(s, f))
            else:
                f = b.sitofp(b.add(*halves[0]), _V8F)
                for p in range(1, passes):
                    f = b.fadd(f, b.fmul(b.sitofp(b.add(*halves[p]), _V8F), low))
                s = b.fmul(_bcast(b, pc.scale), splat(b, sx, _VW))
                acc[k] = b.fadd(acc[k], b.fmul(s, f))
            if pc.offset is not None:
                o = _bcast(b, pc.offset)
                if pc.bias:
                    bias = ir.Constant(_V8F, [float(pc.bias)] * _VW)
                    o = b.fadd(b.fmul(_bcast(b, pc.scale), bias), o)
                off = b.fadd(off, b.fmul(o, _vload(b, xss, _VW * j)))
        return off

    def piece_ints(xqs, j, q16, merge):
        """Codes x fixed-point x over piece j, per pass: <8 x i32> partial sums of lanes 0-15 and of
        16-31, or (merge) one of both."""
        out = []
        for p in range(passes):
            base = (j * passes + p) * LANES
            prods = [_madd16(b, q16[h], b.load(b.bitcast(b.gep(xqs, [_i64(base + 16 * h)]), _V16S.as_pointer()),
                                                 align=2)) for h in range(2)]
            out.append([b.add(*prods)] if merge else prods)
        return out

    def lane_sums(per_pass):
        """per_pass[p]: 8 <8 x i32> vectors -> <8 x float> of their lane sums, the passes combined: the
        transpose-and-add runs on the integers (exact), so one conversion per pass, not one per piece."""
        f = None
        for p, vs in enumerate(per_pass):
            v = b.sitofp(_sum_lanes8(b, vs), _V8F)
            f = v if p == 0 else b.fadd(f, b.fmul(v, low))
        return f

    def _superblock(x, pieces, q16s, sv, acc, off, rot):
        """One super-block of 8 pieces: per-piece integer sums reduced to one lane each (_sum_lanes8),
        then scaled by the format's scale vectors: 8 per-piece scales (Q4_K, Q5_K: + minimums), or 16
        per-half scales (Q6_K)."""
        xqs, xscs, xss, xbss = x
        scales, mins = sv
        ints = [piece_ints(xqs, j, q16s[j], len(scales) == 1) for j in range(len(pieces))]
        sx = _vload(b, xscs, 0)                             # the 8 blocks' activation scales
        k = rot % _NACC_INT
        if len(scales) == 1:
            sums = lane_sums([[ints[j][p][0] for j in range(8)] for p in range(passes)])
            acc[k] = b.fadd(acc[k], b.fmul(scales[0], b.fmul(sx, sums)))
        else:                                               # lane m of part g: half m of piece 4g + m // 2
            for g in range(2):
                sums = lane_sums([[h for j in range(4 * g, 4 * g + 4) for h in ints[j][p]] for p in range(passes)])
                sxg = b.shuffle_vector(sx, ir.Constant(_V8F, ir.Undefined),
                                       ir.Constant(ir.VectorType(_I32, _VW), [4 * g + m // 2 for m in range(8)]))
                kg = (k + g) % _NACC_INT
                acc[kg] = b.fadd(acc[kg], b.fmul(scales[g], b.fmul(sxg, sums)))
        if mins is None:
            return off
        if isinstance(mins, list):   # per-16 minimums (Q2_K): piece j's pair against its 8 lanes of x sums
            for j in range(len(pieces)):
                pair = ir.Constant(ir.VectorType(_I32, _VW), [2 * (j % 4) + m // 4 for m in range(_VW)])
                m = b.shuffle_vector(mins[j // 4], ir.Constant(_V8F, ir.Undefined), pair)
                off = b.fsub(off, b.fmul(m, _vload(b, xss, _VW * j)))
            return off
        # the minimums (and the bias, where codes are centred: q - bias) multiply the sums of x
        xb = _vload(b, xbss, 0)
        if pieces[0].bias:
            bias = ir.Constant(_V8F, [float(pieces[0].bias)] * _VW)
            return b.fadd(off, b.fmul(b.fsub(b.fmul(scales[0], bias), mins), xb))
        return b.fsub(off, b.fmul(mins, xb))

    def run(count, first, n_per):
        with cgutils.for_range(b, count) as loop:
            accs = [[b.load(p) for p in ps] for ps in acc_p]
            offs = [b.load(p) for p in off_p]
            i0 = b.add(first, b.mul(loop.index, _i64(n_per)))
            for u in range(n_per):
                step(b.add(i0, _i64(u)), accs, offs, u * per_step)
            for ps, acc in zip(acc_p, accs):
                for p, v in zip(ps, acc):
                    b.store(v, p)
            for p, v in zip(off_p, offs):
                b.store(v, p)

    n_main = b.sdiv(n_steps, _i64(unroll))
    run(n_main, _i64(0), unroll)
    if unroll > 1:
        done = b.mul(n_main, _i64(unroll))
        run(b.sub(n_steps, done), done, 1)
    sums = []
    for ps, op in zip(acc_p, off_p):
        v = b.load(op)
        for p in ps:
            v = b.fadd(v, b.load(p))
        sums.append(_hsum(b, v))
    return sums


# ---------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------

def _is_int(t):
    return isinstance(t, types.Integer)


def _is_f32(t, ndim=None):
    return (isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C"
            and (ndim is None or t.ndim == ndim))


# Activation vectors per decoded row in the batched matvec: groups of 4, then a pair, then one (4 x 5 accumulators:
# AVX2's 16 registers spill a little; 8 spilled more than decoding the row, which is in L1, again costs).
_GROUPS = (4, 2, 1)


@intrinsic
def _mv_rows(typingctx, kid, addr, rb, r0, r1, n_in, m_rows, x, xs8, xbs, xq, xsc, passes, y, yoff, n_out, kinds):
    """y[yoff + m * n_out + r] = W[r] . x_m for r in [r0, r1) and every m < m_rows: one vector (decode) or a
    few (a draft to verify, a step of several sequences); x, xs8, xbs, xq, xsc hold the vectors' data back to
    back.  Each row is read from memory once and decoded once per group of vectors (_GROUPS); a vector's
    result is the same bits in any group (passes 0: the float dot, 1 or 2: the integer dot)."""
    if not (all(_is_int(t) for t in (kid, addr, rb, r0, r1, n_in, m_rows, passes, yoff, n_out))
            and _is_f32(x, 1) and _is_f32(xs8, 1) and _is_f32(xbs, 1) and _is_f32(xsc, 1) and _is_f32(y, 1)
            and isinstance(xq, types.Array) and xq.dtype == types.int16 and xq.ndim == 1):
        return None
    mask = _kinds(kinds)
    if mask is None:
        return None
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, types.int64, types.int64,
                     x, xs8, xbs, xq, xsc, types.int64, y, types.int64, types.int64, kinds)

    def codegen(context, builder, signature, args):
        kid_v, addr_v, rb_v, r0_v, r1_v, n_v, m_v, x_v, xs_v, xbs_v, xq_v, xsc_v, passes_v, y_v, yoff_v, \
            nout_v, _ = args
        b = builder
        base = b.inttoptr(addr_v, _I8P)
        xp = _data_ptr(context, b, signature.args[7], x_v)
        xsp = _data_ptr(context, b, signature.args[8], xs_v)
        xbsp = _data_ptr(context, b, signature.args[9], xbs_v)
        xqp = _data_ptr(context, b, signature.args[10], xq_v)
        xscp = _data_ptr(context, b, signature.args[11], xsc_v)
        yp = _data_ptr(context, b, signature.args[13], y_v, yoff_v)
        npc = b.sdiv(n_v, _i64(32))

        def out_at(m, r):
            return b.gep(yp, [b.add(b.mul(m, nout_v), r)])

        def float_rows(fmt):
            with cgutils.for_range(b, r1_v, start=r0_v) as rows:
                row = b.gep(base, [b.mul(rows.index, rb_v)])
                with cgutils.for_range(b, m_v) as ms:
                    m = ms.index
                    (dot,) = _dot_rows(b, fmt, [row], n_v, b.gep(xp, [b.mul(m, n_v)]),
                                       b.gep(xsp, [b.mul(m, b.mul(npc, _i64(_VW)))]), _PF_BYTES)
                    b.store(dot, out_at(m, rows.index))

        def int_rows(fmt, n_pass, sizes):
            """Each row against every vector: groups of sizes[0] vectors, then at most one group of each smaller
            size (they halve) for the rest."""
            def xset(m):
                return (b.gep(xqp, [b.mul(m, b.mul(n_v, _i64(n_pass)))]), b.gep(xscp, [b.mul(m, npc)]),
                        b.gep(xsp, [b.mul(m, b.mul(npc, _i64(_VW)))]), b.gep(xbsp, [b.mul(m, npc)]))

            def group(row, r, m0, g):
                ms = [b.add(m0, _i64(k)) for k in range(g)]
                for m, dot in zip(ms, _dot_rows_int(b, fmt, row, n_v, [xset(m) for m in ms], n_pass, _PF_BYTES)):
                    b.store(dot, out_at(m, r))

            n_first = b.sdiv(m_v, _i64(sizes[0]))
            done0 = b.mul(n_first, _i64(sizes[0]))
            done_p = cgutils.alloca_once(b, _I64)
            with cgutils.for_range(b, r1_v, start=r0_v) as rows:
                row = b.gep(base, [b.mul(rows.index, rb_v)])
                with cgutils.for_range(b, n_first) as gs:
                    group(row, rows.index, b.mul(gs.index, _i64(sizes[0])), sizes[0])
                b.store(done0, done_p)
                for g in sizes[1:]:
                    done = b.load(done_p)
                    with b.if_then(b.icmp_signed(">=", b.sub(m_v, done), _i64(g))):
                        group(row, rows.index, done, g)
                        b.store(b.add(done, _i64(g)), done_p)

        def body(fmt):
            if fmt.block_size == 1:
                float_rows(fmt)
                return
            with b.if_else(b.icmp_signed("==", passes_v, _i64(0))) as (flt, ints):
                with flt:
                    float_rows(fmt)
                with ints:
                    with b.if_else(b.icmp_signed("==", passes_v, _i64(1))) as (one, two):
                        with one:
                            with b.if_else(b.icmp_signed("==", m_v, _i64(1))) as (single, several):
                                with single:       # decode: the plain row loop
                                    int_rows(fmt, 1, (1,))
                                with several:
                                    int_rows(fmt, 1, _GROUPS)
                        with two:          # the rare accuracy mode: one vector at a time (less code to compile)
                            int_rows(fmt, 2, (1,))

        _per_format(b, kid_v, body, mask)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _decode_row(typingctx, kid, addr, rb, r, n_in, dst, doff, kinds):
    """dst.flat[doff : doff + n_in] = row r of W decoded (exactly, unless inside fastmath code)."""
    if not (all(_is_int(t) for t in (kid, addr, rb, r, n_in, doff)) and _is_f32(dst)):
        return None
    mask = _kinds(kinds)
    if mask is None:
        return None
    sig = types.void(types.int64, types.int64, types.int64, types.int64, types.int64, dst, types.int64, kinds)

    def codegen(context, builder, signature, args):
        kid_v, addr_v, rb_v, r_v, n_v, dst_v, off_v, _ = args
        src = builder.gep(builder.inttoptr(addr_v, _I8P), [builder.mul(r_v, rb_v)])
        dp = _data_ptr(context, builder, signature.args[5], dst_v, off_v)

        def body(fmt):
            n_steps, tail0 = _steps(builder, fmt, n_v)
            with cgutils.for_range(builder, n_steps) as loop:
                i = loop.index
                ys = _at(builder, dp, i, fmt.step)
                block = _at(builder, src, i, fmt.step_bytes)
                for j, pc in enumerate(fmt.emit(builder, block, fmt.step)):
                    q = builder.gep(ys, [_i64(LANES * j)])
                    builder.store(decode_piece(builder, pc), builder.bitcast(q, _V32F.as_pointer()),
                                  align=4)
            if fmt.block_size == 1:
                with cgutils.for_range(builder, n_v, start=tail0) as loop:
                    i = loop.index
                    elem = _at(builder, src, i, fmt.type_size)
                    w = _lane0(builder, decode_piece(builder, next(fmt.emit(builder, elem, 1))))
                    builder.store(w, builder.gep(dp, [i]))

        _per_format(builder, kid_v, body, mask)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# Matmul micro-kernel (register blocking as in BLAS: outer products, no horizontal sums)
# ---------------------------------------------------------------------------------------------

# The matmul micro-kernel's shape by the target's vector registers.  16 of 8 floats (AVX2; NEON's 32 of 4
# likewise): 6 weight rows x 16 activation rows = 12 accumulators of 8 lanes.  32 of 16 floats (AVX-512):
# 8 rows x 32 activation rows = 16 accumulators of 16 lanes, 2 activation loads and 8 broadcasts per 16 FMAs
# (2-core Intel VM, Q4_K prefill matmul per core: 95 -> 110-140 GFLOP/s; NumPy's SGEMM 160).  Each element
# of C sums its k terms in the same order whatever the shape, so the results are the same bits.
# Attention's blockwise prefill (arch/attention.py) keeps the 6 x 16 shape its buffers are laid out for.
_MR, _NR, _MW = (8, 32, 16) if _formats._target_has("+avx512f") else (6, 16, _VW)
_KC = 128  # at most this many k per register pass (passes of equal length), see _micro_tile
# k per decoded weight tile: longer rows are decoded and applied a k-range at a time, so a tile holds 24
# rows, not 6, and the activation panels' slice for that range (4 MiB at 512 tokens) stays in cache while
# the tiles pass (rows of 8192, the down projection, ran at ~60% of SGEMM's speed).  A multiple of every
# block size.
_KW = 2048


def _micro_tile_for(MR: int, NR: int, MW: int):
    """The micro-kernel intrinsic for MR weight rows x NR activation rows in <MW x float> accumulators."""
    VMF = ir.VectorType(_F32, MW)

    @intrinsic
    def micro_tile(typingctx, W, row0, rv, XT, poff, k0, k1, C, coff, first):
        """C[coff + i*NR + j] (+)= sum_{k0 <= k < k1} W[row0+i, k] * XT[poff + NR*k + j], i < MR, j < NR
        (= when `first`, else +=).

        W: decoded weight rows (row-major); XT: activations packed k-major in panels of NR rows.
        Per k: NR / MW vector loads + MR broadcasts feed MR * NR / MW FMAs.  Rows i >= rv repeat row rv-1
        (the caller ignores them).  6 x 16 in 8 lanes: 15 vector registers on AVX2, 29 of 32 on NEON;
        8 x 32 in 16 lanes: 19 of AVX-512's 32.

        The caller runs k in passes of <= _KC (outside the loop over row groups, so a pass's slice of
        the panel stays in L1) and the pass sums are added in C: one FMA chain over all of n_in carried
        ~5x the rounding error of the matvec kernel (rms 5e-8 vs 1e-8 relative to |W|.|x|, max 2.5e-6
        vs 1.2e-7 on the models' tensors); passes of <= 128 give rms 2.0e-8, max 3.4e-7, so decode
        (matvec) and prefill (matmul) agree more closely.
        """
        if not (_is_f32(W, 2) and _is_int(row0) and _is_int(rv) and _is_f32(XT, 1) and _is_int(poff)
                and _is_int(k0) and _is_int(k1) and _is_f32(C, 1) and _is_int(coff)
                and isinstance(first, types.Boolean)):
            return None
        sig = types.void(W, types.int64, types.int64, XT, types.int64, types.int64, types.int64, C,
                         types.int64, types.boolean)

        def codegen(context, builder, signature, args):
            W_v, row0_v, rv_v, XT_v, poff_v, k0_v, k1_v, C_v, coff_v, first_v = args
            wa = context.make_array(signature.args[0])(context, builder, value=W_v)
            row_stride = cgutils.unpack_tuple(builder, wa.strides, 2)[0]
            wbytes = builder.bitcast(wa.data, _I8P)
            xp0 = _data_ptr(context, builder, signature.args[3], XT_v, poff_v)
            cp = _data_ptr(context, builder, signature.args[7], C_v, coff_v)
            last = builder.sub(builder.add(row0_v, rv_v), _i64(1))
            rows = []
            for i in range(MR):
                r = builder.add(row0_v, _i64(i))
                r = builder.select(builder.icmp_signed("<", r, last), r, last)
                row = builder.gep(wbytes, [builder.mul(r, row_stride)])
                rows.append(builder.bitcast(row, _F32.as_pointer()))
            zero = ir.Constant(VMF, [0.0] * MW)

            pre = builder.block
            loop = builder.append_basic_block("micro.loop")
            done = builder.append_basic_block("micro.done")
            builder.branch(loop)  # k0 < k1 always
            builder.position_at_end(loop)
            k = builder.phi(_I64)
            acc = [[builder.phi(VMF) for _ in range(NR // MW)] for _ in range(MR)]
            xk = builder.gep(xp0, [builder.mul(k, _i64(NR))])
            xv = [_vload(builder, xk, MW * j, VMF) for j in range(NR // MW)]
            new = []
            for i in range(MR):
                w = splat(builder, builder.load(builder.gep(rows[i], [k])), MW)
                new.append([builder.fadd(acc[i][j], builder.fmul(w, xv[j])) for j in range(NR // MW)])
            k_next = builder.add(k, _i64(1))
            builder.cbranch(builder.icmp_signed("<", k_next, k1_v), loop, done)
            k.add_incoming(k0_v, pre)
            k.add_incoming(k_next, loop)
            for i in range(MR):
                for j in range(NR // MW):
                    acc[i][j].add_incoming(zero, pre)
                    acc[i][j].add_incoming(new[i][j], loop)

            builder.position_at_end(done)
            for i in range(MR):
                for j in range(NR // MW):
                    q = builder.bitcast(builder.gep(cp, [_i64(i * NR + j * MW)]), VMF.as_pointer())
                    old = builder.select(first_v, zero, builder.load(q, align=4))
                    builder.store(builder.fadd(old, new[i][j]), q, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return micro_tile


_micro_tile = _micro_tile_for(6, 16, _VW)          # attention's shape (see above)
_matmul_tile = _micro_tile_for(_MR, _NR, _MW)     # the target's shape


def _transpose8(b, rows):
    """8 x <8 x float> rows -> 8 columns (AVX: unpcklps/unpckhps, shufps, vperm2f128)."""
    def sh(a, c, mask):
        return b.shuffle_vector(a, c, ir.Constant(ir.VectorType(_I32, 8), mask))
    t = []
    for i in range(0, 8, 2):
        t += [sh(rows[i], rows[i + 1], [0, 8, 1, 9, 4, 12, 5, 13]),
              sh(rows[i], rows[i + 1], [2, 10, 3, 11, 6, 14, 7, 15])]
    s = []
    for i in (0, 4):
        for a, c in ((t[i], t[i + 2]), (t[i + 1], t[i + 3])):
            s += [sh(a, c, [0, 1, 8, 9, 4, 5, 12, 13]), sh(a, c, [2, 3, 10, 11, 6, 7, 14, 15])]
    # s[0..3]: columns 0..3 of rows 0-3 (low halves) / 4..7 (high halves); s[4..7]: rows 4-7
    lo, hi = [0, 1, 2, 3, 8, 9, 10, 11], [4, 5, 6, 7, 12, 13, 14, 15]
    return [sh(s[k], s[k + 4], lo) for k in range(4)] + [sh(s[k], s[k + 4], hi) for k in range(4)]


def _pack_panel_for(NR: int):
    """The intrinsic packing NR activation rows (a multiple of 8) into a k-major panel."""

    @intrinsic
    def pack_panel(typingctx, X, row0, mv, XT, base, n8):
        """XT[base + NR*k + j] = X[row0 + j, k] for k < 8 * n8, j < NR (0 for j >= mv): a panel of
        activation rows, k-major, transposed 8 x 8 in registers."""
        if not (_is_f32(X, 2) and _is_int(row0) and _is_int(mv) and _is_f32(XT, 1) and _is_int(base)
                and _is_int(n8)):
            return None
        sig = types.void(X, types.int64, types.int64, XT, types.int64, types.int64)

        def codegen(context, builder, signature, args):
            X_v, row0_v, mv_v, XT_v, base_v, n8_v = args
            xa = context.make_array(signature.args[0])(context, builder, value=X_v)
            row_stride = cgutils.unpack_tuple(builder, xa.strides, 2)[0]
            xbytes = builder.bitcast(xa.data, _I8P)
            last = builder.sub(mv_v, _i64(1))
            rowp = []
            for j in range(NR):  # rows past mv read row mv-1 and are zeroed below
                jj = builder.select(builder.icmp_signed("<", _i64(j), mv_v), _i64(j), last)
                rp = builder.gep(xbytes, [builder.mul(builder.add(row0_v, jj), row_stride)])
                rowp.append(builder.bitcast(rp, _F32.as_pointer()))
            keep = [builder.icmp_signed("<", _i64(j), mv_v) for j in range(NR)]
            zero = ir.Constant(_V8F, [0.0] * _VW)
            out = _data_ptr(context, builder, signature.args[3], XT_v, base_v)
            with cgutils.for_range(builder, n8_v) as loop:
                k0 = builder.mul(loop.index, _i64(8))
                rows = [builder.select(keep[j], _vload(builder, builder.gep(rowp[j], [k0]), 0), zero)
                        for j in range(NR)]
                cols = [_transpose8(builder, rows[8 * h:8 * h + 8]) for h in range(NR // 8)]
                dst = builder.gep(out, [builder.mul(k0, _i64(NR))])
                for k in range(8):
                    for h in range(NR // 8):
                        q = builder.gep(dst, [_i64(k * NR + h * _VW)])
                        builder.store(cols[h][k], builder.bitcast(q, _V8F.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return pack_panel


_pack_panel = _pack_panel_for(16)                 # attention's panels
_matmul_panel = _pack_panel_for(_NR)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@njit(cache=True, fastmath=_FASTMATH)
def _quantize_x(x, npc, passes, xq, xsc):
    """x (npc blocks of 32) in fixed point: xsc[g] = S = max|x| / 32767 and, per element, X1 = rint(x / S)
    and (passes 2) X2 = rint((x - S * X1) * 2^15 / S), so x = S * (X1 + X2 / 2^15) to within S * 2^-16
    (~max|x| * 2^-31, below float32's own rounding of x) plus the float32 rounding of the residual.
    A block holding NaN or inf gets a NaN scale, so the dot products come out NaN as the float path's do."""
    q_max = np.float32(_XQ_MAX)
    for g in range(npc):
        m = np.float32(0.0)
        for l in range(32):
            v = abs(x[32 * g + l])
            if v > m or v != v:   # a NaN, once taken, stays (nothing compares greater)
                m = v
        base = passes * 32 * g
        if not m < np.float32(np.inf) or m == np.float32(0.0):
            xsc[g] = np.float32(np.nan) if not m < np.float32(np.inf) else np.float32(0.0)
            for l in range(passes * 32):
                xq[base + l] = 0
            continue
        s = m / q_max
        inv = q_max / m
        xsc[g] = s
        for l in range(32):
            v = x[32 * g + l]
            hi = min(q_max, max(-q_max, np.rint(v * inv)))
            xq[base + l] = np.int16(hi)
            if passes > 1:
                r = v - hi * s
                lo = min(q_max, max(-q_max, np.rint(r * inv * np.float32(32768.0))))
                xq[base + 32 + l] = np.int16(lo)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _prepare_x(x, npc, passes, xs8, xbs, xq, xsc):
    """What the matvec kernels need of x: xs8 (sums of 4 neighbours, 8 lanes per 32 elements), xbs (sums
    per 32 elements) and, for the integer dot, xq / xsc (see _quantize_x)."""
    for g in range(npc):
        for lane in range(8):
            b = 32 * g + 4 * lane
            xs8[8 * g + lane] = (x[b] + x[b + 1]) + (x[b + 2] + x[b + 3])
    for g in range(npc):
        xbs[g] = ((xs8[8 * g] + xs8[8 * g + 1]) + (xs8[8 * g + 2] + xs8[8 * g + 3])) + \
            ((xs8[8 * g + 4] + xs8[8 * g + 5]) + (xs8[8 * g + 6] + xs8[8 * g + 7]))
    if passes:
        _quantize_x(x, npc, passes, xq, xsc)


def _kernel_sources_fingerprint() -> str:
    """A hash of the sources the kernels' IR comes from (the format table, the lattice lookups, and this
    module's intrinsics, which other modules' kernels inline: numba's disk cache watches only the file a
    kernel is defined in)."""
    h = hashlib.sha256()
    try:
        for path in (_formats.__file__, _grids.__file__, __file__):
            with open(path, "rb") as f:
                h.update(f.read())
    except OSError:  # no readable source (frozen / zipped install): nothing to go stale against
        return "no-source"
    return h.hexdigest()


def _build(fingerprint: str, kinds: int) -> SimpleNamespace:
    # Kernels must not call other closures (a dispatcher in a closure cell defeats numba's cache),
    # so each kernel expands the per-type intrinsics itself.  `kinds` (the type mask) is a closure
    # constant: numba types it as a literal, which the intrinsics read, and it is part of the cache key.

    @njit(cache=True, parallel=True, fastmath=_FASTMATH)
    def matvec_kernel(plan, n_in, X, Y, nchunks, parallel, passes):
        """Y segment j (M, n_out_j), at Y[M * row0_j:], = X @ W_j.T for one row of activations (decode) or a
        few (M <= BATCH_ROWS), every matrix of the plan in one parallel region.  Each row's result is the same
        bits whatever M is (see _mv_rows), and every weight row is read once for all of them.
        passes 0: the float dot; 1 or 2: the integer dot with x in `passes` int16 codes per element."""
        fingerprint  # noqa: B018
        M = X.shape[0]
        npc = n_in // 32
        xs8 = np.empty(M * npc * 8, np.float32)
        xbs = np.empty(M * npc, np.float32)
        nq = max(passes, 1) * npc * 32
        xq = np.empty(M * nq, np.int16)
        xsc = np.empty(M * npc, np.float32)
        for m in range(M):
            _prepare_x(X[m], npc, passes, xs8[m * npc * 8:(m + 1) * npc * 8], xbs[m * npc:(m + 1) * npc],
                       xq[m * nq:(m + 1) * nq], xsc[m * npc:(m + 1) * npc])
        x = X.reshape(M * n_in)
        nmat = plan.shape[0]
        if not parallel:
            for j in range(nmat):
                _mv_rows(plan[j, 2], plan[j, 0], plan[j, 1], 0, plan[j, 3], n_in, M, x, xs8, xbs, xq, xsc,
                               passes, Y, M * plan[j, 4], plan[j, 3], kinds)
            return
        total = plan[nmat - 1, 5] + plan[nmat - 1, 3] * plan[nmat - 1, 1]
        for t in prange(nchunks):
            lo = total * t // nchunks
            hi = total * (t + 1) // nchunks
            for j in range(nmat):
                rb, b0 = plan[j, 1], plan[j, 5]
                r0 = min(plan[j, 3], max(0, (lo - b0 + rb - 1) // rb))
                r1 = min(plan[j, 3], max(0, (hi - b0 + rb - 1) // rb))
                if r0 < r1:
                    _mv_rows(plan[j, 2], plan[j, 0], rb, r0, r1, n_in, M, x, xs8, xbs, xq, xsc, passes, Y,
                                   M * plan[j, 4], plan[j, 3], kinds)

    @njit(cache=True, parallel=True, fastmath=_FASTMATH)
    def matmul_kernel(plan, n_in, X, Y, nthreads, tile_rows):
        """Y segment j (M, n_out_j), at Y[M * row0_j:], = X @ W_j.T for every matrix of the plan."""
        fingerprint  # noqa: B018
        M = X.shape[0]
        # 1. X -> XT: panels of _NR activation rows, k-major, zero padded (once per call)
        n_panels = (M + _NR - 1) // _NR
        XT = np.empty(n_panels * n_in * _NR, np.float32)
        n8 = n_in // 8
        for p in prange(n_panels):
            base = p * n_in * _NR
            mv = min(_NR, M - p * _NR)
            _matmul_panel(X, p * _NR, mv, XT, base, n8)
            for k in range(n8 * 8, n_in):
                for j in range(_NR):
                    XT[base + k * _NR + j] = X[p * _NR + j, k] if j < mv else np.float32(0.0)
        # 2. the rows of all matrices, split evenly across threads; each thread decodes tiles of weight
        #    rows once and applies them to every panel, one k-range of at most _KW at a time (outermost,
        #    so that range of the panels stays in cache while all the thread's tiles pass; partial sums
        #    of later ranges are added into Y)
        nmat = plan.shape[0]
        total = plan[nmat - 1, 4] + plan[nmat - 1, 3]
        kw = min(n_in, _KW)
        n_pass = (kw + _KC - 1) // _KC
        kc = (kw + n_pass - 1) // n_pass
        for t in prange(nthreads):
            W = np.empty((tile_rows, kw), np.float32)
            C = np.empty((tile_rows + _MR) * _NR, np.float32)
            lo = total * t // nthreads
            hi = total * (t + 1) // nthreads
            for kb in range(0, n_in, kw):
                ke = min(n_in, kb + kw)
                for jm in range(nmat):
                    kid, addr, rb, n_out, row0 = plan[jm, 2], plan[jm, 0], plan[jm, 1], plan[jm, 3], plan[jm, 4]
                    seg = M * row0
                    kaddr = addr + kb // plan[jm, 6] * plan[jm, 7]   # kb: a multiple of every block size
                    for r0 in range(max(0, lo - row0), min(n_out, hi - row0), tile_rows):
                        rn = min(tile_rows, min(n_out, hi - row0) - r0)
                        for i in range(rn):
                            _decode_row(kid, kaddr, rb, r0 + i, ke - kb, W, i * kw, kinds)
                        for p in range(n_panels):
                            mv = min(_NR, M - p * _NR)
                            for k0 in range(kb, ke, kc):
                                for g in range(0, rn, _MR):
                                    _matmul_tile(W, g, min(_MR, rn - g), XT, p * n_in * _NR + kb * _NR, k0 - kb,
                                                min(ke, k0 + kc) - kb, C, g * _NR, k0 == kb)
                            for jj in range(mv):
                                o = seg + (p * _NR + jj) * n_out + r0
                                if kb == 0:
                                    for i in range(rn):
                                        Y[o + i] = C[i * _NR + jj]
                                else:
                                    for i in range(rn):
                                        Y[o + i] += C[i * _NR + jj]

    @njit(cache=True, parallel=True)
    def rows_kernel(kid, addr, rb, n_in, ids, out, parallel):
        fingerprint  # noqa: B018
        if not parallel:
            for i in range(ids.shape[0]):
                _decode_row(kid, addr, rb, ids[i], n_in, out, i * n_in, kinds)
            return
        for i in prange(ids.shape[0]):
            _decode_row(kid, addr, rb, ids[i], n_in, out, i * n_in, kinds)

    return SimpleNamespace(matvec=matvec_kernel, matmul=matmul_kernel, rows=rows_kernel)


_FINGERPRINT = _kernel_sources_fingerprint()
_KERNELS: dict[int, SimpleNamespace] = {}


def _kernels(kinds: int) -> SimpleNamespace:
    """The kernels compiled for the type mask `kinds` (built on first use; numba compiles, or loads
    from its disk cache, at the first call)."""
    k = _KERNELS.get(kinds)
    if k is None:
        k = _KERNELS[kinds] = _build(_FINGERPRINT, kinds)
    return k


# ---------------------------------------------------------------------------------------------
# Python entry points: validate cheaply, then exactly one numba call
# ---------------------------------------------------------------------------------------------

def _weights(raw: np.ndarray, ggml_type: int, n_rows: int | None,
             n_in: int) -> tuple[np.ndarray, QuantFormat]:
    """Check the (rows, row_bytes) uint8 view of a weight matrix."""
    fmt, rb = format_for(ggml_type), row_bytes(ggml_type, n_in)
    if (not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.ndim != 2
            or raw.shape[1] != rb or raw.strides[1] != 1):
        raise ValueError(f"weights must be a uint8 (rows, {rb}) array with contiguous rows, "
                         f"got {getattr(raw, 'dtype', type(raw))} {getattr(raw, 'shape', '')} "
                         f"strides {getattr(raw, 'strides', '')}")
    if n_rows is not None and raw.shape[0] != n_rows:
        raise ValueError(f"weights have {raw.shape[0]} rows, expected {n_rows}")
    return raw, fmt


def _addr(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _with_types(kinds: int, plan: np.ndarray) -> int:
    """`kinds` plus every type of the plan (a kernel must hold a case for each type it is given)."""
    for t in plan[:, _P_KID]:
        kinds |= 1 << int(t)
    return kinds


def _plan(weights, n_in: int) -> tuple[np.ndarray, list, tuple[int, ...]]:
    """(plan rows, arrays to keep alive, n_outs) for a sequence of (raw, ggml_type, n_out)."""
    rows, keep, n_outs, row0, byte0 = [], [], [], 0, 0
    for w in weights:
        raw, ggml_type, n_out = (w.raw, w.ggml_type, w.n_out) if hasattr(w, "raw") else w
        raw, fmt = _weights(raw, ggml_type, n_out, n_in)
        rows.append((_addr(raw), raw.strides[0], fmt.ggml_type, n_out, row0, byte0, fmt.block_size, fmt.type_size))
        keep.append(raw)
        n_outs.append(n_out)
        row0 += n_out
        byte0 += n_out * raw.strides[0]
    if not rows:
        raise ValueError("no weight matrices given")
    return np.array(rows, dtype=np.int64), keep, tuple(n_outs)


# Plans of single matrices (matvec / matmul), keyed by the id of the weight array and the call's
# (type, n_out, n_in); a weak reference checks that the id still names the same array, and drops
# the entry when the array goes away.  Saves ~3 us per call (the address lookup alone costs 1.4).
_single_plans: dict = {}


def _single_plan(raw, ggml_type, n_out, n_in) -> tuple[np.ndarray, bool]:
    key = (id(raw), ggml_type, n_out, n_in)
    hit = _single_plans.get(key)
    if hit is not None and hit[0]() is raw:
        return hit[1], hit[2]
    plan, (raw,), _ = _plan([(raw, ggml_type, n_out)], n_in)
    parallel = _work(int(plan[0, _P_KID]), n_out * n_in) >= _PAR_MIN_WORK
    try:
        ref = weakref.ref(raw, lambda _r, k=key: _single_plans.pop(k, None))
    except TypeError:  # not weak-referenceable: no caching
        return plan, parallel
    if len(_single_plans) > 4096:
        _single_plans.clear()
    _single_plans[key] = (ref, plan, parallel)
    return plan, parallel


def _activations(a: np.ndarray, ndim: int, n_in: int) -> np.ndarray:
    if not (type(a) is np.ndarray and a.dtype is _F32D and a.flags.c_contiguous):
        a = np.ascontiguousarray(a, dtype=np.float32)
    if a.ndim != ndim or a.shape[-1] != n_in:
        raise ValueError(f"activations must have {ndim} dims and last dim {n_in}, got {a.shape}")
    return a


def _output(out, shape) -> np.ndarray:
    if out is None:
        return np.empty(shape, np.float32)
    if out.dtype != np.float32 or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
    return out


def _matmul_tile_rows(n_in: int) -> int:
    """Weight rows decoded per tile: a multiple of 6 holding ~192 KiB of float32 (stays in L2
    while every activation panel streams past it), rows of at most _KW."""
    return max(_MR, min(96, 49152 // min(n_in, _KW)) // _MR * _MR)


class FusedLinear:
    """Weight matrices that share one input, computed together in ONE parallel region.

        qkv = FusedLinear([layer.wq, layer.wk, layer.wv], n_in)   # Linear-like objects, or
        qkv = FusedLinear([(raw, ggml_type, n_out), ...], n_in)   # (uint8 view, type, rows) tuples
        q, k, v = qkv(h)            # h (T, n_in) float32 -> (T, n_out_j) float32 each, contiguous

    Types may differ between the matrices.  The weights are read in place (the mapped views; no
    copy is made).  The outputs are consecutive views of one buffer, `out` if given
    ((T * sum(n_out),) float32): segment j is out[T * row0_j : T * (row0_j + n_out_j)].
    T == 1 runs the matvec kernel, T > 1 the matmul kernel.
    """

    __slots__ = ("plan", "n_in", "n_outs", "n_total", "kinds", "_k", "_keep", "_bounds", "_parallel", "_work",
                 "_tile_rows")

    def __init__(self, weights: Sequence, n_in: int, kinds: int = 0):
        self.plan, self._keep, self.n_outs = _plan(weights, n_in)
        self.kinds = _with_types(kinds, self.plan)
        self._k = _kernels(self.kinds)
        self.n_in = int(n_in)
        self.n_total = int(sum(self.n_outs))
        ends = np.cumsum(self.n_outs)
        self._bounds = tuple(zip((0,) + tuple(int(e) for e in ends[:-1]), (int(e) for e in ends)))
        self._work = sum(_work(int(r[_P_KID]), int(r[_P_NOUT]) * self.n_in) for r in self.plan)
        self._parallel = self._work >= _PAR_MIN_WORK
        self._tile_rows = _matmul_tile_rows(self.n_in)

    def _out(self, m: int, out):
        n = m * self.n_total
        if out is None:
            return np.empty(n, np.float32)
        if out.dtype != np.float32 or out.shape != (n,) or not out.flags.c_contiguous:
            raise ValueError(f"out must be a C-contiguous float32 array of shape ({n},)")
        return out

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """x (n_in,) -> (W_j @ x for each matrix j): a tuple of (n_out_j,) arrays."""
        if not (type(x) is np.ndarray and x.dtype is _F32D and x.shape == (self.n_in,)
                and x.flags.c_contiguous):
            x = _activations(x, 1, self.n_in)
        y = self._out(1, out)
        self._k.matvec(self.plan, self.n_in, x.reshape(1, self.n_in), y, _NCHUNKS, self._parallel, _PASSES[0])
        return tuple([y[a:b] for a, b in self._bounds])

    def matmul(self, X: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
        """X (M, n_in) -> (X @ W_j.T for each matrix j): a tuple of (M, n_out_j) arrays."""
        if not (type(X) is np.ndarray and X.dtype is _F32D and X.ndim == 2
                and X.shape[1] == self.n_in and X.flags.c_contiguous):
            X = _activations(X, 2, self.n_in)
        m = X.shape[0]
        y = self._out(m, out)
        if m <= BATCH_ROWS:   # decode, a draft to verify, a step of several sequences: matvecs sharing the reads
            self._k.matvec(self.plan, self.n_in, X, y, _NCHUNKS, m * self._work >= _PAR_MIN_WORK, _PASSES[0])
        else:
            self._k.matmul(self.plan, self.n_in, X, y, _NCHUNKS, self._tile_rows)
        return tuple([y[m * a:m * b].reshape(m, b - a) for a, b in self._bounds])

    __call__ = matmul


def matvec_multi(weights: Sequence, n_in: int, x: np.ndarray,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(W_j @ x for each (raw, ggml_type, n_out) in weights) in one parallel region; see
    FusedLinear (build one once to skip re-validating the weights on every call)."""
    return FusedLinear(weights, n_in).matvec(x, out)


def matmul_multi(weights: Sequence, n_in: int, X: np.ndarray,
                 out: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """(X @ W_j.T for each (raw, ggml_type, n_out) in weights) in one parallel region."""
    return FusedLinear(weights, n_in).matmul(X, out)


def matvec(raw: np.ndarray, ggml_type: int, n_out: int, n_in: int, x: np.ndarray,
           out: np.ndarray | None = None, kinds: int = 0) -> np.ndarray:
    """y = W @ x for W given as its quantized (n_out, row_bytes) uint8 view; y is (n_out,) float32.
    kinds: other types to compile into the same kernel (see `kinds_mask`; a model passes all of its own)."""
    plan, parallel = _single_plan(raw, ggml_type, n_out, n_in)
    x = _activations(x, 1, n_in)
    out = _output(out, (n_out,))
    _kernels(kinds | 1 << int(plan[0, _P_KID])).matvec(plan, n_in, x.reshape(1, n_in), out, _NCHUNKS, parallel,
                                                       _PASSES[0])
    return out


def matmul(raw: np.ndarray, ggml_type: int, n_out: int, n_in: int, X: np.ndarray,
           out: np.ndarray | None = None, kinds: int = 0) -> np.ndarray:
    """Y = X @ W.T for a batch X (M, n_in) float32; Y is (M, n_out) float32."""
    plan, _ = _single_plan(raw, ggml_type, n_out, n_in)
    X = _activations(X, 2, n_in)
    m = X.shape[0]
    out = _output(out, (m, n_out))
    k = _kernels(kinds | 1 << int(plan[0, _P_KID]))
    if m <= BATCH_ROWS:
        k.matvec(plan, n_in, X, out.reshape(-1), _NCHUNKS, _work(int(plan[0, _P_KID]), m * n_out * n_in) >= _PAR_MIN_WORK,
                 _PASSES[0])
    else:
        k.matmul(plan, n_in, X, out.reshape(-1), _NCHUNKS, _matmul_tile_rows(n_in))
    return out


def get_rows(raw: np.ndarray, ggml_type: int, n_in: int, ids,
             out: np.ndarray | None = None, kinds: int = 0) -> np.ndarray:
    """Rows `ids` of W decoded to float32 (len(ids), n_in), bit-exact: an embedding lookup."""
    raw, fmt = _weights(raw, ggml_type, None, n_in)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= raw.shape[0]):
        raise IndexError(f"row ids must be in [0, {raw.shape[0]}), got {ids.min()}..{ids.max()}")
    out = _output(out, (ids.size, n_in))
    _kernels(kinds | 1 << fmt.ggml_type).rows(fmt.ggml_type, _addr(raw), raw.strides[0], n_in, ids, out.reshape(-1),
                                              out.nbytes >= _PAR_MIN_ROWS_BYTES)
    return out
