"""Rope.apply: the compiled pass equals the NumPy form bit for bit, and both rotate as a float64 reference."""
import numpy as np
import pytest

from edgelm.arch.blocks import Rope, rope_frequencies


@pytest.mark.parametrize("style", ["neox", "norm"])
@pytest.mark.parametrize("rot_dim", [64, 32])          # all of a 64-wide head, or its first half (partial)
def test_compiled_rope_matches_numpy_and_reference(style, rot_dim):
    inv_freq, factor = rope_frequencies(10000.0, rot_dim)
    rope = Rope(inv_freq, style, factor)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 64)).astype(np.float32)
    positions = np.array([0, 1, 517, 8191])
    cos, sin = rope.cos_sin(positions)

    compiled = x.copy()
    rope.apply(compiled, cos, sin)                        # contiguous: the compiled pass
    wide = np.zeros((4, 3, 128), np.float32)
    wide[..., :64] = x
    strided = wide[..., :64]                              # not contiguous: the NumPy form
    rope.apply(strided, cos, sin)
    assert np.array_equal(compiled.view(np.uint32), np.ascontiguousarray(strided).view(np.uint32))

    half = rot_dim // 2
    ia = np.arange(half) if style == "neox" else np.arange(0, rot_dim, 2)
    ib = ia + half if style == "neox" else ia + 1
    ang = positions[:, None].astype(np.float64) * inv_freq.astype(np.float64)[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    ref = x.astype(np.float64)
    a, b = ref[..., ia].copy(), ref[..., ib].copy()
    ref[..., ia], ref[..., ib] = a * c - b * s, b * c + a * s
    # float32 angles (as transformers computes them) differ from float64 ones by ~pos * 2^-24
    assert np.allclose(compiled, ref, atol=2e-3 * (1 + positions.max() / 1000), rtol=0)
    assert np.array_equal(compiled[..., rot_dim:], x[..., rot_dim:])


def test_one_rotation_for_every_row():
    """cos/sin of one position applied to all rows (the context shift re-rotates kept keys this way)."""
    rope = Rope(*rope_frequencies(10000.0, 64)[:1], "neox")
    x = np.random.default_rng(2).standard_normal((5, 2, 64)).astype(np.float32)
    cos, sin = rope.cos_sin(np.array([37]))
    got = x.copy()
    rope.apply(got, cos, sin)
    for t in range(5):
        row = x[t:t + 1].copy()
        rope.apply(row, cos, sin)
        assert np.array_equal(got[t:t + 1].view(np.uint32), row.view(np.uint32))
