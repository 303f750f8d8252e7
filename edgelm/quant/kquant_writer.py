"""K-quant writers: Q2_K ... Q6_K blocks from float32 rows, byte for byte as llama.cpp's quantizers write them,
without and with an importance matrix (ggml/src/ggml-quants.c: quantize_row_q2_K_ref ... q6_K_ref and
quantize_row_q2_K_impl ... q6_K_impl, and their searches make_qkx2_quants, make_qkx3_quants, make_q3_quants,
make_qx_quants, make_qp_quants); and the importance-weighted legacy types (Q4_0 ... Q5_1).

Byte equality needs llama.cpp's arithmetic exactly: every quantity is float32, every sum runs in index order
(no pairwise sums, no fused multiply-add), integers are converted to float32 before they meet a float, and
rounding is to nearest, ties to even (ggml's nearest_int). Numba would widen float32 * int64 or float32 *
0.1 to float64, so every such operand below is wrapped in _F().  Super-block scales go through float16 (and
back) before the second pass, as in llama.cpp; _f16_bits rounds as numpy.float16 does.
"""
from __future__ import annotations

import numba as nb
import numpy as np

_F = np.float32
_EPS = np.float32(1e-15)          # ggml-quants.c GROUP_MAX_EPS
QK = 256
BLOCK_BYTES = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}   # ggml-common.h block_qX_K
_ROWS_PER_TASK = 8


@nb.njit(cache=True, inline="always")
def _nearest(v):
    return int(np.rint(v))


@nb.njit(cache=True)
def _f16_bits(f, scratch):
    """float32 -> IEEE half bits, round to nearest even (as numpy.float16; ggml's FP32_TO_FP16).
    `scratch`: a 1-element float32 array, viewed as uint32 (no allocation per call)."""
    scratch[0] = f
    x = np.int64(scratch.view(np.uint32)[0])
    sign = (x >> 16) & 0x8000
    x &= 0x7FFFFFFF
    if x >= 0x7F800000:                                   # inf, nan
        return sign | (0x7E00 if x > 0x7F800000 else 0x7C00)
    if x >= 0x477FF000:                                   # rounds past 65504
        return sign | 0x7C00
    if x < 0x38800000:                                    # half subnormal: scale by 2^24 (exact), round
        return sign | _nearest(abs(f) * _F(16777216.0))
    x += 0xFFF + ((x >> 13) & 1)
    return sign | ((x - 0x38000000) >> 13)


