"""The KV cache at the command line: -ctk/-ctv on generate, chat and bench (llama.cpp's names), bench's depth
(-d, llama-bench's n_depth), and `edgelm info`'s KV sizes checked against what the runtime's factory really
allocates (make_caches, and a loaded model's session)."""
from __future__ import annotations

import json
import sys
import types

import pytest

from edgelm import cli
from edgelm.commands import bench
from edgelm.config import ModelConfig
from edgelm.commands.describe import architecture_facts, kv_cache_sizes
from edgelm.errors import EdgeLMError
from edgelm.gguf_file import GGUFFile
from edgelm.runtime.kv_cache import CACHE_TYPES, make_caches

from .conftest import run_cli

def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """`edgelm ARGS` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["edgelm", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -- flags reach the model --------------------------------------------------------------------------------------
class _Stop(EdgeLMError):
    pass


@pytest.fixture
def model_kwargs(monkeypatch):
    """Replace Model with a recorder that stops the command right after its arguments are known."""
    seen: list[dict] = []

    def fake_model(path, **kwargs):
        seen.append(kwargs)
        raise _Stop("stopped after Model()")
    import edgelm.model
    monkeypatch.setattr(edgelm.model, "Model", fake_model)
    return seen


@pytest.mark.parametrize("cmd", [["generate"], ["chat"]])
@pytest.mark.parametrize("flags, expect", [
    ([], ("f16", "f16")),
    (["-ctk", "q8_0"], ("q8_0", "f16")),
    (["-ctv", "q4_0"], ("f16", "q4_0")),
    (["--cache-type-k", "f32", "--cache-type-v", "Q8_0"], ("f32", "q8_0")),
])
def test_cache_flags_reach_the_model(monkeypatch, capsys, model_kwargs, smollm2_path, cmd, flags, expect):
    args = cmd + ["-m", smollm2_path, *flags] + (["hi"] if cmd == ["generate"] else [])
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 1 and "stopped after Model()" in err
    assert (model_kwargs[0]["cache_type_k"], model_kwargs[0]["cache_type_v"]) == expect


def test_bench_lists_reach_run_bench(monkeypatch, capsys, smollm2_path):
    seen = {}

    def fake_run_bench(paths, *args, **kwargs):
        seen.update(kwargs)
        return iter(())
    monkeypatch.setattr(bench, "run_bench", fake_run_bench)
    code, _, err = run_main(monkeypatch, capsys, "bench", "-m", smollm2_path, "-ctk", "f16,q8_0,f16",
                            "-ctv", "q4_0", "-d", "0,64")
    assert code == 0, err
    assert seen["type_k"] == ["f16", "q8_0"] and seen["type_v"] == ["q4_0"] and seen["n_depth"] == [0, 64]


# -- bad values: one line, exit 1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", ["generate", "chat", "bench"])
@pytest.mark.parametrize("flag", ["-ctk", "-ctv", "--cache-type-k"])
@pytest.mark.parametrize("value, words", [("q5_1", "not supported here"), ("bf16", "not supported here"),
                                          ("iq4_nl", "not supported here"), ("q4", "unknown"),
                                          ("", "unknown")])
def test_bad_cache_type_is_one_line(monkeypatch, capsys, cmd, flag, value, words):
    code, out, err = run_main(monkeypatch, capsys, cmd, "-m", "no-such-model.gguf", flag, value)
    lines = err.strip().splitlines()
    assert code == 1 and out == "" and len(lines) == 1, err
    assert lines[0].startswith("edgelm: error: ") and words in lines[0], err
    assert flag in lines[0].split(": ")[2].split("/")
    assert f"(supported: {', '.join(CACHE_TYPES)})" in lines[0]       # the runtime's own table


def test_bench_bad_entry_in_a_type_list(monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "bench", "-ctk", "f16,q5_0")
    assert code == 1 and "q5_0 is not supported here" in err and len(err.strip().splitlines()) == 1


def test_quantized_cache_on_a_head_size_it_cannot_hold(tmp_path, capsys):
    """q8_0 blocks are 32 wide: a head size of 16 is refused before anything is timed, naming the file."""
    from edgelm.commands.convert import convert
    from pathlib import Path
    path = tmp_path / "llama16.gguf"
    convert(str(Path(__file__).parent / "data" / "tiny" / "llama"), str(path), "f32")
    with pytest.raises(EdgeLMError, match="q8_0.*16") as e:
        list(bench.run_bench([str(path)], [4], [1], reps=1, type_k=["f16", "q8_0"]))
    assert str(path) in str(e.value)


# -- depth: what is timed -----------------------------------------------------------------------------------------
class FakeSession:
    """Holds token ids; logs each evaluation as (kind, first position, count) so a test can see what ran
    inside the timed windows."""

    def __init__(self, log, capacity=None):
        self.tokens, self.log, self.capacity = [], log, capacity

    def can_resume_at(self, n):
        """Like a ring of `capacity` slots: it can go back only so far from where it has written."""
        return self.capacity is None or self.n_tokens - n < self.capacity

    @property
    def n_tokens(self):
        return len(self.tokens)

    def clear(self):
        self.tokens = []

    def truncate(self, n):
        del self.tokens[n:]

    def prefill(self, ids):
        keep = 0
        while keep < min(len(self.tokens), len(ids) - 1) and self.tokens[keep] == ids[keep]:
            keep += 1
        self.log.append(("prefill", keep, len(ids) - keep))
        self.tokens = list(ids)

    def decode(self, tok):
        self.log.append(("decode", len(self.tokens), 1))
        self.tokens.append(tok)


def timed_runs(monkeypatch, smollm2_path, capacity=None, **kwargs):
    """run_bench on a fake model: per record, the evaluations between each pair of clock readings."""
    log: list = []
    clock = iter(range(1, 10**6))

    def perf_counter_ns():
        log.append(("clock",))
        return next(clock) * 1000

    def fake_model(path, n_ctx, cache_type_k, cache_type_v):
        log.append(("load", n_ctx, cache_type_k, cache_type_v))
        cfg = types.SimpleNamespace(n_vocab=1000)
        return types.SimpleNamespace(config=cfg, session=FakeSession(log, capacity),
                                     gguf=types.SimpleNamespace(metadata={"tokenizer.ggml.bos_token_id": 1}))
    import edgelm.model
    monkeypatch.setattr(edgelm.model, "Model", fake_model)
    monkeypatch.setattr(edgelm.model, "set_threads", lambda n: None)
    monkeypatch.setattr(bench, "_model_info", lambda model, n_ctx, tk, tv: {"n_ctx": n_ctx, "type_k": tk,
                                                                           "type_v": tv})
    monkeypatch.setattr(bench.time, "perf_counter_ns", perf_counter_ns)
    recs = list(bench.run_bench([smollm2_path], **kwargs))
    return recs, log


def windows(log):
    """The evaluations inside each timed window, and those outside any."""
    inside, outside, cur = [], [], None
    for e in log:
        if e[0] == "clock":
            if cur is None:
                cur = []
            else:
                inside.append(cur)
                cur = None
        elif cur is not None:
            cur.append(e)
        else:
            outside.append(e)
    return inside, outside


def test_depth_fill_is_untimed_and_done_once(monkeypatch, smollm2_path):
    recs, log = timed_runs(monkeypatch, smollm2_path, n_prompt=[16], n_gen=[4], threads=[1], reps=3,
                           n_depth=[64], type_k=["q8_0"])
    assert [(r["n_prompt"], r["n_gen"], r["n_depth"]) for r in recs] == [(16, 0, 64), (0, 4, 64)]
    assert all(r["type_k"] == "q8_0" and r["type_v"] == "f16" for r in recs)
    assert recs[0]["n_ctx"] == 64 + 16 + 4 + 8                      # default: max(d) + max(p) + max(n) + 8
    assert log[0] == ("load", 92, "q8_0", "f16")
    inside, outside = windows(log)
    assert len(inside) == 2 * (1 + 3)                               # warm-up + 3 runs per test
    pp, tg = inside[:4], inside[4:]
    assert pp[0] == [("prefill", 64, 16)]                           # warm-up: min(p, batch) after the depth
    assert all(w == [("prefill", 64, 16)] for w in pp[1:])          # exactly p tokens, at positions 64..79
    assert tg[0] == [("decode", 64, 1), ("decode", 65, 1)]          # warm-up: 2 steps
    assert all(w == [("decode", 64 + i, 1) for i in range(4)] for w in tg[1:])
    # the 64 depth tokens were evaluated once, untimed, and cut back to for every later run
    assert [e for e in outside if e[0] == "prefill"] == [("prefill", 0, 64)]


def test_depth_refilled_when_a_ring_lost_it(monkeypatch, smollm2_path):
    """A sliding-window ring that has overwritten keys the depth's last query needs cannot be cut back: the
    depth is evaluated again, still untimed."""
    recs, log = timed_runs(monkeypatch, smollm2_path, capacity=10, n_prompt=[16], n_gen=[0], threads=[1], reps=2,
                           n_depth=[32], warmup=False)
    inside, outside = windows(log)
    assert inside == [[("prefill", 32, 16)]] * 2
    assert [e for e in outside if e[0] == "prefill"] == [("prefill", 0, 32)] * 2


def test_depth_zero_keeps_todays_tests(monkeypatch, smollm2_path):
    recs, log = timed_runs(monkeypatch, smollm2_path, n_prompt=[8], n_gen=[3], threads=[1], reps=1,
                           warmup=False)
    inside, outside = windows(log)
    assert inside == [[("prefill", 0, 8)], [("decode", 1, 1), ("decode", 2, 1), ("decode", 3, 1)]]
    # tg's 1-token prompt is the BOS the pp run already put at position 0: cut back to, not evaluated again
    assert [e for e in outside if e[0] == "prefill"] == []
    assert recs[0]["n_depth"] == 0 and recs[0]["n_ctx"] == 8 + 3 + 8


def test_order_of_records(monkeypatch, smollm2_path):
    """llama-bench's order: cache types, then threads, then depths; pp before tg within a depth."""
    recs, log = timed_runs(monkeypatch, smollm2_path, n_prompt=[4], n_gen=[2], threads=[1], reps=1,
                           n_depth=[0, 8], type_k=["f16", "q8_0"], warmup=False)
    got = [(r["type_k"], r["n_depth"], r["n_prompt"], r["n_gen"]) for r in recs]
    one = [(0, 4, 0), (0, 0, 2), (8, 4, 0), (8, 0, 2)]
    assert got == [("f16", *t) for t in one] + [("q8_0", *t) for t in one]
    assert [e[2] for e in log if e[0] == "load"] == ["f16", "q8_0"]   # one load per cache-type pair


