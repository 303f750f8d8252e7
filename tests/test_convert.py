"""`edgelm convert` + the runtime, per architecture, against transformers.

tests/data/tiny/<name>/ holds a tiny random Hugging Face checkpoint of each family and transformers' float32
logits on its own tokens (tools/make_tiny_checkpoints.py makes them; see its docstring to regenerate). Each
test converts the checkpoint with edgelm's converter and compares edgelm's logits with those.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest

import edgelm
from edgelm.commands.convert import convert
from edgelm.errors import EdgeLMError, UnsupportedError
from edgelm.gguf_file import GGUFFile

from .conftest import run_cli

TINY = Path(__file__).parent / "data" / "tiny"
ARCHS = sorted(p.name for p in TINY.iterdir() if (p / "config.json").exists())
EXPECTED_ARCH = {"gpt2": "gpt2", "llama": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2",
                 "qwen3": "qwen3", "qwen3_moe": "qwen3moe", "phi3": "phi3", "gemma3": "gemma3", "gpt_oss": "gpt-oss"}


def test_every_family_has_a_checkpoint():
    assert ARCHS == sorted(EXPECTED_ARCH)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _compare(gguf_path, name, kv_type):
    ref = np.load(TINY / name / "reference.npz")
    ids, want = ref["ids"], ref["logits"]
    m = edgelm.load(str(gguf_path), n_ctx=64, kv_type=kv_type)
    prefill = m.eval_logits(ids)
    m.cache.clear()
    decode = np.stack([m.decode_one(int(t)) for t in ids])      # one token at a time: the decode kernels
    out = {}
    for label, got in (("prefill", prefill), ("decode", decode)):
        p = np.exp(_log_softmax(want))
        out[label] = dict(top1=float((got.argmax(-1) == want.argmax(-1)).mean()),
                          rel=float(np.abs(got - want).max() / want.std()),
                          kl=float((p * (_log_softmax(want) - _log_softmax(got))).sum(-1).mean()))
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Lazily converted files, keyed by (name, outtype)."""
    root = tmp_path_factory.mktemp("converted")
    cache = {}

    def get(name, outtype):
        if (name, outtype) not in cache:
            out = root / f"{name}-{outtype}.gguf"
            convert(str(TINY / name), str(out), outtype)
            cache[name, outtype] = out
        return cache[name, outtype]
    return get


@pytest.mark.parametrize("name", ARCHS)
def test_f32_conversion_matches_transformers(converted, name):
    path = converted(name, "f32")
    assert GGUFFile(str(path)).architecture == EXPECTED_ARCH[name]
    for label, r in _compare(path, name, "f32").items():
        assert r["top1"] == 1.0, (label, r)
        assert r["rel"] <= 1e-3, (label, r)


@pytest.mark.parametrize("name", ARCHS)
def test_q8_0_conversion_tracks_transformers(converted, name):
    for label, r in _compare(converted(name, "q8_0"), name, "f16").items():
        assert r["top1"] >= 0.9, (label, r)
        assert r["kl"] <= 1e-3, (label, r)


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe"])
def test_mxfp4_experts_track_transformers(converted, name):
    path = converted(name, "mxfp4_moe")
    types = {t.name: t.ggml_type for t in GGUFFile(str(path)).tensors.values()}
    assert types["blk.0.ffn_up_exps.weight"] == gguf.GGMLQuantizationType.MXFP4
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    for label, r in _compare(path, name, "f16").items():
        assert r["top1"] >= 0.85, (label, r)
        assert r["kl"] <= 1e-3, (label, r)