@nb.njit(cache=True)
def _f16_value(h, scratch):
    """IEEE half bits -> float32 (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:
        v = _F(m) * _F(5.960464477539063e-08)               # m * 2^-24, exact
        return -v if sign else v
    bits = sign | (((e + 112) if e < 31 else 255) << 23) | (m << 13)
    scratch.view(np.uint32)[0] = np.uint32(bits)
    return scratch[0]


@nb.njit(cache=True)
def _qkx2(x, w, L, Laux, nmax, rmin, rdelta, nstep, mad):
    """make_qkx2_quants: codes L in 0..nmax and (scale, the_min >= 0) with x ~ scale * L - the_min,
    minimizing the weighted squared (mad: absolute) error over nstep + 1 candidate scales."""
    n = x.shape[0]
    mn = x[0]
    mx = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if mn > 0:
        mn = _F(0)
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return _F(0), -mn
    fn = _F(nmax)
    iscale = fn / (mx - mn)
    scale = _F(1) / iscale
    best = _F(0)
    for i in range(n):
        l = max(0, min(nmax, _nearest(iscale * (x[i] - mn))))
        L[i] = l
        diff = scale * _F(l) + mn - x[i]
        best += w[i] * (abs(diff) if mad else diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * _F(step) + fn) / (mx - mn)
        sum_l = _F(0)
        sum_l2 = _F(0)
        sum_xl = _F(0)
        for i in range(n):
            l = max(0, min(nmax, _nearest(iscale * (x[i] - mn))))
            Laux[i] = l
            wl = w[i] * _F(l)
            sum_l += wl
            sum_l2 += wl * _F(l)
            sum_xl += wl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = _F(0)
                this_scale = sum_xl / sum_l2
            cur = _F(0)
            for i in range(n):
                diff = this_scale * _F(Laux[i]) + this_min - x[i]
                cur += w[i] * (abs(diff) if mad else diff * diff)
            if cur < best:
                for i in range(n):
                    L[i] = Laux[i]
                best = cur
                scale = this_scale
                mn = this_min
    return scale, -mn


@nb.njit(cache=True)
def _largest(x):
    """The value of largest magnitude (the first of equals)."""
    mx = _F(0)
    amax = _F(0)
    for i in range(x.shape[0]):
        if abs(x[i]) > amax:
            amax = abs(x[i])
            mx = x[i]
    return mx


@nb.njit(cache=True)
def _qx(x, w, L, nmax):
    """make_qx_quants (rmse_type 1): signed codes, stored + nmax in L; returns the scale (x ~ scale * (L - nmax))."""
    n = x.shape[0]
    mx = _largest(x)
    if abs(mx) < _EPS:
        for i in range(n):
            L[i] = 0
        return _F(0)
    fn = _F(nmax)
    iscale = -fn / mx
    sumlx = _F(0)
    suml2 = _F(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
        L[i] = l + nmax
        sumlx += w[i] * x[i] * _F(l)
        suml2 += w[i] * _F(l) * _F(l)
    scale = sumlx / suml2 if suml2 != 0 else _F(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fn + _F(0.1) * _F(step)) / mx
        sumlx = _F(0)
        suml2 = _F(0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
            sumlx += w[i] * x[i] * _F(l)
            suml2 += w[i] * _F(l) * _F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@nb.njit(cache=True)
def _qp(x, L, nmax, w):
    """make_qp_quants: non-negative values (the sub-block scales or mins) as codes 0..nmax under weights w;
    returns the least-squares scale (importance-matrix path)."""
    n = x.shape[0]
    mx = _F(0)
    for i in range(n):
        mx = max(mx, x[i])
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _F(0)
    fn = _F(nmax)
    iscale = fn / mx
    scale = _F(1) / iscale
    best = _F(0)
    for i in range(n):
        diff = x[i] - scale * _F(_nearest(iscale * x[i]))
        best += w[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_s = (_F(0.1) * _F(step) + fn) / mx
        scale_s = _F(1) / iscale_s
        mse = _F(0)
        for i in range(n):
            diff = x[i] - scale_s * _F(min(nmax, _nearest(iscale_s * x[i])))
            mse += w[i] * diff * diff
        if mse < best:
            best = mse
            iscale = iscale_s
    sumlx = _F(0)
    suml2 = _F(0)
    for i in range(n):
        l = min(nmax, _nearest(iscale * x[i]))
        L[i] = l
        sumlx += w[i] * x[i] * _F(l)
        suml2 += w[i] * _F(l) * _F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            slx = sumlx - w[i] * x[i] * _F(L[i])
            sl2 = suml2 - w[i] * _F(L[i]) * _F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, _nearest(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx += w[i] * x[i] * _F(new_l)
                    sl2 += w[i] * _F(new_l) * _F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else _F(0)


@nb.njit(cache=True)
def _sigma2(x, factor):
    """factor * (sum of x^2) / 256, summed in order (the imatrix path's per-block variance term)."""
    sum_x2 = _F(0)
    for i in range(x.shape[0]):
        sum_x2 += x[i] * x[i]
    return _F(factor) * sum_x2 / _F(QK)


@nb.njit(cache=True)
def _importance(x, qw, sigma2, w):
    """w = qw * sqrt(sigma2 + x^2), and their sum (the weights of one sub-block)."""
    total = _F(0)
    for l in range(x.shape[0]):
        w[l] = qw[l] * np.sqrt(sigma2 + x[l] * x[l])
        total += w[l]
    return total


@nb.njit(cache=True)
def _q3(x, L, nmax):
    """make_q3_quants (do_rmse): signed codes refined in place for 5 passes at most, stored + nmax in L;
    returns the scale."""
    n = x.shape[0]
    mx = _largest(x)
    if abs(mx) < _EPS:
        for i in range(n):
            L[i] = 0
        return _F(0)
    iscale = -_F(nmax) / mx
    sumlx = _F(0)
    suml2 = _F(0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, _nearest(iscale * x[i])))
        L[i] = l
        w = x[i] * x[i]
        sumlx += w * x[i] * _F(l)
        suml2 += w * _F(l) * _F(l)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * _F(L[i])
            if slx > 0:
                sl2 = suml2 - w * _F(L[i]) * _F(L[i])
                new_l = max(-nmax, min(nmax - 1, _nearest(x[i] * sl2 / slx)))
                if new_l != L[i]:
                    slx += w * x[i] * _F(new_l)
                    sl2 += w * _F(new_l) * _F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else _F(0)