def test_context_too_small_for_depth(smollm2_path):
    with pytest.raises(EdgeLMError, match="-c: a context of 70 tokens cannot hold the longest test \\(80"):
        list(bench.run_bench([smollm2_path], [16], [4], reps=1, n_ctx=70, n_depth=[64]))


def test_md_output_names_depth_and_types():
    r = {"model_type": "llama 135M Q4_1", "model_size": 2**20, "model_n_params": 135_000_000, "n_threads": 2,
         "type_k": "q8_0", "type_v": "f16", "n_prompt": 512, "n_gen": 0, "n_depth": 4096, "avg_ts": 10.0,
         "stddev_ts": 0.5}
    cols = bench.md_columns(["q8_0"], ["f16"])
    header = [c.strip() for c in bench.md_header(cols).splitlines()[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "threads", "type_k", "test", "t/s"]
    row = [c.strip() for c in bench.md_row(r, cols).strip("|").split("|")]
    assert row[4:6] == ["q8_0", "pp512 @ d4096"]
    assert bench.md_columns(["f16"], ["f16", "q4_0"])[4][0] == "type_v"
    assert [c[0] for c in bench.md_columns()] == ["model", "size", "params", "n_threads", "test", "t/s"]
    assert bench.test_name(0, 128, 4096) == "tg128 @ d4096" and bench.test_name(512, 0) == "pp512"


def test_bench_real_q8_0_at_depth(smollm2_path):
    p = run_cli("bench", "-m", smollm2_path, "-ctk", "q8_0", "-d", "64", "-p", "16", "-n", "4", "-r", "1")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == ["model", "size", "params", "threads", "type_k", "test", "t/s"]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:] if ln.startswith("|")]
    assert [(r[4], r[5]) for r in rows] == [("q8_0", "pp16 @ d64"), ("q8_0", "tg4 @ d64")]
    assert all(float(r[6].split(" ± ")[0]) > 0 for r in rows)
    p = run_cli("bench", "-m", smollm2_path, "-ctk", "q8_0", "-ctv", "q4_0", "-d", "64", "-p", "16", "-n", "0",
                "-r", "1", "-o", "json")
    assert p.returncode == 0, p.stderr
    (rec,) = json.loads(p.stdout)
    assert (rec["type_k"], rec["type_v"], rec["n_depth"], rec["n_prompt"]) == ("q8_0", "q4_0", 64, 16)
    assert rec["n_ctx"] == 64 + 16 + 8                               # default: depth + prompt + (no) generation + 8


