"""Causal attention over the KV cache.

The per-layer caches of runtime/kv_cache.py (storage f32, f16, q8_0 or q4_0; full or ring) are read in place
by two Numba kernels (second half of this file): `attend_decode` for one query (tasks = kv head x chunk of
keys, each with its own softmax max/sum, combined at the end: flash-decoding) and `attend_prefill` for a
batch (tasks = kv head x block of queries walking K/V tiles with an online softmax: FlashAttention's loop).
"""
from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..quant.formats import FORMATS, LANES
from ..quant.kernels import (_FINGERPRINT, _at, _data_ptr, _i64, _lane0, _micro_tile, _pack_panel, _steps,
                             decode_piece)


@intrinsic
def f32_bits(typingctx, x):
    """float32 -> its IEEE bits as uint32 (a register bitcast; vectorizes)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen

@intrinsic
def f32_from_bits(typingctx, u):
    """int32/uint32 IEEE bits -> float32 (a register bitcast; vectorizes)."""
    if not isinstance(u, types.Integer) or u.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(u), codegen


# =============================================================================================
# Attention over the per-layer caches (edgelm/runtime/kv_cache.py): every storage type read in place
# =============================================================================================
# Rows are decoded by `_decode_kv` (quant.kernels' row decoder cut to the four cache types: one switch on
# the ggml type id, one vectorized loop per type, exact like gguf.quants.dequantize), so one compiled kernel
# serves f32, f16, q8_0 and q4_0 storage alike: storage arrays come in as addresses, rows as
# (kv head * capacity + slot), and consecutive slots are decoded as one long row.
# Position p lives in slot p % capacity (a ring for sliding-window layers, see kv_cache.py).

CACHE_GGML_TYPES = (0, 1, 8, 2)   # F32, F16, Q8_0, Q4_0: the storage types of kv_cache.CACHE_TYPES


@intrinsic
def _decode_kv(typingctx, kid, addr, n_in, dst, doff):
    """dst.flat[doff : doff + n_in] = the n_in elements at byte address `addr` (whole blocks of ggml type
    `kid`) as float32, exactly like gguf.quants.dequantize.  quant.kernels' _decode_row, with its switch
    cut to the four cache types: a quarter of the code to compile at each call site."""
    if not (all(isinstance(t, types.Integer) for t in (kid, addr, n_in, doff))
            and isinstance(dst, types.Array) and dst.dtype == types.float32 and dst.layout == "C"):
        return None
    sig = types.void(types.int64, types.int64, types.int64, dst, types.int64)

    def codegen(context, builder, signature, args):
        kid_v, addr_v, n_v, dst_v, off_v = args
        src = builder.inttoptr(addr_v, ir.IntType(8).as_pointer())
        dp = _data_ptr(context, builder, signature.args[3], dst_v, off_v)
        merge = builder.append_basic_block("kv.merge")
        sw = builder.switch(kid_v, merge)
        for t in CACHE_GGML_TYPES:
            fmt = FORMATS[t]
            bb = builder.append_basic_block(f"kv.{fmt.name}")
            sw.add_case(_i64(t), bb)
            builder.position_at_end(bb)
            n_steps, tail0 = _steps(builder, fmt, n_v)
            with cgutils.for_range(builder, n_steps) as loop:
                ys = _at(builder, dp, loop.index, fmt.step)
                block = _at(builder, src, loop.index, fmt.step_bytes)
                for j, pc in enumerate(fmt.emit(builder, block, fmt.step)):
                    q = builder.gep(ys, [_i64(LANES * j)])
                    builder.store(decode_piece(builder, pc),
                                  builder.bitcast(q, ir.VectorType(ir.FloatType(), LANES).as_pointer()), align=4)
            if fmt.block_size == 1:       # float rows: a scalar tail when n_in is not a multiple of 32
                with cgutils.for_range(builder, n_v, start=tail0) as loop:
                    elem = _at(builder, src, loop.index, fmt.type_size)
                    w = _lane0(builder, decode_piece(builder, next(fmt.emit(builder, elem, 1))))
                    builder.store(w, builder.gep(dp, [loop.index]))
            builder.branch(merge)
        builder.position_at_end(merge)
        return context.get_dummy_value()

    return sig, codegen


# No nnan/ninf: masked scores are -inf and must stay so.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)         # ln 2 split in two (Cephes expf: exact n * ln2_hi)
_LN2_LO = np.float32(-2.12194440e-4)


@nb.njit(cache=True, inline="always", fastmath=_FAST)
def exp32(x):
    """float32 exp that LLVM can vectorize (Cephes expf: exp(r) * 2**n, |r| <= ln2/2, ~1 ulp);
    exp(-inf) = 0.  Numba's np.exp is a scalar libm call per element without SVML."""
    xc = min(max(x, np.float32(-87.0)), np.float32(88.0))
    n = np.floor(xc * _LOG2E + np.float32(0.5))
    r = xc - n * _LN2_HI - n * _LN2_LO
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    e = (p * r * r + r) + np.float32(1.0)
    two_n = f32_from_bits(np.int32((np.int32(n) + np.int32(127)) << np.int32(23)))
    return np.float32(0.0) if x < np.float32(-87.0) else e * two_n


