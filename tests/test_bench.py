"""`edgelm bench`: the records' fields and arithmetic, the output formats, the cross product of comma lists,
and one-line errors. Behaviour only: no assertion depends on how fast anything runs."""
from __future__ import annotations

import csv
import io
import json
import os
import statistics

import pytest

from edgelm.commands.bench import model_desc, parse_cache_types, parse_int_list, plan_tests, stdev
from edgelm.errors import EdgeLMError
from edgelm.gguf_file import GGUFFile

from .conftest import run_cli

LLAMA_BENCH_FIELDS = {"model_filename", "model_type", "model_size", "model_n_params", "n_threads", "n_prompt",
                      "n_gen", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns", "samples_ts"}


def _ok(p):
    assert p.returncode == 0, p.stderr
    return p.stdout


@pytest.fixture(scope="module")
def json_records(smollm2_path):
    out = _ok(run_cli("bench", "-m", smollm2_path, "-p", "16", "-n", "4", "-r", "2", "-t", "1", "-o", "json"))
    return json.loads(out)   # the whole of stdout is one JSON document


def test_json_records(json_records, smollm2_path):
    assert isinstance(json_records, list) and len(json_records) == 2
    pp, tg = json_records
    assert (pp["n_prompt"], pp["n_gen"]) == (16, 0)
    assert (tg["n_prompt"], tg["n_gen"]) == (0, 4)
    size = os.path.getsize(smollm2_path)
    for r in json_records:
        assert LLAMA_BENCH_FIELDS | {"peak_rss_bytes", "load_s"} <= set(r)
        assert r["model_filename"] == smollm2_path
        assert r["model_type"] == "llama 135M Q4_1"
        assert 0.9 * size < r["model_size"] <= size
        assert 130e6 < r["model_n_params"] < 140e6
        assert r["n_threads"] == 1
        assert len(r["samples_ns"]) == len(r["samples_ts"]) == 2
        n = r["n_prompt"] or r["n_gen"]
        for ns, ts in zip(r["samples_ns"], r["samples_ts"]):
            assert isinstance(ns, int) and ns > 0
            assert ts == pytest.approx(n * 1e9 / ns, rel=1e-9)
        assert r["avg_ts"] == pytest.approx(statistics.mean(r["samples_ts"]), rel=1e-9)
        assert r["stddev_ts"] == pytest.approx(statistics.stdev(r["samples_ts"]), rel=1e-9)
        assert r["avg_ns"] == pytest.approx(statistics.mean(r["samples_ns"]), abs=1)
        assert r["stddev_ns"] == pytest.approx(statistics.stdev(r["samples_ns"]), abs=1)
        # n / mean(time) ≤ mean(n / time) (Jensen), equal when the samples agree; avg_ns is the mean rounded
        # to whole ns, so the true mean is at most avg_ns + 0.5
        assert n * 1e9 / (r["avg_ns"] + 0.5) <= r["avg_ts"] * (1 + 1e-9)
        assert n * 1e9 / (r["avg_ns"] - 0.5) >= min(r["samples_ts"]) * (1 - 1e-9)
        assert r["peak_rss_bytes"] > size
        assert r["load_s"] > 0


def test_md_table(smollm2_path):
    out = _ok(run_cli("bench", "-m", smollm2_path, "-p", "16", "-n", "4", "-r", "1"))
    lines = out.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "threads", "test", "t/s"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:] if ln.startswith("|")]
    assert [r[4] for r in rows] == ["pp16", "tg4"]
    for r in rows:
        assert r[0] == "llama 135M Q4_1" and r[1].endswith("MiB") and r[2].endswith(" M")
        mean, _, sd = r[5].partition(" ± ")
        assert float(mean) > 0 and float(sd) >= 0
    assert any("peak RSS" in ln for ln in lines)


def test_jsonl_cross_product(smollm2_path):
    """Two models (a catalog name and a path) × two thread counts × (two pp + two tg tests), in llama-bench's
    order: model, then threads, then pp tests, then tg tests."""
    out = _ok(run_cli("bench", "-m", f"smollm2-135m,{smollm2_path}", "-p", "4,8", "-n", "2,3", "-t", "1,2",
                      "-r", "1", "--no-warmup", "-o", "jsonl"))
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert len(recs) == 2 * 2 * 4
    got = [(r["n_threads"], r["n_prompt"], r["n_gen"]) for r in recs]
    one_model = [(t, p, n) for t in (1, 2) for p, n in ((4, 0), (8, 0), (0, 2), (0, 3))]
    assert got == one_model * 2
    assert all(len(r["samples_ns"]) == 1 and r["stddev_ts"] == 0 for r in recs)
    assert {os.path.realpath(r["model_filename"]) for r in recs} == {os.path.realpath(smollm2_path)}
    assert all(r["n_ctx"] >= 8 + 3 for r in recs)


