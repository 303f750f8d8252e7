"""`edgelm imatrix` (llama-imatrix's method and file format) and `quantize --imatrix`.

The collected sums are checked against NumPy where the activations are known without edgelm: the input of
layer 0's attention projections is the RMS-normed token embedding rows as gguf-py decodes them."""
from __future__ import annotations

import gguf
import numpy as np
import pytest

import edgelm
from edgelm.evaluate import imatrix
from edgelm.quant import kquant_writer
from tests.conftest import run_cli
from tests.quant_model import RMS_EPS, T, write_model

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
    for args, rule in [
        (["quantize", str(model), str(dst), "q4_k_m", "--imatrix", str(other)], "has 1 x 100 values"),
        (["quantize", str(model), str(dst), "q4_k_m", "--imatrix", str(text)], "not a readable imatrix"),
        (["imatrix", "-m", str(model), "-f", str(short), "-o", str(dst), "-c", str(N_CTX)], "needs at least 32"),
    ]:
        p = run_cli(*args)
        assert p.returncode == 1 and p.stderr.count("\n") == 1 and rule in p.stderr, (args, p.stderr)
    assert not dst.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["other.gguf", "short.txt"]