# -- info: the sizes the runtime allocates ------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["smollm2", "gemma"])
@pytest.mark.parametrize("n_ctx", [100, 1023, 1024, 5000])
def test_info_sizes_are_what_make_caches_allocates(smollm2_path, gemma_path, which, n_ctx):
    path = smollm2_path if which == "smollm2" else gemma_path
    cfg = ModelConfig.from_gguf(GGUFFile(path))
    kv = architecture_facts(path, n_ctx=n_ctx)["kv_cache"]
    assert kv["n_ctx"] == n_ctx
    for t in ("f16", "q8_0"):
        allocated = sum(c.nbytes for c in make_caches(cfg, n_ctx, t, t))
        assert kv["types"][t]["bytes"] == allocated
        # per token: what 1000 more tokens of context really add, per token (rings have stopped growing
        # past window + batch slots)
        if n_ctx >= 1023:
            more = sum(c.nbytes for c in make_caches(cfg, n_ctx + 1000, t, t))
            assert kv["types"][t]["bytes_per_token"] * 1000 == more - allocated


def test_info_json_and_card_carry_the_same_numbers(gemma_path):
    p = run_cli("info", "--json", "-c", "4096", gemma_path)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["kv_cache"] == kv_cache_sizes(ModelConfig.from_gguf(GGUFFile(gemma_path)), 4096)
    mib = d["kv_cache"]["types"]["q8_0"]["bytes"] / 2**20
    assert f"{mib:.1f} MiB (q8_0)" in d["card"]["KV cache, full ctx"]
    assert d["card"]["KV cache, full ctx"].endswith("at 4096 tokens")
    text = run_cli("info", "-c", "4096", gemma_path).stdout
    assert d["card"]["KV cache, full ctx"] in text