def test_parallel_generation_tests(smollm2_path):
    """-np: tg tests with several sequences decoding together, t/s counting every sequence's tokens; pp tests
    are not repeated per sequence count."""
    out = _ok(run_cli("bench", "-m", smollm2_path, "-p", "8", "-n", "4", "-np", "1,3", "-r", "1", "-o", "jsonl"))
    recs = [json.loads(ln) for ln in out.splitlines()]
    assert [(r["n_prompt"], r["n_gen"], r["n_parallel"]) for r in recs] == [(8, 0, 1), (0, 4, 1), (0, 4, 3)]
    tg3 = recs[2]
    assert abs(tg3["avg_ts"] - 3 * 4 * 1e9 / tg3["avg_ns"]) < 1e-6 * tg3["avg_ts"]
    md = _ok(run_cli("bench", "-m", smollm2_path, "-p", "0", "-n", "2", "-np", "2", "-r", "1"))
    assert "tg2 x2" in md


def test_csv(smollm2_path):
    out = _ok(run_cli("bench", "-m", smollm2_path, "-p", "8", "-n", "2", "-r", "2", "-c", "64", "-o", "csv"))
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [(r["n_prompt"], r["n_gen"]) for r in rows] == [("8", "0"), ("0", "2")]
    for r in rows:
        assert LLAMA_BENCH_FIELDS <= set(r) and r["n_ctx"] == "64"
        assert len(r["samples_ns"].split(";")) == 2
        assert float(r["avg_ts"]) > 0 and int(r["peak_rss_bytes"]) > 0


def _one_line_error(p, *needles):
    assert p.returncode != 0
    assert p.stdout == ""
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("edgelm: error:")
    for s in needles:
        assert s in lines[0], lines[0]


@pytest.mark.parametrize("args, needle", [
    (["-p", "abc"], "-p"),
    (["-n", "4,x"], "-n"),
    (["-p", "-3"], "-p"),
    (["-r", "0"], "-r"),
    (["-r", "2,3"], "-r"),
    (["-t", "0"], "-t"),
    (["-t", "9999"], "-t"),
    (["-c", "8"], "-c"),          # too small for pp16
    (["-p", "0", "-n", "0"], "nothing to measure"),
    (["-o", "xml"], "-o"),
    (["-d", "-1"], "-d"),
    (["-d", "1.5"], "-d"),
    (["-d", "64", "-c", "70"], "-c"),   # 64 + 16 does not fit
    (["-ctk", "q5_1"], "-ctk"),
    (["-ctv", "f16,bogus"], "-ctv"),
])
def test_bad_arguments(smollm2_path, args, needle):
    base = {"-p": "16", "-n": "4", "-r": "1"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    _one_line_error(run_cli("bench", "-m", smollm2_path, *[x for kv in base.items() for x in kv]), needle)


def test_bad_models(tmp_path, smollm2_path):
    junk = tmp_path / "notes.gguf"
    junk.write_text("this is not a model\n" * 10)
    _one_line_error(run_cli("bench", "-m", str(junk), "-p", "4", "-n", "1", "-r", "1"), str(junk), "not a GGUF")
    # a bad file anywhere in the list fails before anything is measured (no partial table on stdout)
    _one_line_error(run_cli("bench", "-m", f"{smollm2_path},{junk}", "-p", "4", "-n", "1", "-r", "1"), str(junk))
    _one_line_error(run_cli("bench", "-m", str(tmp_path / "missing.gguf"), "-r", "1"), "missing.gguf")


def test_helpers(gemma_path):
    assert parse_int_list("512", "-p") == [512]
    assert parse_int_list("128, 256,128", "-p") == [128, 256]
    with pytest.raises(EdgeLMError, match="-p"):
        parse_int_list("1.5", "-p")
    assert [t.name for t in plan_tests([0, 512], [128, 0])] == ["pp512", "tg128"]
    assert [t.name for t in plan_tests([512], [128], [0, 4096])] == ["pp512", "tg128", "pp512 @ d4096",
                                                                     "tg128 @ d4096"]
    assert parse_cache_types("f16, Q8_0,f16", "-ctk") == ["f16", "q8_0"]
    with pytest.raises(EdgeLMError, match="-ctk: KV cache type bf16 is not supported here"):
        parse_cache_types("bf16", "-ctk")
    assert stdev([1.0]) == 0 and stdev([1.0, 3.0]) == pytest.approx(statistics.stdev([1.0, 3.0]))
    g = GGUFFile(gemma_path)
    assert model_desc(g.metadata, "gemma3", 268_098_176, []) == "gemma3 270M Q4_K - Medium"
    assert model_desc({}, "llama", 1_240_000_000, ["Q4_0", "Q4_0", "Q6_K"]) == "llama 1.2B Q4_0 (guessed)"
