"""K-quant writers and llama.cpp's file-type recipes against llama.cpp itself: the golden of
tools/make_kquant_golden.py holds, for two small F16 models the test writes again (tests/quant_model.py), the
type llama.cpp's quantizer gave every tensor for each file type and a hash of its bytes."""
from __future__ import annotations

import hashlib
import json
import os

import gguf
import numpy as np
import pytest

from edgelm.commands.quantize import quantize_file
from edgelm.quant import kquant_writer, recipes
from edgelm.quant.writers import encode
from tests.conftest import run_cli
from tests.quant_model import T, importance_case, tensor_digests, write_model

GOLDEN = json.loads(open(os.path.join(os.path.dirname(__file__), "golden", "kquant_llamacpp.json")).read())
MODELS = {label: entry for label, entry in GOLDEN.items() if label != "importance"}
CASES = [(label, ft) for label in MODELS for ft in MODELS[label]["files"]]


@pytest.fixture(scope="module")
def f16_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("kquant")
    paths = {}
    for label, entry in MODELS.items():
        paths[label] = d / f"{label}-f16.gguf"
        assert write_model(paths[label], T.F16, shape=entry["shape"]) == entry["digest"], "not llama.cpp's input"
    return paths


@pytest.mark.parametrize("label, file_type", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_file_equals_llamacpp(f16_files, tmp_path, label, file_type):
    """Every tensor: llama.cpp's type (the recipe) and llama.cpp's bytes (the writers)."""
    out = tmp_path / "out.gguf"
    quantize_file(str(f16_files[label]), str(out), file_type)
    got = tensor_digests(out)
    want = GOLDEN[label]["files"][file_type]
    assert sorted(got) == sorted(want)
    wrong_type = {n: (got[n][0], want[n][0]) for n in want if got[n][0] != want[n][0]}
    assert not wrong_type, f"types (edgelm, llama.cpp): {wrong_type}"
    wrong_bytes = [n for n in want if got[n][1] != want[n][1]]
    assert not wrong_bytes, f"bytes differ from llama.cpp's: {wrong_bytes}"


IMPORTANCE = sorted(GOLDEN["importance"])


@pytest.mark.parametrize("case", IMPORTANCE)
def test_rows_equal_ggml_with_and_without_importance(case):
    """llama.cpp's two searches: the reference one, and the one weighted by an importance matrix
    (quantize_row_X_impl; K-quants and Q4_0 ... Q5_1), on rows with degenerate cases and weights with zeros:
    the same blocks as ggml_quantize_chunk's, row for row."""
    name, path = case.split(".")
    x, w = importance_case()
    raw = kquant_writer.quantize(x, name, w if path == "imatrix" else None)
    got = [hashlib.sha256(r.tobytes()).hexdigest()[:16] for r in raw]
    want = GOLDEN["importance"][case]
    assert got == want, [i for i, (a, b) in enumerate(zip(got, want)) if a != b]


@pytest.mark.parametrize("name", sorted(kquant_writer.BLOCK_BYTES))
def test_blocks_round_trip_through_gguf_py(name):
    """What the writer emits decodes (gguf-py) close to its input, including degenerate rows."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 512)).astype(np.float32)
    x[1] = 0
    x[2] = 0.75
    x[3, ::3] = 0
    x[4] *= 1e-30                    # below float16's range: the scales round to 0
    raw = encode(x, T[name])
    assert raw.shape == (6, 2 * kquant_writer.BLOCK_BYTES[name])
    y = gguf.quants.dequantize(raw, T[name])
    assert np.all(np.isfinite(y))
    assert np.array_equal(y[1], x[1]) and np.abs(y[4]).max() <= 1e-30
    bits = {"Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6}[name]
    for r in (0, 3, 5):
        rel = np.sqrt(np.mean((y[r] - x[r]) ** 2)) / np.std(x[r])
        assert rel < 1.6 * 2.0 ** -bits, (name, r, rel)      # ~ a uniform quantizer's error at this width
    assert np.allclose(y[2], 0.75, rtol=0.02)


def test_half_rounding_equals_numpy():
    """The super-block scales go through float16 as numpy (and ggml) round them: to nearest, ties to even,
    subnormals, overflow to inf."""
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.standard_normal(20000) * np.exp(rng.uniform(-25, 12, 20000)),
                        [0.0, -0.0, 65504, 65519.99, 65520, 1e9, 2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26,
                         5.96e-8, 6.1e-5, np.inf, -np.inf]]).astype(np.float32)
    # ties: the float32 values halfway between neighbouring halves (exact: 12 significant bits), and next to them
    codes = np.arange(1, 0x7BFF, 37, dtype=np.uint16)
    lo = codes.view(np.float16).astype(np.float64)
    hi = (codes + 1).view(np.float16).astype(np.float64)
    mid = ((lo + hi) / 2).astype(np.float32)
    v = np.concatenate([v, mid, np.nextafter(mid, np.float32(0)), np.nextafter(mid, np.float32(np.inf))])
    scratch = np.empty(1, np.float32)
    got = np.array([kquant_writer._f16_bits(f, scratch) for f in v], np.uint16)
    with np.errstate(over="ignore"):
        want = v.astype(np.float16).view(np.uint16)
    assert np.array_equal(got, want)
    back = np.array([kquant_writer._f16_value(int(b), scratch) for b in want], np.float32)
    assert np.array_equal(back, want.view(np.float16).astype(np.float32))


def test_recipe_rules_by_name():
    shape = recipes.ModelShape("llama", 32, 32, 8, 0, tied_output=True, n_attn_v=32)
    more = [i for i in range(32) if recipes.tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", 4096, shape) == T.Q6_K]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]   # use_more_bits at n = 32
    assert recipes.tensor_type("q4_k_m", "token_embd.weight", 4096, shape) == T.Q6_K        # tied: the output
    assert recipes.tensor_type("q4_k_m", "blk.0.attn_q.weight", 4000, shape) == T.Q5_0      # rows of 4000
    assert recipes.tensor_type("q4_k_m", "blk.0.attn_q.weight", 4001, shape) == T.F16
    assert recipes.tensor_type("q2_k", "blk.5.attn_v.weight", 4096, shape) == T.Q4_K        # 4 heads per KV head
    moe = recipes.ModelShape("llama", 32, 32, 8, 8, tied_output=False, n_attn_v=32)      # Mixtral's shape
    assert recipes.tensor_type("q4_k_m", "blk.0.attn_v.weight", 4096, moe) == T.Q8_0
    assert recipes.tensor_type("q4_k_m", "blk.0.attn_k.weight", 4096, moe) == T.Q8_0
    assert recipes.tensor_type("q4_k_m", "blk.0.attn_output.weight", 4096, moe) == T.Q5_K
    assert recipes.tensor_type("q3_k_l", "blk.0.attn_output.weight", 4096, moe) == T.Q3_K   # not bumped there
    assert recipes.tensor_type("q4_k_m", "blk.3.ffn_down_exps.weight", 14336, moe) == T.Q6_K  # its layer's rule
    # the legacy file types: Q6_K output; Q4_1 for Q4_0's first ffn_down eighth with an importance matrix only
    assert recipes.tensor_type("q4_0", "output.weight", 4096, shape) == T.Q6_K
    assert recipes.tensor_type("q8_0", "output.weight", 4096, shape) == T.Q8_0
    assert recipes.tensor_type("q4_0", "blk.3.ffn_down.weight", 4096, shape) == T.Q4_0
    assert recipes.tensor_type("q4_0", "blk.3.ffn_down.weight", 4096, shape, has_imatrix=True) == T.Q4_1
    assert recipes.tensor_type("q4_0", "blk.4.ffn_down.weight", 4096, shape, has_imatrix=True) == T.Q4_0
    assert recipes.tensor_type("q4_0", "output.weight", 4096, shape, pure=True) == T.Q4_0


def test_quantize_cli_names_the_file_types(f16_files, tmp_path):
    p = run_cli("quantize", str(f16_files["deep"]), str(tmp_path / "o.gguf"), "q4_k_x")
    assert p.returncode == 1 and "q4_k_m" in p.stderr and "q3_k_l" in p.stderr and p.stderr.count("\n") == 1
    p = run_cli("quantize", str(f16_files["odd_rows"]), str(tmp_path / "o.gguf"), "Q4_K")   # alias of Q4_K_M
    assert p.returncode == 0, p.stderr
    types = {t.name: T(t.tensor_type).name for t in gguf.GGUFReader(str(tmp_path / "o.gguf")).tensors}
    assert types == {n: v[0] for n, v in GOLDEN["odd_rows"]["files"]["q4_k_m"].items()}
    # a Q4_K_M file cannot become Q6_K (lower precision in): refused, nothing written
    p = run_cli("quantize", str(tmp_path / "o.gguf"), str(tmp_path / "o6.gguf"), "q6_k")
    assert p.returncode == 1 and "lower precision" in p.stderr and not (tmp_path / "o6.gguf").exists()


def test_quantize_to_f16_is_the_dequantized_weights(tmp_path):
    """`quantize ... f16` writes every matrix as its blocks decode (gguf-py), rounded to float16: the float
    base of a KL comparison."""
    src, out = tmp_path / "q4_0.gguf", tmp_path / "f16.gguf"
    write_model(src, T.Q4_0)
    quantize_file(str(src), str(out), "f16")
    a = {t.name: t for t in gguf.GGUFReader(str(src)).tensors}
    for t in gguf.GGUFReader(str(out)).tensors:
        want = gguf.quants.dequantize(a[t.name].data, a[t.name].tensor_type)
        if T(a[t.name].tensor_type) == T.Q4_0:
            assert T(t.tensor_type) == T.F16
            want = want.astype(np.float16)
        assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), t.name
