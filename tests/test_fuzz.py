"""Untrusted GGUF files: mutated small models must end in success or a clean one-line EdgeLMError, never a
traceback, a hang, a crash or a runaway allocation (tools/fuzz_gguf.py runs the cases in a worker process).

Also one test per failure the first fuzzing found (issue 9), each checking the exact rule in the message, and
a replay of every case kept in tests/data/fuzz_regressions/."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.commands.describe import architecture_facts, describe
from edgelm.errors import ContextError, EdgeLMError, GGUFError

from .conftest import load_tool

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "tests" / "data" / "fuzz_regressions"


F = load_tool("fuzz_gguf")


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return F.build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


def _failures_text(report) -> str:
    return "\n".join(f"{r['outcome']}: {desc}\n    " + "\n    ".join(r.get("errors", []))[:3000]
                     for desc, r, _ in report.failures)


# -- the seeds themselves work, so the mutations test something --------------------------------------------------

@pytest.mark.parametrize("kind", F.SEED_KINDS)
def test_seed_loads_and_generates(seeds, tmp_path, kind):
    p = tmp_path / f"{kind}.gguf"
    p.write_bytes(seeds[kind])
    assert F.run_case(str(p)) == {"outcome": "ok", "errors": []}
    assert len(p.read_bytes()) < 64 * 1024


def test_writer_round_trips_the_seeds(seeds):
    for data in seeds.values():
        assert F.serialize(F.parse(data))[0] == data


# -- the fuzz run ------------------------------------------------------------------------------------------------

def test_fuzz_a_thousand_mutations():
    """1000 seeded mutations (~8 s): no traceback, hang (10 s), crash or case over 1 GiB of RSS."""
    report = F.fuzz(1000, seed=9, timeout=10.0, max_rss_mib=1024.0)
    print(report.summary())
    assert sum(report.counts.values()) == 1000
    assert not report.failures, _failures_text(report)
    assert report.counts["ok"] > 0 and report.counts["error"] > 0     # both kinds of outcome are exercised


@pytest.mark.slow
def test_fuzz_ten_thousand_mutations():
    report = F.fuzz(10000, seed=1, timeout=10.0, max_rss_mib=1024.0)
    assert not report.failures, _failures_text(report)


def test_regression_corpus_is_clean():
    files = sorted(REGRESSIONS.glob("*.gguf"))
    if not files:
        pytest.skip("no regression files")
    assert all(f.stat().st_size < 64 * 1024 for f in files)
    report = F.replay(files)
    assert not report.failures, _failures_text(report)


def test_runner_reports_a_hang_and_recovers(tmp_path):
    """The harness itself: a case that never answers is a hang, and the next case runs in a fresh worker."""
    runner = F.Runner(timeout=1.0)
    try:
        assert runner.run(F.SELFTEST_HANG)["outcome"] == "hang"
        ok = tmp_path / "seed.gguf"
        F.build_seed("llama", ok)
        runner.timeout = 60.0
        assert runner.run(str(ok))["outcome"] == "ok"
    finally:
        runner.close()


def test_runner_does_not_count_compiling_as_hanging():
    """A case that is the first to reach some kernel compiles it (seconds; far more on a loaded machine): the
    worker's compile notices stop the hang clock, and the compile time is reported apart from the case's."""
    runner = F.Runner(timeout=1.0)
    try:
        r = runner.run(F.SELFTEST_COMPILE)                 # "compiles" for 2 s, then fails to open the path
        assert r["outcome"] == "error" and r["compile_seconds"] >= 2.0 and r["seconds"] < 1.0
    finally:
        runner.close()


# -- the failures of issue 9, one by one ------------------------------------------------------------------------

def _mutated(seeds, tmp_path, kind: str, edit) -> str:
    doc = F.parse(seeds[kind])
    edit(doc)
    p = tmp_path / f"{kind}-mutated.gguf"
    p.write_bytes(F.serialize(doc)[0])
    return str(p)


def _set(doc, key: str, vtype: int, value):
    kv = doc.get(key)
    if kv is None:
        doc.kvs.append(F.KV(key, vtype, value))
    else:
        kv.vtype, kv.value = vtype, value


def _refused(path: str, *needles: str) -> str:
    """load and info both fail with one GGUFError line naming the file and the needles."""
    for fn in (edgelm.load, describe, architecture_facts):
        with pytest.raises(EdgeLMError) as e:
            fn(path)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(path), msg
        for n in needles:
            assert n in msg, msg
    return msg


def test_duplicate_block_count_is_refused(seeds, tmp_path):
    # the second copy of block_count was 0xFFFFFFFF: `edgelm info` looped over 4 billion layers
    p = _mutated(seeds, tmp_path, "gpt2", lambda d: d.kvs.append(F.KV("gpt2.block_count", F.U32, 0xFFFFFFFF)))
    _refused(p, "key gpt2.block_count appears twice")


@pytest.mark.parametrize("n_layer", [0xFFFFFFFF, 3, 0])
def test_block_count_bound_by_the_tensors(seeds, tmp_path, n_layer):
    p = _mutated(seeds, tmp_path, "gemma3", lambda d: _set(d, "gemma3.block_count", F.U32, n_layer))
    _refused(p, "gemma3.block_count", str(n_layer))


def test_layer_tensor_beyond_block_count(seeds, tmp_path):
    def edit(d):
        d.tensors[-1].name = "blk.7.attn_q.weight"
    _refused(_mutated(seeds, tmp_path, "llama", edit), "blk.7.attn_q.weight", "layer 7", "block_count = 2")


@pytest.mark.parametrize("value,rule", [(0xFFFFFFFF, "must be in"), (100000, "at most the head size 8"), (10, "at most the head size 8"),
                                        (7, "must be even")])
def test_rope_dimension_count(seeds, tmp_path, value, rule):
    # 0xFFFFFFFF tried to allocate 16 GiB, 100000 broke broadcasting in RoPE
    p = _mutated(seeds, tmp_path, "llama", lambda d: _set(d, "llama.rope.dimension_count", F.U32, value))
    _refused(p, f"llama.rope.dimension_count = {value}", rule)


@pytest.mark.parametrize("key,vtype,value,rule", [
    ("llama.attention.head_count", F.U32, 0, "must be in 1.."),
    ("llama.attention.head_count", F.U32, 3, "must be a multiple of"),
    ("llama.attention.head_count_kv", F.U32, 3, "must be a multiple of"),
    ("llama.embedding_length", F.U32, 0, "must be in 1.."),
    ("llama.embedding_length", F.F32, math.nan, "must be an integer"),
    ("llama.block_count", F.BOOL, 1, "must be an integer"),
    ("llama.context_length", F.U64, 2**64 - 1, "must be in 1.."),
    ("llama.feed_forward_length", F.I32, -1, "must be in 1.."),
    ("llama.attention.layer_norm_rms_epsilon", F.F32, 0.0, "must be > 0"),
    ("llama.attention.layer_norm_rms_epsilon", F.F32, math.nan, "must be finite"),
    ("llama.rope.freq_base", F.F32, math.inf, "must be finite"),
    ("llama.rope.freq_base", F.F32, 0.0, "must be > 1"),
    ("llama.rope.scaling.factor", F.F32, -1.0, "must be > 0"),
    ("llama.attention.sliding_window", F.I32, -1, "must be in 0.."),
    ("llama.expert_count", F.F64, 1e9, "must be an integer"),
])
def test_hostile_hyper_parameters(seeds, tmp_path, key, vtype, value, rule):
    p = _mutated(seeds, tmp_path, "llama", lambda d: _set(d, key, vtype, value))
    _refused(p, key, rule)


def test_window_larger_than_context_is_fine(seeds, tmp_path):
    p = _mutated(seeds, tmp_path, "gemma3", lambda d: _set(d, "gemma3.attention.sliding_window", F.U32, 10**6))
    m = edgelm.load(p)
    assert isinstance(m.generate("the", max_tokens=2, temperature=0), str)


def test_ints_where_floats_belong_are_fine(seeds, tmp_path):
    p = _mutated(seeds, tmp_path, "llama", lambda d: _set(d, "llama.rope.freq_base", F.U32, 10000))
    assert edgelm.load(p).config.rope_base == 10000.0


def test_nested_array_is_refused_without_recursion_error(seeds, tmp_path):
    value = (F.U8, [1])
    for _ in range(600):          # ~7 KB of nesting: RecursionError before
        value = (F.ARR, [value])
    p = _mutated(seeds, tmp_path, "llama", lambda d: d.kvs.append(F.KV("general.nested", F.ARR, value)))
    _refused(p, "general.nested", "nests arrays deeper than")


def test_vocabulary_shorter_than_embedding_table(seeds, tmp_path):
    # IndexError before; llama.cpp refuses the mismatch too (check_tensor_dims on token_embd.weight)
    def edit(d):
        for k in ("tokens", "scores", "token_type"):
            kv = d.get("tokenizer.ggml." + k)
            kv.value = (kv.value[0], kv.value[1][:200])
    _refused(_mutated(seeds, tmp_path, "llama", edit), "tokenizer.ggml.tokens has 200 tokens", "token_embd.weight")


@pytest.mark.parametrize("key,value,needle", [
    ("scores", (F.STR, None), "must be an array of numbers"),      # "could not convert string to float" before
    ("token_type", (F.F32, None), "must be an array of integers"),
    ("merges", (F.U32, None), "must be an array of strings"),
])
def test_vocabulary_arrays_of_the_wrong_type(seeds, tmp_path, key, value, needle):
    kind = "gpt2" if key == "merges" else "llama"

    def edit(d):
        kv = d.get("tokenizer.ggml." + key)
        n = len(kv.value[1])
        items = {F.STR: [f"{i}x" for i in range(n)], F.F32: [1.0] * n, F.U32: list(range(n))}[value[0]]
        kv.value = (value[0], items)
    p = _mutated(seeds, tmp_path, kind, edit)
    with pytest.raises(GGUFError) as e:
        edgelm.load(p)
    assert str(e.value).startswith(p) and needle in str(e.value) and "\n" not in str(e.value)


def test_vocabulary_arrays_of_unequal_length(seeds, tmp_path):
    def edit(d):
        kv = d.get("tokenizer.ggml.scores")
        kv.value = (kv.value[0], kv.value[1][:-1])
    with pytest.raises(GGUFError, match="scores has .* entries for .* tokens"):
        edgelm.load(_mutated(seeds, tmp_path, "llama", edit))


def test_alignment_must_be_an_integer(seeds, tmp_path):
    p = _mutated(seeds, tmp_path, "llama", lambda d: _set(d, "general.alignment", F.F32, 32.0))
    with pytest.raises(GGUFError, match="general.alignment must be an integer"):
        edgelm.load(p)


@pytest.mark.parametrize("dim", [0, 2**63, 2**64 - 1])
def test_tensor_dims_checked_before_use(seeds, tmp_path, dim):
    def edit(d):
        d.tensors[0].dims[-1] = dim
    with pytest.raises(GGUFError, match="token_embd.weight"):
        edgelm.load(_mutated(seeds, tmp_path, "llama", edit))


def test_count_larger_than_the_file_is_refused_before_reading(seeds, tmp_path):
    def edit(d):
        d.n_kv = 2**63
    with pytest.raises(GGUFError, match="header is corrupted"):
        edgelm.load(_mutated(seeds, tmp_path, "llama", edit))
    data, fields = F.serialize(F.parse(seeds["llama"]))
    pos = next(p for p, _, what in fields if what == "count of tokenizer.ggml.tokens")
    p = tmp_path / "count.gguf"
    p.write_bytes(data[:pos] + (2**62).to_bytes(8, "little") + data[pos + 8:])
    with pytest.raises(GGUFError, match="claims 4611686018427387904 items, more than"):
        edgelm.load(str(p))


def test_kv_cache_larger_than_memory_is_a_context_error(seeds, tmp_path):
    from edgelm.config import ModelConfig
    from edgelm.gguf_file import GGUFFile
    from edgelm.runtime.kv_cache import make_caches
    p = tmp_path / "llama.gguf"
    p.write_bytes(seeds["llama"])
    cfg = ModelConfig.from_gguf(GGUFFile(p))
    with pytest.raises(ContextError, match=r"needs \d+\.\d GiB, more than"):
        make_caches(cfg, 2**40)
    assert make_caches(cfg, 64)[0].k.shape == (2, 64, 8)


def test_garbage_weights_end_in_one_clear_error(seeds, tmp_path):
    # weights that read as NaN (bytes no check can judge) compute NaN, not ZeroDivisionError, and generation
    # stops with an error naming the file instead of sampling from NaN
    def edit(d):
        t = next(t for t in d.tensors if t.name == "blk.1.ffn_norm.weight")
        d.data = d.data[:t.offset] + b"\xff" * 128 + d.data[t.offset + 128:]
    path = _mutated(seeds, tmp_path, "llama", edit)
    m = edgelm.load(path)
    assert np.isnan(m.eval_logits([1, 2])).any()
    with pytest.raises(EdgeLMError, match="NaN logits"):
        m.generate("the", max_tokens=2, temperature=0)