@nb.njit(cache=True)
def _pack_crumbs(L, out, off):
    """2-bit codes of 256 elements into 64 bytes at off: byte 32h + l holds elements 128h + l + 32k, k = 0..3."""
    for h in range(2):
        for l in range(32):
            j = 128 * h + l
            out[off + 32 * h + l] = L[j] | (L[j + 32] << 2) | (L[j + 64] << 4) | (L[j + 96] << 6)


@nb.njit(cache=True)
def _block_q2_k(x, qw, out, w, L, Laux, scales, mins, sw, Ls, Lm, scratch):
    """One Q2_K block (84 bytes: scales[16], qs[64] at 16, f16 d at 80, dmin at 82); qw: the block's
    importance weights (256), or empty for llama.cpp's reference path."""
    max_scale = _F(0)
    max_min = _F(0)
    sigma2 = _sigma2(x, 1.0) if qw.shape[0] else _F(0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        if qw.shape[0]:
            sw[j] = _importance(xs, qw[16 * j:16 * j + 16], sigma2, w)
            scales[j], mins[j] = _qkx2(xs, w[:16], L[16 * j:16 * j + 16], Laux, 3, _F(-0.9), _F(0.05), 36, False)
        else:
            for l in range(16):
                w[l] = abs(xs[l])
            scales[j], mins[j] = _qkx2(xs, w[:16], L[16 * j:16 * j + 16], Laux, 3, _F(-0.5), _F(0.1), 15, True)
        if scales[j] > max_scale:
            max_scale = scales[j]
        if mins[j] > max_min:
            max_min = mins[j]
    hd = 0
    hm = 0
    if qw.shape[0]:
        hd = _f16_bits(_qp(scales[:16], Ls, 15, sw), scratch)
        hm = _f16_bits(_qp(mins, Lm, 15, sw), scratch)
        for j in range(16):
            out[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
    else:
        if max_scale > 0:
            iscale = _F(15) / max_scale
            for j in range(16):
                out[j] = _nearest(iscale * scales[j]) & 0xFF            # no clamp, as llama.cpp
            hd = _f16_bits(max_scale / _F(15), scratch)
        else:
            for j in range(16):
                out[j] = 0
        if max_min > 0:
            iscale = _F(15) / max_min
            for j in range(16):
                out[j] |= (_nearest(iscale * mins[j]) << 4) & 0xFF
            hm = _f16_bits(max_min / _F(15), scratch)
    _put_f16(out, 80, hd)
    _put_f16(out, 82, hm)
    d_all = _f16_value(hd, scratch)
    m_all = _f16_value(hm, scratch)
    for j in range(16):
        packed = np.int64(out[j])
        d = d_all * _F(packed & 0xF)
        if d == 0:
            continue
        dm = m_all * _F(packed >> 4)
        for ii in range(16):
            L[16 * j + ii] = max(0, min(3, _nearest((x[16 * j + ii] + dm) / d)))
    _pack_crumbs(L, out, 16)


@nb.njit(cache=True)
def _put_q3_scale(out, j, l):
    """6-bit scale code l (0..63) of sub-block j into the 12 bytes at 96: low nibbles in bytes 0..7 (j >= 8
    in the high halves), the top 2 bits in bytes 8..11."""
    if j < 8:
        out[96 + j] = l & 0xF
    else:
        out[96 + j - 8] |= (l & 0xF) << 4
    out[104 + j % 4] |= (l >> 4) << (2 * (j // 4))


@nb.njit(cache=True)
def _block_q3_k(x, qw, out, w, L, scales, sw, Ls, scratch):
    """One Q3_K block (110 bytes: hmask[32], qs[64] at 32, 6-bit scales[12] at 96, f16 d at 108)."""
    for k in range(12):
        out[96 + k] = 0
    hd = 0
    if qw.shape[0]:
        sigma2 = _sigma2(x, 2.0)
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            sw[j] = _importance(xs, qw[16 * j:16 * j + 16], sigma2, w)
            scales[j] = _qx(xs, w[:16], L[16 * j:16 * j + 16], 4)
        d_block = _qx(scales, sw, Ls, 32)               # the scales' own 6-bit codes (0..63)
        for j in range(16):
            _put_q3_scale(out, j, Ls[j])
        hd = _f16_bits(d_block, scratch)
    else:
        max_scale = _F(0)
        amax = _F(0)
        for j in range(16):
            scales[j] = _q3(x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 4)
            a = abs(scales[j])
            if a > amax:
                amax = a
                max_scale = scales[j]
        if max_scale != 0:
            iscale = _F(-32) / max_scale
            for j in range(16):
                l = ((_nearest(iscale * scales[j]) + 128) & 0xFF) - 128     # int8 store, then the clamp
                _put_q3_scale(out, j, max(-32, min(31, l)) + 32)
            hd = _f16_bits(_F(1) / iscale, scratch)
    _put_f16(out, 108, hd)
    d_all = _f16_value(hd, scratch)
    for j in range(16):
        low = np.int64(out[96 + j]) & 0xF if j < 8 else np.int64(out[96 + j - 8]) >> 4
        sc = (low | (((np.int64(out[104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
        d = d_all * _F(sc)
        if d == 0:
            continue
        for ii in range(16):
            L[16 * j + ii] = max(-4, min(3, _nearest(x[16 * j + ii] / d))) + 4
    for k in range(32):
        out[k] = 0
    for j in range(256):                # hmask: bit j / 32 of byte j % 32 is element j's high bit
        if L[j] > 3:
            out[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    _pack_crumbs(L, out, 32)


@nb.njit(cache=True)
def _put_f16(out, off, h):
    out[off] = h & 0xFF
    out[off + 1] = (h >> 8) & 0xFF


@nb.njit(cache=True)
def _block_q45_k(x, qw, out, nmax, rmin, nstep, w, L, Laux, scales, mins, sw, ls, lm, scratch):
    """One Q4_K (nmax 15) or Q5_K (nmax 31) block of 256 into out (144 / 176 bytes)."""
    if qw.shape[0]:
        sigma2 = _sigma2(x, 2.0)
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            sw[j] = _importance(xs, qw[32 * j:32 * j + 32], sigma2, w)
            scales[j], mins[j] = _qkx2(xs, w, L[32 * j:32 * j + 32], Laux, nmax, _F(-0.9), _F(0.05), 36, False)
        d_block = _qp(scales[:8], ls, 63, sw[:8])
        m_block = _qp(mins, lm, 63, sw[:8])
        for j in range(8):             # uint8 codes; Q5_K also clamps them to 63 (Q4_K: as they are)
            ls[j] = ls[j] & 0xFF if nmax == 15 else min(63, ls[j] & 0xFF)
            lm[j] = lm[j] & 0xFF if nmax == 15 else min(63, lm[j] & 0xFF)
    else:
        max_scale = _F(0)
        max_min = _F(0)
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            sum_x2 = _F(0)
            for l in range(32):
                sum_x2 += xs[l] * xs[l]
            av_x = np.sqrt(sum_x2 / _F(32))
            for l in range(32):
                w[l] = av_x + abs(xs[l])
            scales[j], mins[j] = _qkx2(xs, w, L[32 * j:32 * j + 32], Laux, nmax, rmin, _F(0.1), nstep, False)
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = _F(63) / max_scale if max_scale > 0 else _F(0)
        inv_min = _F(63) / max_min if max_min > 0 else _F(0)
        for j in range(8):
            ls[j] = min(63, _nearest(inv_scale * scales[j]) & 0xFF)     # uint8 store, then the clamp
            lm[j] = min(63, _nearest(inv_min * mins[j]) & 0xFF)
        d_block = max_scale / _F(63)
        m_block = max_min / _F(63)
    # 12 bytes of 6-bit scales and mins (ggml-quants.c quantize_row_q4_K_ref; read by get_scale_min_k4)
    for j in range(4):
        out[4 + j] = ls[j] | ((ls[j + 4] >> 4) << 6)
        out[8 + j] = lm[j] | ((lm[j + 4] >> 4) << 6)
        out[12 + j] = (ls[j + 4] & 0xF) | ((lm[j + 4] & 0xF) << 4)
    hd = _f16_bits(d_block, scratch)
    hm = _f16_bits(m_block, scratch)
    _put_f16(out, 0, hd)
    _put_f16(out, 2, hm)
    d_all = _f16_value(hd, scratch)
    m_all = _f16_value(hm, scratch)
    for j in range(8):
        d = d_all * _F(ls[j])
        if d == 0:
            continue
        dm = m_all * _F(lm[j])
        for ii in range(32):
            L[32 * j + ii] = max(0, min(nmax, _nearest((x[32 * j + ii] + dm) / d)))
    if nmax == 15:                     # Q4_K: qs[128] at 16, low nibble elements 64c + l, high 64c + 32 + l
        for c in range(4):
            for l in range(32):
                out[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)
    else:                              # Q5_K: qh[32] at 16 (bit 2c / 2c+1), qs[128] at 48
        for l in range(32):
            out[16 + l] = 0
        for c in range(4):
            for l in range(32):
                l1 = L[64 * c + l]
                l2 = L[64 * c + 32 + l]
                if l1 > 15:
                    l1 -= 16
                    out[16 + l] |= 1 << (2 * c)
                if l2 > 15:
                    l2 -= 16
                    out[16 + l] |= 2 << (2 * c)
                out[48 + 32 * c + l] = l1 | (l2 << 4)


@nb.njit(cache=True)
def _block_q6_k(x, qw, out, w, L, scales, scratch):
    """One Q6_K block of 256 into out (210 bytes); with importance weights they weight the fit directly."""
    max_scale = _F(0)
    max_abs = _F(0)
    for ib in range(16):
        xs = x[16 * ib:16 * ib + 16]
        for i in range(16):
            w[i] = qw[16 * ib + i] if qw.shape[0] else xs[i] * xs[i]
        s = _qx(xs, w[:16], L[16 * ib:16 * ib + 16], 32)
        scales[ib] = s
        if abs(s) > max_abs:
            max_abs = abs(s)
            max_scale = s
    if max_abs < _EPS:
        for i in range(210):
            out[i] = 0
        return
    iscale = _F(-128) / max_scale
    hd = _f16_bits(_F(1) / iscale, scratch)
    _put_f16(out, 208, hd)
    d_all = _f16_value(hd, scratch)
    for ib in range(16):
        q = min(127, _nearest(iscale * scales[ib]))
        out[192 + ib] = q & 0xFF                           # int8, in -128..127 (|iscale * s| <= 128)
        d = d_all * _F(q)
        if d == 0:
            continue
        for ii in range(16):
            L[16 * ib + ii] = max(-32, min(31, _nearest(x[16 * ib + ii] / d))) + 32
    for c in range(2):                 # ql[128] at 0, qh[64] at 128 (ggml-quants.c quantize_row_q6_K_ref)
        for l in range(32):
            a, b2, c3, d4 = L[128 * c + l], L[128 * c + 32 + l], L[128 * c + 64 + l], L[128 * c + 96 + l]
            out[64 * c + l] = (a & 0xF) | ((c3 & 0xF) << 4)
            out[64 * c + 32 + l] = (b2 & 0xF) | ((d4 & 0xF) << 4)
            out[128 + 32 * c + l] = (a >> 4) | ((b2 >> 4) << 2) | ((c3 >> 4) << 4) | ((d4 >> 4) << 6)


@nb.njit(cache=True, parallel=True)
def _quantize_rows(x, qw, out, kind):
    """x (n_rows, n_in) float32 -> out (n_rows, n_in / 256 * block bytes) uint8; kind 2 .. 6 (QkindK);
    qw: importance weights per input column (n_in,), or empty for llama.cpp's reference path."""
    n_rows, n_in = x.shape
    nb_ = n_in // QK
    size = out.shape[1] // nb_
    n_tasks = (n_rows + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK
    for t in nb.prange(n_tasks):
        w = np.empty(32, np.float32)
        L = np.zeros(QK, np.int64)
        Laux = np.empty(32, np.int64)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        ls = np.zeros(16, np.int64)
        lm = np.zeros(16, np.int64)
        scratch = np.empty(1, np.float32)
        for r in range(t * _ROWS_PER_TASK, min(n_rows, (t + 1) * _ROWS_PER_TASK)):
            for b in range(nb_):
                xb = x[r, QK * b:QK * (b + 1)]
                qb = qw[QK * b:QK * (b + 1)] if qw.shape[0] else qw
                ob = out[r, size * b:size * (b + 1)]
                if kind == 6:
                    _block_q6_k(xb, qb, ob, w, L, scales, scratch)
                elif kind == 2:
                    _block_q2_k(xb, qb, ob, w, L, Laux, scales, mins, sw, ls, lm, scratch)
                elif kind == 3:
                    _block_q3_k(xb, qb, ob, w, L, scales, sw, ls, scratch)
                elif kind == 5:
                    _block_q45_k(xb, qb, ob, 31, _F(-0.5), 15, w, L, Laux, scales, mins[:8], sw, ls, lm, scratch)
                else:
                    _block_q45_k(xb, qb, ob, 15, _F(-1.0), 20, w, L, Laux, scales, mins[:8], sw, ls, lm, scratch)


# Legacy types with importance weights (ggml-quants.c quantize_row_q4_0_impl ... q5_1_impl): a block of 32,
# the search of make_qx_quants (Q4_0, Q5_0) or make_qkx3_quants (Q4_1, Q5_1), no second pass.  Without
# weights these types come from gguf-py's reference quantizer (writers.py).
LEGACY_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}   # ggml-common.h block_q4_0 ... q5_1


@nb.njit(cache=True, parallel=True)
def _legacy_rows(x, qw, out, bits, with_min):
    n_rows, n_in = x.shape
    nb_ = n_in // 32
    size = out.shape[1] // nb_
    nmax = (1 << bits) - 1
    for r in nb.prange(n_rows):
        w = np.empty(32, np.float32)
        L = np.zeros(32, np.int64)
        Laux = np.empty(32, np.int64)
        scratch = np.empty(1, np.float32)
        row = x[r]
        sum_x2 = _F(0)
        for j in range(n_in):
            sum_x2 += row[j] * row[j]
        sigma2 = sum_x2 / _F(n_in)                 # over the whole row (the K-quants: per block)
        for b in range(nb_):
            xb = row[32 * b:32 * b + 32]
            o = out[r, size * b:size * (b + 1)]
            _importance(xb, qw[32 * b:32 * b + 32], sigma2, w)
            if with_min:
                d, the_min = _qkx2(xb, w, L, Laux, nmax, _F(-0.9), _F(0.05), 36, False)
                _put_f16(o, 0, _f16_bits(d, scratch))
                _put_f16(o, 2, _f16_bits(-the_min, scratch))
                at = 4
            else:
                d = _qx(xb, w, L, (nmax + 1) // 2)
                _put_f16(o, 0, _f16_bits(d, scratch))
                at = 2
            if bits == 5:                          # qh: bit j is element j's fifth bit
                qh = 0
                for j in range(32):
                    qh |= ((L[j] >> 4) & 1) << j
                for k in range(4):
                    o[at + k] = (qh >> (8 * k)) & 0xFF
                at += 4
            for j in range(16):
                o[at + j] = (L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)


def quantize(x: np.ndarray, type_name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """float rows (..., n_in) -> uint8 (..., bytes per row) of `type_name`: Q2_K ... Q6_K, or with importance
    weights also Q4_0, Q4_1, Q5_0, Q5_1. importance: one non-negative weight per input column (an importance
    matrix's mean squared activations), for llama.cpp's weighted searches (quantize_row_X_impl); None: its
    reference path."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_in = x.shape[-1]
    block = 32 if type_name in LEGACY_BYTES else QK
    if n_in % block:
        raise ValueError(f"{type_name} needs rows of a multiple of {block} values, not {n_in}")
    if type_name in LEGACY_BYTES and importance is None:
        raise ValueError(f"{type_name} is written here only with importance weights (else: gguf.quants)")
    qw = np.zeros(0, np.float32) if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    if importance is not None and qw.shape != (n_in,):
        raise ValueError(f"importance weights: expected {n_in} values, got shape {qw.shape}")
    rows = x.reshape(-1, n_in)
    size = LEGACY_BYTES.get(type_name) or BLOCK_BYTES[type_name]
    out = np.empty((rows.shape[0], n_in // block * size), np.uint8)
    if type_name in LEGACY_BYTES:
        _legacy_rows(rows, qw, out, int(type_name[1]), type_name.endswith("_1"))
    else:
        _quantize_rows(rows, qw, out, int(type_name[1]))
    return out.reshape(x.shape[:-1] + (out.shape[1],))
