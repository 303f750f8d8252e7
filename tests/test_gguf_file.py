"""The GGUF reader against gguf-py's GGUFReader (the reference), and bad files against clear errors."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from edgelm.errors import GGUFError, UnsupportedError
from edgelm.gguf_file import GGUFFile

from .conftest import run_cli


def test_metadata_and_tensors_equal_gguf_reader(smollm2_path):
    ours = GGUFFile(smollm2_path)
    ref = GGUFReader(smollm2_path)
    assert set(ours.metadata) == {k for k in ref.fields if not k.startswith("GGUF.")}
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        value = field.contents()
        mine = ours.metadata[key]
        if isinstance(mine, np.ndarray):
            np.testing.assert_array_equal(mine, np.asarray(value), err_msg=key)
        elif isinstance(mine, float):
            assert mine == pytest.approx(value, rel=1e-7), key
        else:
            assert mine == value, key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert list(info.shape) == [int(s) for s in t.shape], t.name
        assert info.ggml_type == int(t.tensor_type), t.name
        assert info.offset == t.data_offset, t.name
        # the view is zero-copy over the same bytes
        view = ours.tensor(t.name)
        assert view.base is not None and not view.flags.owndata
        np.testing.assert_array_equal(view.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def _write_gguf(path, arch="llama", tensors=None, extra=None):
    w = GGUFWriter(str(path), arch=arch)
    w.add_uint32(f"{arch}.block_count", 1)
    for k, v in (extra or {}).items():
        w.add_string(k, v)
    for name, (arr, raw_dtype) in (tensors or {"token_embd.weight": (np.ones((4, 32), np.float32), None)}).items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _one_line_error(proc, *needles):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gguf"
    with pytest.raises(GGUFError, match="no such file"):
        GGUFFile(p)
    _one_line_error(run_cli("info", str(p)), str(p))


def test_not_a_gguf(tmp_path):
    p = tmp_path / "notes.gguf"
    p.write_text("just some text that is certainly not a model file\n" * 3)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(p)
    _one_line_error(run_cli("info", str(p)), str(p), "not a GGUF")
    _one_line_error(run_cli("generate", "-m", str(p), "hello"), str(p), "not a GGUF")


@pytest.mark.parametrize("keep", [10, 100, 5000, 1_000_000])
def test_truncated_real_file(tmp_path, smollm2_path, keep):
    p = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(keep))
    with pytest.raises(GGUFError, match="truncated|outside the file|not a GGUF"):
        GGUFFile(p)


def test_tensor_data_outside_file(tmp_path, smollm2_path):
    # Cut the real file inside its tensor data: the header is intact, the last tensors are not.
    p = tmp_path / "short.gguf"
    size = GGUFFile(smollm2_path).file_size
    with open(smollm2_path, "rb") as f:
        p.write_bytes(f.read(size - 4096))
    with pytest.raises(GGUFError, match=r"tensor \S+ data lies outside the file"):
        GGUFFile(p)


def test_corrupted_string_length(tmp_path):
    p = _write_gguf(tmp_path / "bad.gguf", extra={"general.name": "x" * 40})
    data = bytearray(p.read_bytes())
    i = data.find(b"general.name") + len(b"general.name") + 4   # past the key and its value type
    data[i:i + 8] = (10**15).to_bytes(8, "little")               # absurd string length
    p.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="truncated while reading value of general.name"):
        GGUFFile(p)


def test_unknown_architecture(tmp_path):
    p = _write_gguf(tmp_path / "arch.gguf", arch="fancynet")
    _one_line_error(run_cli("info", str(p)), "fancynet", "not supported")


def test_unsupported_quant_type(tmp_path):
    raw = np.zeros((4, 292), np.uint8)          # Q8_K (llama.cpp's activation type): 256 elements in 292 bytes
    p = _write_gguf(tmp_path / "q8k.gguf", tensors={"blk.0.attn_q.weight": (raw, GGMLQuantizationType.Q8_K)})
    with pytest.raises(UnsupportedError, match="blk.0.attn_q.weight.*Q8_K"):
        GGUFFile(p)


def test_missing_tensor_named(tmp_path):
    p = _write_gguf(tmp_path / "few.gguf", extra={"tokenizer.ggml.model": "gpt2"})
    from edgelm.config import ModelConfig
    g = GGUFFile(p)
    with pytest.raises(GGUFError, match="llama.embedding_length"):
        ModelConfig.from_gguf(g)