@pytest.mark.parametrize("name", ARCHS)
def test_written_files_follow_gguf_py(converted, name):
    """gguf-py's own reader loads the file; every tensor name is one llama.cpp knows for the architecture;
    norms, biases and routers are float32; quantized blocks equal gguf.quants.quantize of the f32 file."""
    f32, q8 = converted(name, "f32"), converted(name, "q8_0")
    r32, r8 = gguf.GGUFReader(str(f32)), gguf.GGUFReader(str(q8))
    arch = EXPECTED_ARCH[name]
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    known = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch_id]}
    hp = json.loads((TINY / name / "config.json").read_text())
    n_layer = hp.get("num_hidden_layers", hp.get("n_layer"))
    by_name = {t.name: t for t in r32.tensors}
    for t in r8.tensors:
        stem = t.name.rsplit(".", 1)[0]
        assert any(stem == k.format(bid=b) for k in known for b in range(n_layer)), t.name
        src = by_name[t.name]
        if t.name.endswith(("_norm.weight", ".bias", "ffn_gate_inp.weight", "position_embd.weight",
                            "rope_freqs.weight", "attn_sinks.weight")) or len(t.shape) == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, t.name
            np.testing.assert_array_equal(np.asarray(t.data), np.asarray(src.data))
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, t.name
            want = gguf.quants.quantize(np.asarray(src.data, dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
            assert np.asarray(t.data).tobytes() == want.tobytes(), t.name
    assert r8.fields["general.architecture"].contents() == arch


def test_gpt2_and_llama_layout_rules(converted):
    """GPT-2's Conv1D weights are transposed to (out, in); llama's Q/K rows are permuted for llama.cpp's
    adjacent-pair rotation (checked against the checkpoint with an independent reshape)."""
    from edgelm.commands.convert.safetensors import Checkpoint
    g = GGUFFile(str(converted("gpt2", "f32")))
    ck = Checkpoint(TINY / "gpt2")
    w = g.tensor("blk.0.attn_qkv.weight").view(np.float32)
    np.testing.assert_array_equal(w, ck.load("transformer.h.0.attn.c_attn.weight").T)
    g = GGUFFile(str(converted("llama", "f32")))
    ck = Checkpoint(TINY / "llama")
    q = ck.load("model.layers.0.self_attn.q_proj.weight")                 # (n_head * hd, d), halves per head
    n_head = json.loads((TINY / "llama" / "config.json").read_text())["num_attention_heads"]
    hd = q.shape[0] // n_head
    heads = q.reshape(n_head, hd, -1)
    interleaved = np.stack([heads[:, :hd // 2], heads[:, hd // 2:]], axis=2).reshape(q.shape)
    np.testing.assert_array_equal(g.tensor("blk.0.attn_q.weight").view(np.float32), interleaved)


def test_gemma_norms_are_stored_plus_one(converted):
    from edgelm.commands.convert.safetensors import Checkpoint
    g = GGUFFile(str(converted("gemma3", "f32")))
    ck = Checkpoint(TINY / "gemma3")
    for hf, ours in (("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                     ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                     ("model.norm.weight", "output_norm.weight")):
        np.testing.assert_array_equal(g.tensor(ours).view(np.float32).ravel(), ck.load(hf) + np.float32(1))


# -- bad input: one clear error, nothing left behind -----------------------------------------------

def _copy(name, tmp_path) -> Path:
    d = tmp_path / name
    shutil.copytree(TINY / name, d)
    return d


def _no_output(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_pickled_checkpoints_are_refused(tmp_path):
    d = _copy("llama", tmp_path)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out = tmp_path / "out" / "x.gguf"
    out.parent.mkdir()
    with pytest.raises(EdgeLMError, match="pytorch_model.bin.*does not unpickle"):
        convert(str(d), str(out), "f16")
    _no_output(out)


def test_unsupported_architecture_is_named(tmp_path):
    d = _copy("llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="MambaForCausalLM"):
        convert(str(d), str(tmp_path / "x.gguf"), "f16")


def test_truncated_safetensors_is_named(tmp_path):
    d = _copy("llama", tmp_path)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(EdgeLMError, match="model.safetensors: tensor .* outside the file"):
        convert(str(d), str(tmp_path / "x.gguf"), "f16")


def test_missing_shard_is_named(tmp_path):
    d = _copy("qwen3_moe", tmp_path)
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(EdgeLMError, match=f"shard {shard.name} is missing"):
        convert(str(d), str(tmp_path / "x.gguf"), "f16")


def test_failure_midway_leaves_nothing(tmp_path):
    out = tmp_path / "x.gguf"

    def boom(name, i, n):
        if i == 3:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        convert(str(TINY / "qwen3"), str(out), "q8_0", progress=boom)
    _no_output(out)


def test_cli_convert_and_errors(tmp_path):
    out = tmp_path / "tiny.gguf"
    r = run_cli("convert", str(TINY / "qwen2"), "-o", str(out), "--outtype", "q8_0")
    assert r.returncode == 0, r.stderr
    assert "qwen2" in r.stderr and out.exists()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask     # as any new file, not mkstemp's 0600
    r = run_cli("generate", "-m", str(out), "-n", "4", "--temp", "0", "hello")
    assert r.returncode == 0, r.stderr
    r = run_cli("convert", str(tmp_path / "nowhere"), "-o", str(tmp_path / "y.gguf"))
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and "nowhere" in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe", "gpt2"])
def test_quantize_of_converted_file_equals_converting_quantized(converted, name, tmp_path):
    """`edgelm quantize` on the f32 file gives the same tensor bytes as converting straight to q8_0 (both are
    gguf.quants on the same floats), 3-D expert tensors included; routers, sinks and positions stay f32."""
    from edgelm.commands.quantize import quantize_file
    out = tmp_path / "q.gguf"
    quantize_file(str(converted(name, "f32")), str(out), "q8_0")
    _assert_same_tensors(GGUFFile(str(out)), GGUFFile(str(converted(name, "q8_0"))))


def _assert_same_tensors(a: GGUFFile, b: GGUFFile) -> None:
    assert set(a.tensors) == set(b.tensors)
    for t in a.tensors.values():
        assert t.ggml_type == b.tensors[t.name].ggml_type, t.name
        assert a.tensor(t.name).tobytes() == b.tensor(t.name).tobytes(), t.name


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_convert_to_a_k_quant_mix_equals_quantize(converted, name, tmp_path):
    """`convert --outtype q4_k_m` and `quantize f32-file q4_k_m` take their types from one table (the tiny
    checkpoints' rows of 64 take llama.cpp's fallbacks) and write the same bytes; the file runs."""
    from edgelm.commands.quantize import quantize_file
    out = tmp_path / "q.gguf"
    quantize_file(str(converted(name, "f32")), str(out), "q4_k_m")
    a, b = GGUFFile(str(out)), GGUFFile(str(converted(name, "q4_k_m")))
    _assert_same_tensors(a, b)
    assert a.metadata["general.file_type"] == b.metadata["general.file_type"] == 15     # MOSTLY_Q4_K_M
    r = run_cli("generate", "-m", str(out), "-n", "4", "--temp", "0", "hello")
    assert r.returncode == 0, r.stderr
