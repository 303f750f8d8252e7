"""Numba kernels over quantized weights: matvec (decode), matmul (prefill), get_rows (embeddings).

Precision policy: activations stay float32.  Each weight block is decoded to float32 in vector
registers (the arithmetic of `formats.dequantize`) and multiplied with the float32 activations,
accumulating in float32.  No int8 activation path here (it flips answers on small models).

Structure
  * Two LLVM intrinsics do the per-type work, generated from `formats.FORMATS`:
      _dot_row(kid, raw, r, n_in, x) -> float32      row r of W dotted with x
      _decode_row(kid, raw, r, n_in, dst, off)       row r of W written to dst.flat[off : off+n_in]
    Each emits one `switch` on the ggml type id with one vectorised loop per type, so every kernel
    compiles once (not once per type) and the switch costs one branch per row.  The vector IR is
    target independent (AVX2, AVX-512, NEON: LLVM picks the instructions).
  * matmul decodes a tile of weight rows once and runs a 6x16 register-blocked micro-kernel
    (`_micro_tile`, outer products as in BLAS) over all activation rows.
  * The numba kernels live inside `_build()`, a closure over a fingerprint of formats.py: numba's
    on-disk cache only watches this file, and the closure value is part of its cache key, so
    editing an emitter in formats.py recompiles instead of silently reusing stale machine code.
  * Faster per-type paths (int8 dots, repacked weights) can replace a `case` of the switch; the
    format table stays the one place that knows the types.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from edgelm.quant import formats as _formats
from edgelm.quant.formats import FORMATS, LANES, QuantFormat, format_for, row_bytes, splat

__all__ = ["matvec", "matmul", "get_rows"]

_I64, _F32 = ir.IntType(64), ir.FloatType()
_V32F = ir.VectorType(_F32, LANES)
# Fast-math flags of the products: w*x + acc may become one FMA.  (Numba's fastmath=True adds
# "fast" to every flag-less float op of a kernel, i.e. to the dequant arithmetic inside matvec /
# matmul; the decode-only kernel behind get_rows / dequantize is strict, hence bit-exact.)
_FMA_OK = ("contract",)

# Below these sizes a kernel runs on the calling thread: a parallel launch costs tens of us.
_PAR_MIN_BYTES = 96 * 1024      # weight bytes read by one matvec
_PAR_MIN_ROWS_BYTES = 64 * 1024  # float32 bytes written by get_rows / dequantize
# Work is split into this many chunks (numba.get_num_threads() costs ~2 us per call; if a caller
# lowers the thread count with numba.set_num_threads, the chunks just share fewer threads).
_NCHUNKS = numba.config.NUMBA_NUM_THREADS


# ---------------------------------------------------------------------------------------------
# Intrinsics
# ---------------------------------------------------------------------------------------------

def _row_ptr(context, builder, raw_ty, raw, r):
    ary = context.make_array(raw_ty)(context, builder, value=raw)
    stride0 = cgutils.unpack_tuple(builder, ary.strides, 2)[0]
    return builder.gep(ary.data, [builder.mul(r, stride0)])


def _data_ptr(context, builder, ty, val, offset=None):
    ptr = context.make_array(ty)(context, builder, value=val).data
    return builder.gep(ptr, [offset]) if offset is not None else ptr


def _per_format(builder, kid, body):
    """switch (kid) { case t: body(FORMATS[t]) ... }; unknown ids fall through (callers validate)."""
    merge = builder.append_basic_block("quant.merge")
    sw = builder.switch(kid, merge)
    for t, fmt in sorted(FORMATS.items()):
        bb = builder.append_basic_block(f"quant.{fmt.name}")
        sw.add_case(ir.Constant(_I64, t), bb)
        builder.position_at_end(bb)
        body(fmt)
        builder.branch(merge)
    builder.position_at_end(merge)


def _at(builder, ptr, index, scale):
    """&ptr[index * scale] (element units of ptr's type)."""
    return builder.gep(ptr, [builder.mul(index, ir.Constant(_I64, scale))])


def _lane0(builder, vec):
    return builder.extract_element(vec, ir.Constant(ir.IntType(32), 0))


def _steps(builder, fmt, n_in):
    """(number of whole emitter steps in a row, element index where the scalar tail starts)."""
    n_steps = builder.sdiv(n_in, ir.Constant(_I64, fmt.step))
    return n_steps, builder.mul(n_steps, ir.Constant(_I64, fmt.step))


def _is_int(t):
    return isinstance(t, types.Integer)


def _is_raw(t):
    return isinstance(t, types.Array) and t.dtype == types.uint8 and t.ndim == 2


def _is_f32(t, ndim=None):
    return (isinstance(t, types.Array) and t.dtype == types.float32 and t.layout == "C"
            and (ndim is None or t.ndim == ndim))


@intrinsic
def _dot_row(typingctx, kid, raw, r, n_in, x):
    if not (_is_int(kid) and _is_raw(raw) and _is_int(r) and _is_int(n_in) and _is_f32(x, 1)):
        return None
    sig = types.float32(types.int64, raw, types.int64, types.int64, x)

    def codegen(context, builder, signature, args):
        kid_v, raw_v, r_v, n_v, x_v = args
        src = _row_ptr(context, builder, signature.args[1], raw_v, r_v)
        xp = _data_ptr(context, builder, signature.args[4], x_v)
        acc_p = cgutils.alloca_once_value(builder, ir.Constant(_V32F, [0.0] * LANES))
        tail_p = cgutils.alloca_once_value(builder, ir.Constant(_F32, 0.0))

        def body(fmt):
            n_steps, tail0 = _steps(builder, fmt, n_v)
            with cgutils.for_range(builder, n_steps) as loop:
                i = loop.index
                xs = _at(builder, xp, i, fmt.step)
                acc = builder.load(acc_p)
                block = _at(builder, src, i, fmt.step_bytes)
                for j, w in enumerate(fmt.emit(builder, block, fmt.step, _FMA_OK)):
                    xq = builder.gep(xs, [ir.Constant(_I64, LANES * j)])
                    xv = builder.load(builder.bitcast(xq, _V32F.as_pointer()), align=4)
                    acc = builder.fadd(acc, builder.fmul(w, xv, flags=_FMA_OK), flags=_FMA_OK)
                builder.store(acc, acc_p)
            if fmt.block_size == 1:  # plain float rows: n_in need not be a multiple of 32
                with cgutils.for_range(builder, n_v, start=tail0) as loop:
                    i = loop.index
                    elem = _at(builder, src, i, fmt.type_size)
                    w = _lane0(builder, next(fmt.emit(builder, elem, 1, _FMA_OK)))
                    wx = builder.fmul(w, builder.load(builder.gep(xp, [i])), flags=_FMA_OK)
                    builder.store(builder.fadd(builder.load(tail_p), wx, flags=_FMA_OK), tail_p)

        _per_format(builder, kid_v, body)
        # pairwise tree over the 32 lanes (explicit, so no reassociation flag is needed)
        v, n = builder.load(acc_p), LANES
        while n > 1:
            n //= 2
            half = lambda lanes: ir.Constant(ir.VectorType(ir.IntType(32), n), lanes)  # noqa: E731
            v = builder.fadd(builder.shuffle_vector(v, v, half(list(range(n)))),
                             builder.shuffle_vector(v, v, half(list(range(n, 2 * n)))))
        return builder.fadd(_lane0(builder, v), builder.load(tail_p))

    return sig, codegen


@intrinsic
def _decode_row(typingctx, kid, raw, r, n_in, dst, doff):
    if not (_is_int(kid) and _is_raw(raw) and _is_int(r) and _is_int(n_in) and _is_f32(dst)
            and _is_int(doff)):
        return None
    sig = types.void(types.int64, raw, types.int64, types.int64, dst, types.int64)

    def codegen(context, builder, signature, args):
        kid_v, raw_v, r_v, n_v, dst_v, off_v = args
        src = _row_ptr(context, builder, signature.args[1], raw_v, r_v)
        dp = _data_ptr(context, builder, signature.args[4], dst_v, off_v)

        def body(fmt):
            n_steps, tail0 = _steps(builder, fmt, n_v)
            with cgutils.for_range(builder, n_steps) as loop:
                i = loop.index
                ys = _at(builder, dp, i, fmt.step)
                block = _at(builder, src, i, fmt.step_bytes)
                for j, w in enumerate(fmt.emit(builder, block, fmt.step, ())):
                    q = builder.gep(ys, [ir.Constant(_I64, LANES * j)])
                    builder.store(w, builder.bitcast(q, _V32F.as_pointer()), align=4)
            if fmt.block_size == 1:
                with cgutils.for_range(builder, n_v, start=tail0) as loop:
                    i = loop.index
                    elem = _at(builder, src, i, fmt.type_size)
                    w = _lane0(builder, next(fmt.emit(builder, elem, 1, ())))
                    builder.store(w, builder.gep(dp, [i]))

        _per_format(builder, kid_v, body)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# Matmul micro-kernel (register blocking as in BLAS: outer products, no horizontal sums)
# ---------------------------------------------------------------------------------------------

_MR, _NR, _VW = 6, 16, 8  # 6 weight rows x 16 activation rows = 12 accumulators of 8 lanes
_V8F = ir.VectorType(_F32, _VW)


@intrinsic
def _micro_tile(typingctx, W, row0, rv, XT, poff, n_in, C):
    """C[i*16 + j] = sum_k W[row0+i, k] * XT[poff + 16k + j] for i < 6, j < 16.

    W: decoded weight rows (row-major); XT: activations packed k-major in panels of 16 rows.
    Per k: 2 vector loads + 6 broadcasts feed 12 FMAs.  Rows i >= rv repeat row rv-1 (the caller
    ignores them).  15 vector registers on AVX2, 29 of 32 on NEON.
    """
    if not (_is_f32(W, 2) and _is_int(row0) and _is_int(rv) and _is_f32(XT, 1) and _is_int(poff)
            and _is_int(n_in) and _is_f32(C, 1)):
        return None
    sig = types.void(W, types.int64, types.int64, XT, types.int64, types.int64, C)

    def codegen(context, builder, signature, args):
        W_v, row0_v, rv_v, XT_v, poff_v, n_v, C_v = args
        i64 = lambda v: ir.Constant(_I64, v)  # noqa: E731
        wa = context.make_array(signature.args[0])(context, builder, value=W_v)
        row_stride = cgutils.unpack_tuple(builder, wa.strides, 2)[0]
        wbytes = builder.bitcast(wa.data, ir.IntType(8).as_pointer())
        xp0 = _data_ptr(context, builder, signature.args[3], XT_v, poff_v)
        cp = _data_ptr(context, builder, signature.args[6], C_v)
        last = builder.sub(builder.add(row0_v, rv_v), i64(1))
        rows = []
        for i in range(_MR):
            r = builder.add(row0_v, i64(i))
            r = builder.select(builder.icmp_signed("<", r, last), r, last)
            row = builder.gep(wbytes, [builder.mul(r, row_stride)])
            rows.append(builder.bitcast(row, _F32.as_pointer()))

        pre = builder.block
        loop, done = builder.append_basic_block("micro.loop"), builder.append_basic_block("micro.done")
        builder.branch(loop)  # n_in >= 1 always
        builder.position_at_end(loop)
        k = builder.phi(_I64)
        acc = [[builder.phi(_V8F) for _ in range(_NR // _VW)] for _ in range(_MR)]
        xk = builder.gep(xp0, [builder.mul(k, i64(_NR))])
        xv = [builder.load(builder.bitcast(builder.gep(xk, [i64(_VW * j)]), _V8F.as_pointer()),
                           align=4) for j in range(_NR // _VW)]
        new = []
        for i in range(_MR):
            w = splat(builder, builder.load(builder.gep(rows[i], [k])), _VW)
            new.append([builder.fadd(acc[i][j], builder.fmul(w, xv[j], flags=_FMA_OK), flags=_FMA_OK)
                        for j in range(_NR // _VW)])
        k_next = builder.add(k, i64(1))
        builder.cbranch(builder.icmp_signed("<", k_next, n_v), loop, done)
        k.add_incoming(i64(0), pre)
        k.add_incoming(k_next, loop)
        zero = ir.Constant(_V8F, [0.0] * _VW)
        for i in range(_MR):
            for j in range(_NR // _VW):
                acc[i][j].add_incoming(zero, pre)
                acc[i][j].add_incoming(new[i][j], loop)

        builder.position_at_end(done)
        for i in range(_MR):
            for j in range(_NR // _VW):
                q = builder.gep(cp, [i64(i * _NR + j * _VW)])
                builder.store(new[i][j], builder.bitcast(q, _V8F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

def _formats_fingerprint() -> str:
    try:
        with open(_formats.__file__, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:  # no readable source (frozen / zipped install): nothing to go stale against
        return "no-source"


def _build(fingerprint: str) -> SimpleNamespace:
    # Kernels must not call other closures (a dispatcher in a closure cell defeats numba's cache),
    # so each kernel expands the per-type intrinsic itself.

    @njit(cache=True, parallel=True, fastmath=True)
    def matvec_kernel(kid, raw, n_in, x, out, nthreads, parallel):
        fingerprint  # noqa: B018  (part of the cache key, see module docstring)
        n_out = out.shape[0]
        if not parallel:
            for r in range(n_out):
                out[r] = _dot_row(kid, raw, r, n_in, x)
            return
        per = (n_out + nthreads - 1) // nthreads
        for t in prange(nthreads):
            for r in range(t * per, min(n_out, (t + 1) * per)):
                out[r] = _dot_row(kid, raw, r, n_in, x)

    @njit(cache=True, parallel=True, fastmath=True)
    def matmul_kernel(kid, raw, n_in, X, Y, nthreads, tile_rows):
        fingerprint  # noqa: B018
        M, n_out = Y.shape
        # 1. X -> XT: panels of 16 activation rows, k-major, zero padded (once per call)
        n_panels = (M + _NR - 1) // _NR
        XT = np.empty(n_panels * n_in * _NR, np.float32)
        for p in prange(n_panels):
            base = p * n_in * _NR
            mv = min(_NR, M - p * _NR)
            for k in range(n_in):
                for j in range(_NR):
                    XT[base + k * _NR + j] = X[p * _NR + j, k] if j < mv else np.float32(0.0)
        # 2. each thread decodes tiles of weight rows once and applies them to every panel
        n_tiles = (n_out + tile_rows - 1) // tile_rows
        for t in prange(nthreads):
            W = np.empty((tile_rows, n_in), np.float32)
            C = np.empty(_MR * _NR, np.float32)
            for tile in range(t, n_tiles, nthreads):
                r0 = tile * tile_rows
                rn = min(tile_rows, n_out - r0)
                for i in range(rn):
                    _decode_row(kid, raw, r0 + i, n_in, W, i * n_in)
                for p in range(n_panels):
                    mv = min(_NR, M - p * _NR)
                    for g in range(0, rn, _MR):
                        rv = min(_MR, rn - g)
                        _micro_tile(W, g, rv, XT, p * n_in * _NR, n_in, C)
                        for i in range(rv):
                            for j in range(mv):
                                Y[p * _NR + j, r0 + g + i] = C[i * _NR + j]

    @njit(cache=True, parallel=True)
    def rows_kernel(kid, raw, n_in, ids, out, parallel):
        fingerprint  # noqa: B018
        if not parallel:
            for i in range(ids.shape[0]):
                _decode_row(kid, raw, ids[i], n_in, out, i * n_in)
            return
        for i in prange(ids.shape[0]):
            _decode_row(kid, raw, ids[i], n_in, out, i * n_in)

    return SimpleNamespace(matvec=matvec_kernel, matmul=matmul_kernel, rows=rows_kernel)


_K = _build(_formats_fingerprint())


# ---------------------------------------------------------------------------------------------
# Python entry points: validate cheaply, then exactly one numba call
# ---------------------------------------------------------------------------------------------

def _weights(raw: np.ndarray, ggml_type: int, n_rows: int | None,
             n_in: int) -> tuple[np.ndarray, QuantFormat]:
    """Check the (rows, row_bytes) uint8 view; hand numba one array type (read-only ndarray)."""
    fmt, rb = format_for(ggml_type), row_bytes(ggml_type, n_in)
    if type(raw) is not np.ndarray:  # np.memmap and friends
        raw = raw.view(np.ndarray)
    if raw.dtype != np.uint8 or raw.ndim != 2 or raw.shape[1] != rb or raw.strides[1] != 1:
        raise ValueError(f"weights must be a uint8 (rows, {rb}) array with contiguous rows, "
                         f"got {raw.dtype} {raw.shape} strides {raw.strides}")
    if n_rows is not None and raw.shape[0] != n_rows:
        raise ValueError(f"weights have {raw.shape[0]} rows, expected {n_rows}")
    if raw.flags.writeable:  # one compiled specialisation for mmapped (read-only) and owned data
        raw = raw.view()
        raw.flags.writeable = False
    return raw, fmt


def _activations(a: np.ndarray, ndim: int, n_in: int) -> np.ndarray:
    if a.dtype != np.float32 or not a.flags.c_contiguous:
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


def matvec(raw: np.ndarray, ggml_type: int, n_out: int, n_in: int, x: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """y = W @ x for W given as its quantized (n_out, row_bytes) uint8 view; y is (n_out,) float32."""
    raw, fmt = _weights(raw, ggml_type, n_out, n_in)
    x = _activations(x, 1, n_in)
    out = _output(out, (n_out,))
    _K.matvec(fmt.ggml_type, raw, n_in, x, out, _NCHUNKS, raw.nbytes >= _PAR_MIN_BYTES)
    return out


def _matmul_tile_rows(n_in: int, nthreads: int, n_out: int) -> int:
    """Weight rows decoded per tile: a multiple of 6 holding ~192 KiB of float32 (stays in L2
    while every activation panel streams past it), and small enough that all threads get work."""
    per_thread = -(-n_out // nthreads)
    return max(_MR, min(96, 49152 // n_in, -(-per_thread // _MR) * _MR) // _MR * _MR)


def matmul(raw: np.ndarray, ggml_type: int, n_out: int, n_in: int, X: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """Y = X @ W.T for a batch X (M, n_in) float32; Y is (M, n_out) float32."""
    raw, fmt = _weights(raw, ggml_type, n_out, n_in)
    X = _activations(X, 2, n_in)
    out = _output(out, (X.shape[0], n_out))
    _K.matmul(fmt.ggml_type, raw, n_in, X, out, _NCHUNKS, _matmul_tile_rows(n_in, _NCHUNKS, n_out))
    return out


def get_rows(raw: np.ndarray, ggml_type: int, n_in: int, ids,
             out: np.ndarray | None = None) -> np.ndarray:
    """Rows `ids` of W decoded to float32 (len(ids), n_in), bit-exact: an embedding lookup."""
    raw, fmt = _weights(raw, ggml_type, None, n_in)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= raw.shape[0]):
        raise IndexError(f"row ids must be in [0, {raw.shape[0]}), got {ids.min()}..{ids.max()}")
    out = _output(out, (ids.size, n_in))
    _K.rows(fmt.ggml_type, raw, n_in, ids, out, out.nbytes >= _PAR_MIN_ROWS_BYTES)
    return out