@pytest.mark.parametrize("which, n_ctx, t", [("gemma", 2048, "q8_0"), ("smollm2", 300, "f16")])
def test_info_equals_a_loaded_sessions_caches(smollm2_path, gemma_path, which, n_ctx, t):
    import edgelm
    path = smollm2_path if which == "smollm2" else gemma_path
    m = edgelm.model.Model(path, n_ctx=n_ctx, cache_type_k=t, cache_type_v=t)
    allocated = sum(c.nbytes for c in m.session.caches)
    assert architecture_facts(path, n_ctx=n_ctx)["kv_cache"]["types"][t]["bytes"] == allocated
    assert {c.type_k for c in m.session.caches} == {t}


def test_repl_show_info_reports_the_cache(smollm2):
    import io
    from edgelm.chat import Conversation
    from edgelm.commands.repl import Repl
    conv = Conversation(smollm2, params=smollm2.sampling_defaults.with_(temperature=0), max_tokens=3)
    out = io.StringIO()
    Repl(conv, "m", out=out, inp=io.StringIO("/show info\n")).run()
    line = next(ln for ln in out.getvalue().splitlines() if "KV cache" in ln)
    mib = sum(c.nbytes for c in smollm2.session.caches) / 2**20
    assert "K f16, V f16" in line and f"{mib:.1f} MiB for {smollm2.n_ctx} tokens" in line