@nb.njit(cache=True, inline="always", fastmath=_FAST)
def _accumulate(w, w0, rows, n, hdv, acc):
    """acc[:hdv] += sum_j w[w0 + j] * rows[j, :hdv] for j < n.  Four rows per pass over acc: a quarter of
    the loads and stores of acc, the long contiguous loop innermost (it vectorizes)."""
    j = 0
    while j + 4 <= n:
        a, b, c, e = w[w0 + j], w[w0 + j + 1], w[w0 + j + 2], w[w0 + j + 3]
        for d in range(hdv):
            acc[d] += (a * rows[j, d] + b * rows[j + 1, d]) + (c * rows[j + 2, d] + e * rows[j + 3, d])
        j += 4
    while j < n:
        a = w[w0 + j]
        for d in range(hdv):
            acc[d] += a * rows[j, d]
        j += 1


@nb.njit(cache=True, inline="always")
def _decode_slots(kid, addr, rb, n_in, row0, row_wrap, cap, n, dst):
    """dst[:n] = the n rows from row0 on (wrapping from row_wrap back by cap: a ring) as float32.
    Consecutive rows are one long row of whole blocks, so this is one or two decoder calls, not n."""
    done = 0
    row = row0
    while done < n:
        m = min(n - done, row_wrap - row)
        _decode_kv(kid, addr + row * rb, m * n_in, dst, done * n_in)
        done += m
        row = row_wrap - cap


_TILE = 32            # rows decoded at a time in decode attention (8 KiB of f32 at head size 64)
_DECODE_CHUNK = 256   # keys per decode task (flash-decoding split: tasks = kv heads x chunks)


