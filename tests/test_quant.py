"""Quant formats and kernels against the independent reference, gguf-py's `gguf.quants`."""

import platform

import gguf
import numpy as np
import pytest

from edgelm.errors import UnsupportedError
from edgelm.quant import FORMATS, dequantize, format_for, get_rows, matmul, matvec, row_bytes
from edgelm.quant import kernels
from tests.quant_model import set_block_scales

T = gguf.GGMLQuantizationType
TYPES = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K,
         T.MXFP4, T.IQ4_NL, T.IQ4_XS, T.Q3_K, T.Q2_K, T.TQ1_0, T.TQ2_0,
         T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
GRID_TYPES = [T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S, T.IQ1_S, T.IQ1_M]
FLOAT_TYPES = {T.F32: np.float32, T.F16: np.float16}
ALL_KINDS = kernels.kinds_mask(FORMATS)


@pytest.fixture(autouse=True)
def _one_kernel_build(monkeypatch, request):
    """Every test here runs the kernels compiled for all types at once (one compile, ~45 s cold), not one
    build per type mask (3 kernels x 25 types, ~3 min cold): a mask only decides which of the identical
    per-type cases a build holds.  test_kernels_per_type_mask checks the real per-mask builds."""
    if "per_type_mask" not in request.node.name:
        build = kernels._kernels
        monkeypatch.setattr(kernels, "_kernels", lambda kinds: build(ALL_KINDS | kinds))


def _weights(rng, n_rows, n_in):
    """Float data with row scales over ~9 decades, an all-zero row, a tiny block and stray zeros."""
    w = rng.standard_normal((n_rows, n_in)) * np.exp(rng.uniform(-12, 3, (n_rows, 1)))
    w[rng.random(w.shape) < 0.05] = 0.0
    w[0, : min(n_in, 32)] *= 1e-6
    if n_rows > 2:
        w[2] = 0.0
    return w.astype(np.float32)


