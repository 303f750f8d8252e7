"""`edgelm imatrix` (llama-imatrix's method and file format) and `quantize --imatrix`.

The collected sums are checked against NumPy where the activations are known without edgelm: the input of
layer 0's attention projections is the RMS-normed token embedding rows as gguf-py decodes them."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import edgelm
from edgelm.commands.quantize import quantize_file
from edgelm.evaluate import imatrix
from edgelm.quant import kquant_writer
from tests.conftest import run_cli
from tests.quant_model import RMS_EPS, T, tensor_digests, write_model

N_CTX = 32
WORDS = "the of and to in river stone light north market winter garden letter music bridge".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix")
    model = d / "f16.gguf"
    write_model(model, T.F16)
    text = d / "calibration.txt"
    text.write_text(" ".join(np.random.default_rng(3).choice(WORDS, 300)))
    out = d / "imatrix.gguf"
    p = run_cli("imatrix", "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(N_CTX))
    assert p.returncode == 0, p.stderr
    return d, model, text, out


def test_sums_equal_numpy_and_the_file_is_llamacpps_format(setup):
    d, model, text, out = setup
    r = gguf.GGUFReader(str(out))
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["calibration.txt"]
    assert r.fields["imatrix.chunk_size"].contents() == N_CTX
    n_chunk = r.fields["imatrix.chunk_count"].contents()
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    mats = [t.name for t in gguf.GGUFReader(str(model)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    assert sorted(n[:-len(".in_sum2")] for n in tensors if n.endswith(".in_sum2")) == sorted(mats)
    assert all(tensors[f"{m}.counts"].reshape(-1).tolist() == [n_chunk * N_CTX] for m in mats)

    # layer 0's q/k/v input: rms_norm(embedding rows) * attn_norm, from gguf-py's reading of the file
    m = edgelm.load(str(model), n_ctx=N_CTX)
    ids = np.array(m.tokenize(text.read_text(), add_special=True))[:n_chunk * N_CTX].reshape(n_chunk, N_CTX)
    if m.tokenizer.add_bos:
        ids[:, 0] = m.tokenizer.bos_id
    w = {t.name: np.asarray(t.data, np.float64) for t in gguf.GGUFReader(str(model)).tensors}
    x = w["token_embd.weight"][ids.reshape(-1)]
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + RMS_EPS) * w["blk.0.attn_norm.weight"]
    want = (h * h).sum(0)
    for name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"):
        got = tensors[f"{name}.in_sum2"].reshape(-1)
        assert np.allclose(got, want, rtol=1e-5, atol=0), name

    values = imatrix.read(out).values
    assert np.allclose(values["blk.1.ffn_down.weight"][0],
                       tensors["blk.1.ffn_down.weight.in_sum2"].reshape(-1) / (n_chunk * N_CTX), rtol=1e-6)


def test_quantize_with_imatrix_uses_it(setup, tmp_path):
    d, model, _, out = setup
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    assert run_cli("quantize", str(model), str(plain), "q4_k_m").returncode == 0
    p = run_cli("quantize", str(model), str(weighted), "q4_k_m", "--imatrix", str(out))
    assert p.returncode == 0, p.stderr
    src = {t.name: t for t in gguf.GGUFReader(str(model)).tensors}
    a = {t.name: t for t in gguf.GGUFReader(str(plain)).tensors}
    r = gguf.GGUFReader(str(weighted))
    b = {t.name: t for t in r.tensors}
    values = imatrix.read(out).values
    for name, t in b.items():
        assert t.tensor_type == a[name].tensor_type
        same = np.array_equal(np.asarray(t.data), np.asarray(a[name].data))
        if name in values:       # the layer matrices: the weighted search, with this file's weights
            want = kquant_writer.quantize(np.asarray(src[name].data, np.float32), T(t.tensor_type).name,
                                          values[name][0])
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want) and not same, name
        else:                    # embeddings, output, norms: as without
            assert same, name
    assert r.fields["quantize.imatrix.file"].contents() == "imatrix.gguf"
    assert r.fields["quantize.imatrix.entries_count"].contents() == len(values)


def test_bad_imatrix_and_text_one_line_no_file(setup, tmp_path):
    d, model, text, out = setup
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), arch=None)
    w.add_string("general.type", "imatrix")
    w.add_tensor("blk.0.attn_q.weight.in_sum2", np.ones((1, 100), np.float32))
    w.add_tensor("blk.0.attn_q.weight.counts", np.ones((1, 1), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    dst = tmp_path / "q.gguf"
    short = tmp_path / "short.txt"
    short.write_text("the river")
    cut = tmp_path / "cut.dat"               # llama.cpp's legacy format, cut inside its first entry's values
    cut.write_bytes((GOLDEN / "imatrix_llamacpp.dat").read_bytes()[:100])
    for args, rule in [
        (["quantize", str(model), str(dst), "q4_k_m", "--imatrix", str(other)], "has 100 values"),
        (["quantize", str(model), str(dst), "q4_k_m", "--imatrix", str(text)], "not a readable imatrix"),
        (["quantize", str(model), str(dst), "q4_k_m", "--imatrix", str(cut)], "ends inside"),
        (["imatrix", "-m", str(model), "-f", str(short), "-o", str(dst), "-c", str(N_CTX)], "needs at least 32"),
    ]:
        p = run_cli(*args)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and rule in p.stderr, (args, p.stderr)
    assert not dst.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["cut.dat", "other.gguf", "short.txt"]


# llama.cpp's own imatrix of a small F16 model in both formats, and llama-quantize's files made with each
# (tools/make_imatrix_golden.py)
GOLDEN = Path(__file__).parent / "golden"
LLAMACPP = json.loads((GOLDEN / "imatrix_llamacpp.json").read_text())


@pytest.fixture(scope="module")
def llamacpp_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("imatrix_llamacpp")
    model = d / "f16.gguf"
    assert write_model(model, T.F16, edge_rows=False) == LLAMACPP["model_digest"], "not llama.cpp's input"
    text = d / "calibration.txt"
    text.write_text(LLAMACPP["text"])
    return d, model, text


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_collects_what_llama_imatrix_collects_in_its_format(llamacpp_case, fmt):
    d, model, text = llamacpp_case
    out = d / f"edgelm.{fmt}"
    p = run_cli("imatrix", "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(LLAMACPP["n_ctx"]),
                "--output-format", fmt)
    assert p.returncode == 0, p.stderr
    theirs_path = GOLDEN / f"imatrix_llamacpp.{fmt}"
    ours, theirs = imatrix.read(out), imatrix.read(theirs_path)
    assert sorted(ours.values) == sorted(theirs.values) and ours.n_chunk == theirs.n_chunk
    for name, want in theirs.values.items():
        # llama.cpp's F16 matmuls round their inputs to float16: the deeper inputs differ by that much
        np.testing.assert_allclose(ours.values[name], want, rtol=5e-3, err_msg=name)
    if fmt == "gguf":      # the same tensors, shapes and keys as llama-imatrix writes
        a, b = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(theirs_path))
        assert [(t.name, t.shape.tolist()) for t in a.tensors] == [(t.name, t.shape.tolist()) for t in b.tensors]
        assert sorted(a.fields) == sorted(b.fields)
    else:                  # the same bytes but the values and the dataset name
        assert out.stat().st_size - len("calibration.txt") == theirs_path.stat().st_size - len(theirs.dataset)


@pytest.mark.parametrize("fmt", ["gguf", "dat"])
def test_quantize_with_llamacpps_imatrix_equals_llama_quantize(llamacpp_case, fmt, tmp_path):
    d, model, _ = llamacpp_case
    for key, want in LLAMACPP["quantized"].items():
        if not key.startswith(fmt + "/"):
            continue
        out = tmp_path / "q.gguf"
        quantize_file(str(model), str(out), key.split("/")[1], imatrix=str(GOLDEN / f"imatrix_llamacpp.{fmt}"))
        got = tensor_digests(out)
        assert got == want, key


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    model = tmp_path_factory.mktemp("imatrix_moe") / "moe-f16.gguf"
    assert write_model(model, T.F16, shape=LLAMACPP["moe_shape"], edge_rows=False) == LLAMACPP["moe_digest"]
    return model


def test_experts_collect_one_row_per_expert_as_llama_imatrix(llamacpp_case, moe_model):
    """MUL_MAT_ID's entries: per expert, the squares of the rows routed to it and their count."""
    d, _, text = llamacpp_case
    out = d / "moe.gguf"
    p = run_cli("imatrix", "-m", str(moe_model), "-f", str(text), "-o", str(out), "-c", str(LLAMACPP["n_ctx"]))
    assert p.returncode == 0, p.stderr
    theirs_path = GOLDEN / "imatrix_llamacpp_moe.gguf"
    a, b = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(theirs_path))
    assert [(t.name, t.shape.tolist()) for t in a.tensors] == [(t.name, t.shape.tolist()) for t in b.tensors]
    ours, theirs = {t.name: np.asarray(t.data) for t in a.tensors}, {t.name: np.asarray(t.data) for t in b.tensors}
    n_tokens = ours["blk.0.attn_q.weight.counts"][0]           # every token, each to 2 experts
    for name, want in theirs.items():
        if name.endswith("_exps.weight.counts"):
            # llama.cpp's float16 matmuls can tip a near-tied routing choice: a token or two per layer
            assert want.sum() == ours[name].sum() == 2 * n_tokens and np.abs(ours[name] - want).max() <= 2, name
    values, want_values = imatrix.read(out).values, imatrix.read(theirs_path).values
    for name, want in want_values.items():
        got = values[name]
        assert got.shape == want.shape, name
        close = np.isclose(got, want, rtol=5e-3, atol=0)
        # all rows of a matrix agree, but an expert whose routed tokens changed by one
        assert close.all() or ("_exps." in name and close.all(axis=1).sum() >= len(want) - 2), name


def test_quantize_experts_with_llamacpps_imatrix_equals_llama_quantize(moe_model, tmp_path):
    out = tmp_path / "q.gguf"
    quantize_file(str(moe_model), str(out), "q4_k_m", imatrix=str(GOLDEN / "imatrix_llamacpp_moe.gguf"))
    got = tensor_digests(out)
    assert got == LLAMACPP["quantized"]["moe/q4_k_m"]


def test_process_output_adds_the_output_matrix_as_llama_imatrix(llamacpp_case):
    d, model, text = llamacpp_case
    out = d / "with-output.gguf"
    p = run_cli("imatrix", "-m", str(model), "-f", str(text), "-o", str(out), "-c", str(LLAMACPP["n_ctx"]),
                "--process-output")
    assert p.returncode == 0, p.stderr
    t = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    want = LLAMACPP["process_output"]
    assert t["output.weight.counts"].tolist() == want["counts"]
    np.testing.assert_allclose(t["output.weight.in_sum2"], want["in_sum2"], rtol=5e-3)
    default = imatrix.read(GOLDEN / "imatrix_llamacpp.gguf").values               # without the flag
    assert "output.weight" not in default and set(imatrix.read(out).values) == {*default, "output.weight"}