def _build(fingerprint: str, parallel: bool):
    # A closure over the kernel sources' fingerprint (formats.py, grids.py, kernels.py), as quant/kernels.py
    # does: numba's disk cache watches only this file, and the closure value is part of the cache key, so a
    # changed row decoder or micro-kernel recompiles.
    # `parallel` is in the closure too: numba's cache key has no parallel flag, so a serial and a
    # parallel build of one function would otherwise share (and overwrite) one cache entry.

    def decode_py(q, kid_k, ka, krb, kid_v, va, vrb, n_kv, cap, lo, end, scale, sinks, out, chunk):
        """out (n_head, hdv) = softmax(q . K[lo:end]) V[lo:end] for one query.  Tasks (kv head, chunk of
        keys) each keep their own max, sum and V accumulation (flash-decoding); a serial pass combines
        them.  K and V are decoded a tile of _TILE rows at a time into scratch, each tile used for every head
        of its group (GQA: read once per kv head)."""
        fingerprint, parallel  # noqa: B018
        n_head, hd = q.shape
        hdv = out.shape[1]
        group = n_head // n_kv
        nch = (end - lo + chunk - 1) // chunk
        pm = np.empty((n_kv * nch, group), np.float32)
        pl = np.empty((n_kv * nch, group), np.float32)
        pacc = np.empty((n_kv * nch, group, hdv), np.float32)
        for t in nb.prange(n_kv * nch):
            kh = t // nch
            j0 = lo + (t - kh * nch) * chunk
            m = min(chunk, end - j0)
            s = np.empty((group, chunk), np.float32)
            qs = np.empty((group, hd), np.float32)
            for g in range(group):
                for d in range(hd):
                    qs[g, d] = q[kh * group + g, d] * scale
            r0 = kh * cap + j0 % cap         # row of key j0; the chunk wraps at most once (m <= cap)
            r_wrap = (kh + 1) * cap
            ktile = np.empty((_TILE, hd), np.float32)
            vtile = np.empty((_TILE, hdv), np.float32)
            r = r0
            for b0 in range(0, m, _TILE):   # decode a tile of rows, then use it for every head
                nt = min(_TILE, m - b0)
                _decode_slots(kid_k, ka, krb, hd, r, r_wrap, cap, nt, ktile)
                r += nt
                if r >= r_wrap:
                    r -= cap
                for g in range(group):
                    for j in range(nt):
                        acc = np.float32(0.0)
                        for d in range(hd):
                            acc += qs[g, d] * ktile[j, d]
                        s[g, b0 + j] = acc
            for g in range(group):
                mx = s[g, 0]
                for j in range(1, m):
                    mx = max(mx, s[g, j])
                tot = np.float32(0.0)
                for j in range(m):
                    e = exp32(s[g, j] - mx)
                    s[g, j] = e
                    tot += e
                pm[t, g] = mx
                pl[t, g] = tot
            a = pacc[t]
            a[:] = 0
            r = r0
            for b0 in range(0, m, _TILE):
                nt = min(_TILE, m - b0)
                _decode_slots(kid_v, va, vrb, hdv, r, r_wrap, cap, nt, vtile)
                r += nt
                if r >= r_wrap:
                    r -= cap
                for g in range(group):
                    _accumulate(s[g], b0, vtile, nt, hdv, a[g])
        for h in range(n_head):
            kh = h // group
            g = h - kh * group
            mx = pm[kh * nch, g]
            for c in range(1, nch):
                mx = max(mx, pm[kh * nch + c, g])
            if sinks.size:
                mx = max(mx, sinks[h])
            tot = exp32(sinks[h] - mx) if sinks.size else np.float32(0.0)
            for d in range(hdv):
                out[h, d] = 0
            for c in range(nch):
                f = exp32(pm[kh * nch + c, g] - mx)
                tot += pl[kh * nch + c, g] * f
                for d in range(hdv):
                    out[h, d] += f * pacc[kh * nch + c, g, d]
            inv = np.float32(1.0) / tot
            for d in range(hdv):
                out[h, d] *= inv

    def prefill_py(q, kid_k, ka, krb, kid_v, va, vrb, n_kv, cap, pos0, window, scale, sinks, out, qb, kb):
        """out (T, n_head, hdv) for queries at pos0..pos0+T-1: blockwise attention with an online softmax
        (FlashAttention's loop on a CPU).  Tasks (kv head, block of qb queries) walk the key tiles their
        queries can see; each K/V tile of kb rows is decoded once per task into scratch and serves all
        group * qb query rows through quant.kernels' register-blocked micro-kernel (6 rows x 16 columns
        of outer products): S = Q K^T with K packed k-major in panels of 16 keys, O += P V with V in
        panels of 16 value dims.  No T x n_keys matrix exists."""
        fingerprint, parallel  # noqa: B018
        T, n_head, hd = q.shape
        hdv = out.shape[2]
        group = n_head // n_kv
        nqb = (T + qb - 1) // qb
        n_kp = kb // 16                                     # key panels per tile
        n_vp = (hdv + 15) // 16                             # value panels (the last one zero padded)
        n8 = hd // 8
        n_pass = (hd + 127) // 128                          # k passes of <= 128, as quant.kernels' matmul
        kc = (hd + n_pass - 1) // n_pass
        for t in nb.prange(n_kv * nqb):
            kh = t % n_kv
            i0 = (nqb - 1 - t // n_kv) * qb                 # the longest (latest) query blocks first
            ni = min(qb, T - i0)
            R = group * ni                                  # query rows of this task: (i, g) -> i*group+g
            R6 = (R + 5) // 6 * 6
            qs = np.empty((R, hd), np.float32)
            for i in range(ni):
                for g in range(group):
                    for d in range(hd):
                        qs[i * group + g, d] = q[i0 + i, kh * group + g, d] * scale
            ktile = np.empty((kb, hd), np.float32)
            vtile = np.empty((kb, hdv), np.float32)
            kpack = np.empty(n_kp * hd * 16, np.float32)
            vpack = np.zeros(n_vp * kb * 16, np.float32)
            S = np.empty(n_kp * R6 * 16, np.float32)        # S[(p*R6 + r)*16 + j]: row r, key 16p + j
            P = np.zeros((R, kb), np.float32)
            srow = np.empty(kb, np.float32)
            C = np.empty(n_vp * R6 * 16, np.float32)
            o = np.zeros((R, n_vp * 16), np.float32)
            mrow = np.full(R, -np.inf, np.float32)
            lrow = np.zeros(R, np.float32)
            p_first = pos0 + i0
            p_last = p_first + ni - 1
            k_lo = max(0, p_first - window + 1) if window else 0
            for j0 in range(k_lo, p_last + 1, kb):
                nj = min(kb, p_last + 1 - j0)
                r0 = kh * cap + j0 % cap
                r_wrap = (kh + 1) * cap
                _decode_slots(kid_k, ka, krb, hd, r0, r_wrap, cap, nj, ktile)
                _decode_slots(kid_v, va, vrb, hdv, r0, r_wrap, cap, nj, vtile)
                n_p = (nj + 15) // 16
                for p in range(n_p):                         # K -> panels of 16 keys, k-major
                    mv = min(16, nj - 16 * p)
                    base = p * hd * 16
                    _pack_panel(ktile, 16 * p, mv, kpack, base, n8)
                    for d in range(n8 * 8, hd):
                        for j in range(16):
                            kpack[base + d * 16 + j] = ktile[16 * p + j, d] if j < mv else np.float32(0.0)
                for p in range(n_p):                         # S = Q K^T
                    for k0 in range(0, hd, kc):
                        for g6 in range(0, R, 6):
                            _micro_tile(qs, g6, min(6, R - g6), kpack, p * hd * 16, k0, min(hd, k0 + kc),
                                        S, (p * R6 + g6) * 16, k0 == 0)
                for r in range(R):                           # online softmax over this tile
                    pq = p_first + r // group
                    jlo = max(0, (pq - window + 1 if window else 0) - j0)
                    jhi = min(nj, pq + 1 - j0)
                    for p in range(n_p):                     # this row's scores, contiguous
                        for j in range(16):
                            srow[16 * p + j] = S[(p * R6 + r) * 16 + j]
                    mx = mrow[r]
                    for j in range(jlo, jhi):
                        mx = max(mx, srow[j])
                    corr = exp32(mrow[r] - mx)
                    tot = np.float32(0.0)
                    for j in range(nj):                      # (vectorizes: exp32 is branch free)
                        e = exp32(srow[j] - mx)
                        e = e if jlo <= j < jhi else np.float32(0.0)
                        P[r, j] = e
                        tot += e
                    if jlo < jhi:
                        lrow[r] = lrow[r] * corr + tot
                        mrow[r] = mx
                        for d in range(n_vp * 16):
                            o[r, d] *= corr
                for k in range(nj):                          # V -> panels of 16 value dims
                    for pv in range(n_vp):
                        for j in range(min(16, hdv - 16 * pv)):
                            vpack[(pv * kb + k) * 16 + j] = vtile[k, 16 * pv + j]
                for pv in range(n_vp):                       # O += P V
                    for g6 in range(0, R, 6):
                        _micro_tile(P, g6, min(6, R - g6), vpack, pv * kb * 16, 0, nj,
                                    C, (pv * R6 + g6) * 16, True)
                    for r in range(R):
                        for j in range(16):
                            o[r, 16 * pv + j] += C[(pv * R6 + r) * 16 + j]
            for i in range(ni):
                for g in range(group):
                    r = i * group + g
                    h = kh * group + g
                    tot = lrow[r]
                    if sinks.size:
                        tot += exp32(sinks[h] - mrow[r])
                    inv = np.float32(1.0) / tot
                    for d in range(hdv):
                        out[i0 + i, h, d] = o[r, d] * inv

    opts = dict(parallel=parallel, fastmath=_FAST, cache=True, error_model="numpy")
    return nb.njit(**opts)(decode_py), nb.njit(**opts)(prefill_py)


_cache_decode_parallel, _cache_prefill = _build(_FINGERPRINT, True)
_cache_decode_serial, _ = _build(_FINGERPRINT, False)

# Waking threads costs tens of µs per parallel region (passive OpenMP waits): short contexts run serially.
SERIAL_MAX_WORK = 1 << 17   # heads x keys x head_dim below which one thread is faster

PREFILL_QBLOCK = 32    # queries per prefill task (x group heads = rows sharing each decoded tile)
PREFILL_KBLOCK = 64    # keys per decoded K/V tile


def attend_decode(q, kid_k, kc, krb, kid_v, vc, vrb, cap, pos, window, scale, sinks, out) -> None:
    """out (n_head, hdv) = attention of one query q (n_head, hd) at position `pos` over the keys
    max(0, pos-window+1)..pos (window 0: from 0) held in slots p % cap of the raw storage kc / vc."""
    end = pos + 1
    lo = max(0, end - window) if window else 0
    n_kv = kc.shape[0]
    kernel = _cache_decode_serial if q.size * (end - lo) <= SERIAL_MAX_WORK else _cache_decode_parallel
    kernel(q, kid_k, kc.ctypes.data, krb, kid_v, vc.ctypes.data, vrb, n_kv, cap, lo, end,
           scale, sinks, out, _DECODE_CHUNK)


def attend_prefill(q, kid_k, kc, krb, kid_v, vc, vrb, cap, pos0, window, scale, sinks, out) -> None:
    """out (T, n_head, hdv) = causal (windowed) attention of q (T, n_head, hd) at positions pos0.. ."""
    n_kv = kc.shape[0]
    T = q.shape[0]
    # Short batches (a chat turn over a long cache) get smaller query blocks, so that every thread has
    # tasks (about 4 each); a smaller block only means each K/V tile is decoded by more tasks.
    per_task = -(-T * n_kv // (4 * nb.get_num_threads()))
    qb = min(PREFILL_QBLOCK, max(1, per_task))
    with nb.parallel_chunksize(1):      # tasks differ in length (causal): hand them out one at a time
        _cache_prefill(np.ascontiguousarray(q), kid_k, kc.ctypes.data, krb, kid_v, vc.ctypes.data, vrb,
                       n_kv, cap, pos0, window, scale, sinks, out, qb, PREFILL_KBLOCK)