def _random_blocks(rng, qtype, n_rows, n_in):
    """Random raw blocks with valid, finite f16 scales (for types gguf-py cannot quantize)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    nb = n_rows * n_in // block
    raw = rng.integers(0, 256, (nb, size), dtype=np.uint8)
    set_block_scales(raw, qtype, _finite_halves(rng, nb), _finite_halves(rng, nb))
    return raw.reshape(n_rows, -1)


def _finite_halves(rng, n):
    d = (rng.standard_normal(n) * np.exp(rng.uniform(-10, 2, n))).astype(np.float16)
    d[::7] = 0.0  # some all-zero blocks
    return d


def make_tensor(qtype, n_rows, n_in, seed=0):
    """(raw uint8 (n_rows, row_bytes), reference float32 (n_rows, n_in) from gguf.quants.dequantize)."""
    rng = np.random.default_rng([seed, int(qtype), n_rows, n_in])
    if qtype in FLOAT_TYPES:
        typed = gguf.quants.quantize(_weights(rng, n_rows, n_in), qtype)
        raw = np.ascontiguousarray(typed).view(np.uint8)
        ref = gguf.quants.dequantize(raw.view(FLOAT_TYPES[qtype]), qtype)
        return raw, np.asarray(ref, dtype=np.float32).reshape(n_rows, n_in)
    try:
        raw = gguf.quants.quantize(_weights(rng, n_rows, n_in), qtype)
    except NotImplementedError:  # gguf-py has no K-quant quantizer: random valid blocks instead
        raw = _random_blocks(rng, qtype, n_rows, n_in)
    raw = np.ascontiguousarray(raw).reshape(n_rows, -1)
    return raw, gguf.quants.dequantize(raw, qtype).reshape(n_rows, n_in)


def shapes_for(qtype):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    shapes = [(3, 256), (7, 512), (1, 768)]
    if block == 1:
        shapes.append((5, 37))  # float rows need not be a multiple of 32
    return [s for s in shapes if s[1] % block == 0]


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _assert_close(got, ref_f64, bound):
    """|got - ref| <= 1e-5 * (|W| |x|): float32 accumulation error, far below any real mismatch."""
    err = np.abs(got.astype(np.float64) - ref_f64)
    assert np.all(err <= 1e-5 * bound + 1e-30), f"max rel err {np.max(err / (bound + 1e-30)):.3g}"


# --- the table -------------------------------------------------------------------------------

def test_table_matches_gguf_sizes():
    assert set(FORMATS) == {int(t) for t in TYPES}
    for t, fmt in FORMATS.items():
        assert fmt.ggml_type == t and fmt.name == T(t).name
        assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[T(t)]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_row_bytes(qtype):
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    n_in = 4 * max(block, 32)
    assert row_bytes(qtype, n_in) == gguf.quants.quant_shape_to_byte_shape((n_in,), qtype)[0]
    if block > 1:
        with pytest.raises(ValueError):
            row_bytes(qtype, n_in + 1)


@pytest.mark.parametrize("qtype", [T.Q8_K, T.Q8_1, T.I8, 999], ids=str)
def test_unsupported_type_is_named(qtype):
    name = qtype.name if isinstance(qtype, T) else "999"
    with pytest.raises(UnsupportedError, match=name):
        format_for(qtype)
    raw = np.zeros((2, 256), np.uint8)
    with pytest.raises(UnsupportedError, match=name):
        matvec(raw, qtype, 2, 256, np.zeros(256, np.float32))
    with pytest.raises(UnsupportedError, match=name):
        dequantize(raw, qtype, 256)


def test_kernels_per_type_mask():
    """What a model runs: kernels compiled for only the types given (its file's), plus each call's own type
    even when the mask leaves it out, give the all-types build's results bit for bit."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal(256).astype(np.float32)
    X = rng.standard_normal((5, 256)).astype(np.float32)
    raw4, ref4 = make_tensor(T.Q4_0, 7, 256)
    raw8, _ = make_tensor(T.Q8_0, 5, 256)
    want_mv = [matvec(raw4, T.Q4_0, 7, 256, x, kinds=ALL_KINDS), matvec(raw8, T.Q8_0, 5, 256, x, kinds=ALL_KINDS)]
    want_mm = matmul(raw4, T.Q4_0, 7, 256, X, kinds=ALL_KINDS)
    model = kernels.kinds_mask([T.Q4_0, T.Q8_0])
    for kinds in (model, 0, kernels.kinds_mask([T.Q8_0])):   # the model's mask, none, one without Q4_0
        assert np.array_equal(_bits(matvec(raw4, T.Q4_0, 7, 256, x, kinds=kinds)), _bits(want_mv[0]))
        assert np.array_equal(_bits(matmul(raw4, T.Q4_0, 7, 256, X, kinds=kinds)), _bits(want_mm))
        assert np.array_equal(_bits(get_rows(raw4, T.Q4_0, 256, [6, 1], kinds=kinds)), _bits(ref4[[6, 1]]))
    fused = FusedLinear([(raw4, T.Q4_0, 7), (raw8, T.Q8_0, 5)], 256)   # kinds from its own types
    assert fused.kinds == model
    for got, want in zip(fused.matvec(x), want_mv):
        assert np.array_equal(_bits(got), _bits(want))
    assert set(kernels._KERNELS) >= {model, 1 << T.Q4_0, ALL_KINDS}


# --- bit-exact decode --------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequantize_is_bit_exact(qtype):
    for n_rows, n_in in shapes_for(qtype):
        raw, ref = make_tensor(qtype, n_rows, n_in)
        got = dequantize(raw, qtype, n_in)
        assert got.dtype == np.float32 and got.shape == (n_rows, n_in)
        assert np.array_equal(_bits(got), _bits(ref)), (n_rows, n_in)


def test_f16_every_bit_pattern():
    h = np.arange(1 << 16, dtype=np.uint16)
    got = dequantize(h.view(np.uint8).reshape(1, -1), T.F16, 1 << 16)[0]
    ref = h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(_bits(got)[~nan], _bits(ref)[~nan])
    assert np.all(np.isnan(got[nan]))  # signalling-NaN payloads may be quieted by hardware


def test_f16_portable_integer_path():
    """The no-F16C fallback (old x86, NUMBA_CPU_NAME=generic) is exact too, NaN payloads included."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from edgelm.quant.formats import half_to_f32

    @intrinsic
    def convert8(typingctx, src, dst, i):
        def codegen(context, builder, sig, args):
            s = context.make_array(sig.args[0])(context, builder, value=args[0]).data
            d = context.make_array(sig.args[1])(context, builder, value=args[1]).data
            v8 = lambda t: ir.VectorType(t, 8)  # noqa: E731
            hp = builder.bitcast(builder.gep(s, [args[2]]), v8(ir.IntType(16)).as_pointer())
            f = half_to_f32(builder, builder.load(hp, align=2), native=False)
            fp = builder.bitcast(builder.gep(d, [args[2]]), v8(ir.FloatType()).as_pointer())
            builder.store(f, fp, align=4)
            return context.get_dummy_value()
        return types.void(src, dst, types.int64), codegen

    @njit
    def convert(src, dst):
        for i in range(0, src.size, 8):
            convert8(src, dst, i)

    h = np.arange(1 << 16, dtype=np.uint16)
    got = np.empty(h.size, np.float32)
    convert(h, got)
    g, ref = _bits(got), _bits(h.view(np.float16).astype(np.float32))
    nan = np.isnan(h.view(np.float16))
    assert np.array_equal(g[~nan], ref[~nan])
    # NaN payloads are widened exactly; NumPy's reference is the CPU's own conversion on arm64 (fcvt), which sets
    # the quiet bit of a signalling NaN (found running this test on arm64 under qemu: tools/arm64_check.sh)
    quiet = np.uint32(0x00400000)
    assert np.array_equal(g[nan] | quiet, ref[nan] | quiet) and np.all(np.isnan(got[nan]))
    if platform.machine() in ("x86_64", "AMD64"):      # NumPy widens in software there: every payload as is
        assert np.array_equal(g, ref)


def _mxfp4_every_block():
    """MXFP4 blocks covering every (exponent byte, code byte) pair: 16 blocks per exponent 0..255,
    whose 16 code bytes together take all 256 values (so every code in both nibble positions)."""
    codes = np.arange(256, dtype=np.uint8).reshape(16, 16)
    raw = np.empty((256, 16, 17), np.uint8)
    raw[:, :, 0] = np.arange(256, dtype=np.uint8)[:, None]
    raw[:, :, 1:] = codes[None]
    raw = raw.reshape(-1, 17)
    with np.errstate(over="ignore"):  # 12 * 2^127 is inf, in gguf-py as here
        ref = gguf.quants.dequantize(raw, T.MXFP4).reshape(-1, 32).astype(np.float32)
    return raw, ref


def test_mxfp4_every_exponent_and_code():
    """E8M0 edge cases (0 and 1: subnormal scales, 255: 2^127, not NaN) and every code, bit exact;
    as 256 rows of 512, and through get_rows."""
    raw, ref = _mxfp4_every_block()
    assert not np.any(np.isnan(ref)) and np.any(np.isinf(ref))
    assert np.any((ref != 0) & (np.abs(ref) < np.finfo(np.float32).tiny))  # subnormal weights
    got = dequantize(raw.reshape(256, -1), T.MXFP4, 512)
    assert np.array_equal(_bits(got), _bits(ref.reshape(256, 512)))
    ids = np.array([0, 1, 255, 254, 127, 128, 2])
    assert np.array_equal(_bits(get_rows(raw.reshape(256, -1), T.MXFP4, 512, ids)),
                          _bits(ref.reshape(256, 512)[ids]))


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL, T.IQ4_XS, T.TQ1_0, T.TQ2_0,
                                   *GRID_TYPES], ids=lambda t: t.name)
def test_random_raw_blocks(qtype):
    """Every byte pattern a file may hold (not only what a quantizer writes: TQ1_0 bytes above 242, TQ2_0
    code 3, any packed scale) decodes as gguf-py decodes it, and the integer dot agrees with it."""
    rng = np.random.default_rng(int(qtype) + 40)
    raw = _random_blocks(rng, qtype, 6, 512)
    ref = gguf.quants.dequantize(raw, qtype).reshape(6, 512).astype(np.float32)
    assert np.array_equal(_bits(dequantize(raw, qtype, 512)), _bits(ref))
    x = rng.standard_normal(512).astype(np.float32)
    ref64 = ref.astype(np.float64)
    _assert_matvec_close(matvec(raw, qtype, 6, 512, x), ref64, x)


def test_mxfp4_random_raw_blocks():
    rng = np.random.default_rng(39)
    raw = rng.integers(0, 256, (5 * 24, 17), dtype=np.uint8)
    raw[:10, 0] = [0, 1, 127, 254, 255, 0, 1, 127, 254, 255]
    with np.errstate(over="ignore"):
        ref = gguf.quants.dequantize(raw, T.MXFP4).reshape(5, 768)
    got = dequantize(raw.reshape(5, -1), T.MXFP4, 768)
    assert np.array_equal(_bits(got), _bits(ref))


@pytest.mark.parametrize("x86", [False, True], ids=["portable", "pmaddwd"])
def test_madd16_both_paths(x86, monkeypatch):
    """The integer dot's pair products (kernels._madd16): the x86 instruction and the portable IR that
    other targets (arm64) compile both give a[2i] * c[2i] + a[2i+1] * c[2i+1] exactly, over the int16
    range the codes and fixed-point activations use."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from edgelm.quant import formats, kernels

    if x86 and not formats._AVX2:
        pytest.skip("target has no AVX2")
    monkeypatch.setattr(formats, "_AVX2", x86)

    @intrinsic
    def madd(typingctx, a, c, out, i):
        def codegen(context, builder, sig, args):
            ptr = lambda k: context.make_array(sig.args[k])(context, builder, value=args[k]).data  # noqa: E731
            v16 = ir.VectorType(ir.IntType(16), 16)
            load = lambda k: builder.load(builder.bitcast(builder.gep(ptr(k), [builder.mul(  # noqa: E731
                args[3], ir.Constant(ir.IntType(64), 16))]), v16.as_pointer()), align=2)
            r = kernels._madd16(builder, load(0), load(1))
            dst = builder.gep(ptr(2), [builder.mul(args[3], ir.Constant(ir.IntType(64), 8))])
            builder.store(r, builder.bitcast(dst, r.type.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(a, c, out, types.int64), codegen

    @njit
    def run(a, c, out):
        for i in range(a.size // 16):
            madd(a, c, out, i)

    rng = np.random.default_rng(3)
    a = rng.integers(-32767, 32768, 16 * 64).astype(np.int16)
    c = rng.integers(-32767, 32768, 16 * 64).astype(np.int16)
    a[:16], c[:16] = 32767, -32767                          # the extremes
    out = np.empty(8 * 64, np.int32)
    run(a, c, out)
    prod = a.astype(np.int64) * c.astype(np.int64)
    assert np.array_equal(out, prod[0::2] + prod[1::2])


def _iq4_nl_every_code():
    """IQ4_NL blocks whose code bytes take all 256 values, under scales 1, -0.5 and a subnormal f16."""
    raw = np.empty((3, 16, 18), np.uint8)
    raw[:, :, 0:2] = np.array([1.0, -0.5, 6e-8], np.float16).view(np.uint8).reshape(3, 1, 2)
    raw[:, :, 2:] = np.arange(256, dtype=np.uint8).reshape(16, 16)[None]
    raw = raw.reshape(-1, 18)
    return raw, gguf.quants.dequantize(raw, T.IQ4_NL).reshape(-1, 32).astype(np.float32)


# (block bytes, code offset, the lanes emitter, the scale, every-code blocks) per table-lookup format
_LOOKUPS = {
    "MXFP4": (17, 1, "_mxfp4_lanes", lambda f, b, p: f._e8m0_half(b, p, 0), _mxfp4_every_block),
    "IQ4_NL": (18, 2, "_iq4nl_lanes", lambda f, b, p: f._f16_splat(b, p, 0), _iq4_nl_every_code),
}


@pytest.mark.parametrize("fmt", list(_LOOKUPS))
@pytest.mark.parametrize("bits", [32, 16], ids=["i32-lanes", "i16-lanes"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["portable", "byte-shuffle"])
def test_table_lookup_both_paths(shuffle, bits, fmt):
    """The byte-shuffle lookup (x86 SSSE3 pshufb, arm64 NEON tbl) and the portable arithmetic one are both
    exact, whichever the kernels use on this machine, in the float dot's 32-bit lanes and the integer dot's
    16-bit ones."""
    from llvmlite import ir
    from numba import njit, types
    from numba.extending import intrinsic

    from edgelm.quant import formats
    from edgelm.quant.kernels import decode_piece

    if shuffle and formats._BYTE_LOOKUP is None:
        pytest.skip("target has no byte shuffle (SSSE3 / NEON)")
    size, code_off, lanes_name, scale_of, blocks = _LOOKUPS[fmt]

    @intrinsic
    def decode_block(typingctx, src, dst, i):
        def codegen(context, builder, sig, args):
            s = context.make_array(sig.args[0])(context, builder, value=args[0]).data
            d = context.make_array(sig.args[1])(context, builder, value=args[1]).data
            p = builder.gep(s, [builder.mul(args[2], ir.Constant(ir.IntType(64), size))])
            with formats.code_bits(bits):
                parts = getattr(formats, lanes_name)(builder, p, code_off, shuffle=shuffle)
            assert [v.type.count for v in parts] == [256 // bits] * (bits // 8)
            q = formats._codes(builder, parts)
            w = decode_piece(builder, formats.Piece(q, scale_of(formats, builder, p)))
            fp = builder.gep(d, [builder.mul(args[2], ir.Constant(ir.IntType(64), 32))])
            builder.store(w, builder.bitcast(fp, w.type.as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(src, dst, types.int64), codegen

    @njit
    def decode(src, dst):
        for i in range(src.size // size):
            decode_block(src, dst, i)

    raw, ref = blocks()
    got = np.empty(ref.size, np.float32)
    decode(raw.reshape(-1), got)
    assert np.array_equal(_bits(got), _bits(ref.reshape(-1)))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_get_rows(qtype):
    n_rows, n_in = 9, 256 if gguf.GGML_QUANT_SIZES[qtype][0] > 1 else 100
    raw, ref = make_tensor(qtype, n_rows, n_in, seed=1)
    ids = np.array([4, 0, 8, 4, 2])
    assert np.array_equal(_bits(get_rows(raw, qtype, n_in, ids)), _bits(ref[ids]))
    assert np.array_equal(_bits(get_rows(raw, qtype, n_in, [7])), _bits(ref[[7]]))
    assert get_rows(raw, qtype, n_in, []).shape == (0, n_in)
    out = np.empty((2, n_in), np.float32)
    assert get_rows(raw, qtype, n_in, [1, 3], out=out) is out
    assert np.array_equal(_bits(out), _bits(ref[[1, 3]]))
    with pytest.raises(IndexError):
        get_rows(raw, qtype, n_in, [n_rows])
    with pytest.raises(IndexError):
        get_rows(raw, qtype, n_in, [-1])


# --- products ----------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec(qtype):
    rng = np.random.default_rng(int(qtype))
    for n_out, n_in in shapes_for(qtype):
        raw, ref = make_tensor(qtype, n_out, n_in)
        x = (rng.standard_normal(n_in) * np.exp(rng.uniform(-3, 3, n_in))).astype(np.float32)
        y = matvec(raw, qtype, n_out, n_in, x)
        assert y.dtype == np.float32 and y.shape == (n_out,)
        _assert_matvec_close(y, ref.astype(np.float64), x)


@pytest.fixture(params=[0, 1, 2], ids=["float", "int16x1", "int16x2"])
def matvec_passes(request):
    """Each decode dot-product mode of kernels.set_matvec_passes, restored afterwards."""
    before = kernels._PASSES[0]
    kernels.set_matvec_passes(request.param)
    yield request.param
    kernels.set_matvec_passes(before)


def _fixed_point_bound(ref64, x, passes):
    """What representing x in int16 fixed point can add to each dot product: per block of 32, S / 2 (one
    pass) or S * 2^-16 (two) times sum |w| over the block, S = max|x| / 32767 (kernels._quantize_x)."""
    if passes == 0 or ref64.shape[1] % 32:
        return 0.0
    blocks = np.abs(x.astype(np.float64)).reshape(-1, 32).max(axis=1) / 32767
    per_elem = np.repeat(blocks * (0.5 if passes == 1 else 2.0 ** -16), 32)
    return np.abs(ref64) @ per_elem * 1.001


def _assert_matvec_close(y, ref64, x, passes=None):
    """y = W . x against float64 products of the reference weights: float32 rounding (1e-5 of |W| . |x|)
    plus the fixed-point error of x in matvec mode `passes` (default: the mode in force)."""
    passes = kernels._PASSES[0] if passes is None else passes
    err = np.abs(y.astype(np.float64) - ref64 @ x)
    bound = 1e-5 * (np.abs(ref64) @ np.abs(x)) + _fixed_point_bound(ref64, x, passes) + 1e-30
    assert np.all(err <= bound), f"worst err / bound {np.max(err / bound):.3g}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matvec_every_mode(qtype, matvec_passes):
    """The float dot and the integer dots (exact integer sums of codes x fixed-point activations) against
    float64 products of gguf-py's dequantized weights, within float32 rounding plus, for the integer dots,
    the fixed-point representation error of x (negligible with two passes)."""
    rng = np.random.default_rng(int(qtype) + 7)
    # (1030, 512): the threaded split; (3, 8448): rows longer than one prefetch window (33 super-blocks)
    for n_out, n_in in shapes_for(qtype) + [(1030, 512), (3, 8448)]:
        raw, ref = make_tensor(qtype, n_out, n_in, seed=5)
        x = (rng.standard_normal(n_in) * np.exp(rng.uniform(-3, 3, n_in))).astype(np.float32)
        x[:32] = 0.0                                        # an all-zero block of x
        y = matvec(raw, qtype, n_out, n_in, x)
        _assert_matvec_close(y, ref.astype(np.float64), x, matvec_passes)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
def test_matvec_nan_activations_give_nan(qtype, matvec_passes):
    """A NaN or inf in x makes every dot product NaN/inf in every mode (the decoder then reports NaN
    logits), never a silently finite answer."""
    raw, _ = make_tensor(qtype, 5, 256, seed=6)
    for bad in (np.nan, np.inf):
        x = np.ones(256, np.float32)
        x[100] = bad
        y = matvec(raw, qtype, 5, 256, x)
        assert not np.isfinite(y[1]) and not np.isfinite(y[3])


def test_matvec_passes_checked():
    with pytest.raises(ValueError, match="passes"):
        kernels.set_matvec_passes(3)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_matmul(qtype):
    """Batches past BATCH_ROWS: the float32 micro-kernel, within float32 rounding of the reference."""
    rng = np.random.default_rng(int(qtype) + 100)
    for n_out, n_in in shapes_for(qtype):
        raw, ref = make_tensor(qtype, n_out, n_in)
        for m in (kernels.BATCH_ROWS + 1, 2 * kernels.BATCH_ROWS + 3):
            X = rng.standard_normal((m, n_in)).astype(np.float32)
            Y = matmul(raw, qtype, n_out, n_in, X)
            assert Y.dtype == np.float32 and Y.shape == (m, n_out)
            ref64 = ref.astype(np.float64)
            _assert_close(Y, X @ ref64.T, np.abs(X).astype(np.float64) @ np.abs(ref64).T)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_small_batches_are_matvecs_bit_for_bit(qtype, matvec_passes):
    """Up to BATCH_ROWS rows (a draft being verified, a step of several sequences) every row of the result is
    the bits of a matvec of that row alone, in every dot-product mode, serial and threaded (matvec is
    checked against the reference above): speculative and batched decoding then reproduce plain decoding."""
    rng = np.random.default_rng(int(qtype) + 200)
    for n_out, n_in in shapes_for(qtype) + [(1030, 512)]:
        raw, _ = make_tensor(qtype, n_out, n_in, seed=9)
        for m in (2, 3, 4, 5, 7, kernels.BATCH_ROWS):
            X = (rng.standard_normal((m, n_in)) * np.exp(rng.uniform(-3, 3, (m, n_in)))).astype(np.float32)
            X[1, :32] = 0.0
            Y = matmul(raw, qtype, n_out, n_in, X)
            for i in range(m):
                assert np.array_equal(_bits(Y[i]), _bits(matvec(raw, qtype, n_out, n_in, X[i]))), (m, i)


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q4_0, T.F16, T.MXFP4], ids=lambda t: t.name)
def test_large_parallel_paths(qtype):
    """Big enough for the threaded paths, with ragged tiles (rows % 4 != 0, M spanning tiles)."""
    n_out, n_in = 1030, 512
    raw, ref = make_tensor(qtype, n_out, n_in, seed=2)
    rng = np.random.default_rng(3)
    ref64 = ref.astype(np.float64)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = np.empty(n_out, np.float32)
    assert matvec(raw, qtype, n_out, n_in, x, out=out) is out
    _assert_matvec_close(out, ref64, x)
    X = rng.standard_normal((131, n_in)).astype(np.float32)
    Y = np.empty((131, n_out), np.float32)
    assert matmul(raw, qtype, n_out, n_in, X, out=Y) is Y
    _assert_close(Y, X @ ref64.T, np.abs(X).astype(np.float64) @ np.abs(ref64).T)
    assert np.array_equal(_bits(dequantize(raw, qtype, n_in)), _bits(ref))


@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0, T.F16, T.MXFP4], ids=lambda t: t.name)
def test_matmul_rows_longer_than_one_k_range(qtype):
    """Rows longer than kernels._KW are decoded and applied a k-range at a time, later ranges added into
    the output: 4352 = 2048 + 2048 + 256 (a short last range), tiles and panels both ragged."""
    n_out, n_in = 53, 2 * kernels._KW + 256
    raw, ref = make_tensor(qtype, n_out, n_in, seed=4)
    ref64 = ref.astype(np.float64)
    rng = np.random.default_rng(9)
    for m in (kernels.BATCH_ROWS + 1, 19 + kernels.BATCH_ROWS):
        X = (rng.standard_normal((m, n_in)) * np.exp(rng.uniform(-3, 3, n_in))).astype(np.float32)
        _assert_close(matmul(raw, qtype, n_out, n_in, X), X @ ref64.T, np.abs(X).astype(np.float64) @ np.abs(ref64).T)


def test_readonly_memmap_input(tmp_path):
    """Weights arrive as a read-only view of an mmapped file; results must not depend on that."""
    raw, ref = make_tensor(T.Q4_K, 6, 512)
    path = tmp_path / "w.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r", shape=raw.shape)
    x = np.linspace(-1, 1, 512, dtype=np.float32)
    assert np.array_equal(matvec(mm, T.Q4_K, 6, 512, x), matvec(raw, T.Q4_K, 6, 512, x))
    assert np.array_equal(_bits(dequantize(mm, T.Q4_K, 512)), _bits(ref))


def test_shape_errors():
    raw, _ = make_tensor(T.Q8_0, 4, 64)
    with pytest.raises(ValueError):
        matvec(raw, T.Q8_0, 5, 64, np.zeros(64, np.float32))  # wrong n_out
    with pytest.raises(ValueError):
        matvec(raw, T.Q8_0, 4, 64, np.zeros(32, np.float32))  # wrong x
    with pytest.raises(ValueError):
        matvec(raw, T.Q4_0, 4, 64, np.zeros(64, np.float32))  # row bytes of another type
    with pytest.raises(ValueError):
        matmul(raw, T.Q8_0, 4, 64, np.zeros((2, 64), np.float32), out=np.empty((2, 5), np.float32))


# --- fused calls: several matrices sharing one input -------------------------------------------

from collections import namedtuple  # noqa: E402

from edgelm.quant import FusedLinear, matmul_multi, matvec_multi  # noqa: E402

_Lin = namedtuple("_Lin", "raw ggml_type n_out")


def _fused_case(specs, n_in, seed=0):
    """specs: [(qtype, n_out)] -> (weights as (raw, type, n_out) tuples, float64 references)."""
    weights, refs = [], []
    for i, (qtype, n_out) in enumerate(specs):
        raw, ref = make_tensor(qtype, n_out, n_in, seed=seed + i)
        weights.append((raw, qtype, n_out))
        refs.append(ref.astype(np.float64))
    return weights, refs


def _check_fused(outs, refs, X):
    """outs[j] (M, n_out_j) against X @ ref_j.T, each a contiguous array; one row goes through matvec,
    whose integer dot adds the fixed-point error of x (_fixed_point_bound)."""
    X64 = X.astype(np.float64)
    assert len(outs) == len(refs)
    for y, ref in zip(outs, refs):
        assert y.dtype == np.float32 and y.shape == (X.shape[0], ref.shape[0])
        assert y.flags.c_contiguous
        ref64 = ref.astype(np.float64)
        bound = 1e-5 * (np.abs(X64) @ np.abs(ref64).T) + 1e-30
        if X.shape[0] <= kernels.BATCH_ROWS:     # matvecs: each row's bound
            fixed = [_fixed_point_bound(ref64, x, kernels._PASSES[0]) for x in X]
            bound = bound + np.array(fixed).reshape(len(X), -1)
        err = np.abs(y.astype(np.float64) - X64 @ ref64.T)
        assert np.all(err <= bound), f"worst err / bound {np.max(err / bound):.3g}"


MIXED = [(T.Q5_0, 7), (T.Q8_0, 5), (T.Q4_K, 3), (T.Q6_K, 9), (T.F16, 2), (T.Q4_1, 1), (T.Q5_K, 4),
         (T.Q4_0, 6), (T.Q5_1, 3), (T.BF16, 2), (T.F32, 1), (T.MXFP4, 5)]


@pytest.mark.parametrize("n_in", [256, 768])
def test_fused_mixed_types(n_in):
    """Every type in one call, odd row counts; matvec (1 row) and matmul (several) paths."""
    weights, refs = _fused_case(MIXED, n_in)
    rng = np.random.default_rng(n_in)
    f = FusedLinear(weights, n_in)
    assert f.n_outs == tuple(n for _, n in MIXED) and f.n_total == sum(f.n_outs)
    x = (rng.standard_normal(n_in) * np.exp(rng.uniform(-3, 3, n_in))).astype(np.float32)
    ys = f.matvec(x)
    _check_fused([y[None, :] for y in ys], refs, x[None, :])
    _check_fused([y[None, :] for y in matvec_multi(weights, n_in, x)], refs, x[None, :])
    for m in (1, 2, 5, 17, 33):
        X = rng.standard_normal((m, n_in)).astype(np.float32)
        _check_fused(f(X), refs, X)
    _check_fused(matmul_multi(weights, n_in, X), refs, X)


def test_fused_float_rows_with_tail():
    """Float types need no block multiple: n_in = 37 leaves a scalar tail in every row."""
    weights, refs = _fused_case([(T.F32, 3), (T.F16, 5), (T.BF16, 4)], 37)
    rng = np.random.default_rng(5)
    for m in (1, 3, 20):
        X = rng.standard_normal((m, 37)).astype(np.float32)
        _check_fused(FusedLinear(weights, 37)(X), refs, X)


@pytest.mark.parametrize("specs", [
    [(T.Q5_0, 1024), (T.Q5_0, 256), (T.Q8_0, 256)],      # gemma's q, k, v
    [(T.Q4_1, 1539), (T.Q4_1, 1537)],                   # gate, up (ragged)
    [(T.Q6_K, 3), (T.Q4_K, 1201), (T.Q8_0, 2)],         # tiny matrices beside a big one
], ids=["qkv", "gate_up", "ragged"])
def test_fused_parallel_paths(specs):
    """Big enough for the threaded paths: the split across threads crosses matrix boundaries."""
    n_in = 512
    weights, refs = _fused_case(specs, n_in, seed=7)
    lins = [_Lin(*w) for w in weights]          # Linear-like objects work as well as tuples
    f = FusedLinear(lins, n_in)
    assert f._parallel
    rng = np.random.default_rng(8)
    x = rng.standard_normal(n_in).astype(np.float32)
    out = np.empty(f.n_total, np.float32)
    ys = f.matvec(x, out=out)
    assert all(np.shares_memory(y, out) for y in ys)
    _check_fused([y[None, :] for y in ys], refs, x[None, :])
    X = rng.standard_normal((131, n_in)).astype(np.float32)
    _check_fused(f(X), refs, X)
    # results do not depend on how rows are grouped or split: single-matrix calls, serial and
    # parallel runs all agree with the fused call bit for bit
    for (raw, qtype, n_out), y, Y in zip(weights, f(X[:1]), f(X)):
        assert np.array_equal(matvec(raw, qtype, n_out, n_in, X[0]), y[0])
        assert np.array_equal(matmul(raw, qtype, n_out, n_in, X), Y)
    f._parallel = False
    assert all(np.array_equal(a, b) for a, b in zip(f.matvec(x), ys))


def test_fused_errors():
    raw, _ = make_tensor(T.Q8_0, 4, 64)
    raw2, _ = make_tensor(T.Q4_0, 4, 128)
    with pytest.raises(ValueError):
        FusedLinear([], 64)
    with pytest.raises(ValueError):
        FusedLinear([(raw, T.Q8_0, 4), (raw2, T.Q4_0, 4)], 64)   # n_in differs
    with pytest.raises(ValueError):
        FusedLinear([(raw, T.Q8_0, 5)], 64)                      # wrong n_out
    with pytest.raises(UnsupportedError):
        FusedLinear([(raw, T.Q8_K, 4)], 64)
    f = FusedLinear([(raw, T.Q8_0, 4)], 64)
    with pytest.raises(ValueError):
        f(np.zeros((2, 32), np.float32))
    with pytest.raises(ValueError):
        f.matvec(np.zeros(64, np.float32), out=np.empty(5, np.float32))
    assert f(np.zeros((0, 64), np.float32))[0].shape == (0, 4)
