"""`edgelm quantize` against gguf-py: the blocks equal gguf.quants.quantize of the same values, byte for byte."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from .conftest import run_cli


@pytest.fixture(scope="module")
def q4_0_file(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "smollm2-q4_0.gguf"
    p = run_cli("quantize", smollm2_path, str(out), "q4_0", "--pure")      # llama.cpp's mix: test_kquant
    assert p.returncode == 0, p.stderr
    return out


def test_blocks_equal_reference_quantizer(smollm2_path, q4_0_file):
    src, dst = GGUFReader(smollm2_path), GGUFReader(str(q4_0_file))
    src_t = {t.name: t for t in src.tensors}
    assert [t.name for t in dst.tensors] == list(src_t)
    checked = 0
    for t in dst.tensors:
        s = src_t[t.name]
        if len(s.shape) == 1:                       # norms stay as they were
            assert t.tensor_type == s.tensor_type
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(s.data))
            continue
        assert t.tensor_type == Q.Q4_0, t.name
        if checked < 12 or t.name == "token_embd.weight":
            expect = ref_quantize(ref_dequantize(np.asarray(s.data), s.tensor_type), Q.Q4_0)
            np.testing.assert_array_equal(np.asarray(t.data), expect, err_msg=t.name)
            checked += 1
    assert checked >= 12


def test_metadata_kept_and_file_type_set(smollm2_path, q4_0_file):
    src, dst = GGUFReader(smollm2_path), GGUFReader(str(q4_0_file))
    for k, f in src.fields.items():
        if k.startswith("GGUF.") or k == "general.file_type":
            continue
        assert k in dst.fields, k
        assert dst.fields[k].types == f.types, k
        a, b = f.contents(), dst.fields[k].contents()
        assert a == b, k
    assert dst.fields["general.file_type"].contents() == 2       # LlamaFileType.MOSTLY_Q4_0


def test_quantized_model_runs(q4_0_file):
    p = run_cli("generate", "-m", str(q4_0_file), "The capital of France is", "-n", "8", "--temp", "0")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip()


def _error(p, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    line = p.stderr.strip().splitlines()[-1]
    for n in needles:
        assert n in line, line


def test_errors_leave_nothing_behind(smollm2_path, tmp_path):
    out = tmp_path / "x.gguf"
    _error(run_cli("quantize", smollm2_path, str(out), "q3_k_x"), "unknown quantization type 'q3_k_x'", "q4_k_m")
    _error(run_cli("quantize", smollm2_path, str(out), "q8_0"), "is Q4_1", "lower precision than Q8_0")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    _error(run_cli("quantize", str(bad), str(out), "q4_0"), str(bad), "not a GGUF")
    assert list(tmp_path.iterdir()) == [bad]          # no output, no partial file
