"""`edgelm bench`: prompt-processing and generation speed, measured the way llama.cpp's llama-bench does.

A test is `ppN` (evaluate N random token ids in one prefill) or `tgN` (N single-token decode steps with random
ids), each after `n_depth` random tokens already in the cache (`-d`; llama-bench's depth, named "pp512 @ d4096";
with depth 0 a tg test starts after a 1-token prompt). The depth fill is not timed, nor are tokenization and
sampling; each test is run once untimed first (Numba compilation, caches), then `reps` times. Records carry
llama-bench's JSON field names (model_filename, model_type, model_size, model_n_params, n_threads, type_k,
type_v, n_prompt, n_gen, n_depth, avg_ns, stddev_ns, avg_ts, stddev_ts, samples_ns, samples_ts, ...) plus
peak_rss_bytes and load_s, so scripts written for llama-bench's `-o json` read ours (field names from llama.cpp
tools/llama-bench/llama-bench.cpp, struct test::get_fields).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable, Iterator

import numpy as np

from ..errors import EdgeLMError

OUTPUT_FORMATS = ("md", "json", "jsonl", "csv")

# llama.cpp's llama_model_ftype_name, keyed by general.file_type (gguf.LlamaFileType values).
FTYPE_NAMES = {
    0: "all F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K - Medium",
    11: "Q3_K - Small", 12: "Q3_K - Medium", 13: "Q3_K - Large", 14: "Q4_K - Small", 15: "Q4_K - Medium",
    16: "Q5_K - Small", 17: "Q5_K - Medium", 18: "Q6_K", 19: "IQ2_XXS - 2.0625 bpw", 20: "IQ2_XS - 2.3125 bpw",
    21: "Q2_K - Small", 22: "IQ3_XS - 3.3 bpw", 23: "IQ3_XXS - 3.0625 bpw", 24: "IQ1_S - 1.5625 bpw",
    25: "IQ4_NL - 4.5 bpw", 26: "IQ3_S - 3.4375 bpw", 27: "IQ3_S mix - 3.66 bpw", 28: "IQ2_S - 2.5 bpw",
    29: "IQ2_M - 2.7 bpw", 30: "IQ4_XS - 4.25 bpw", 31: "IQ1_M - 1.75 bpw", 32: "BF16", 36: "TQ1_0 - 1.69 bpw",
    37: "TQ2_0 - 2.06 bpw",
}


# -- argument parsing (errors are EdgeLMError: the CLI prints one line) ------------------------------------------
def parse_int_list(text: str | int, option: str, minimum: int = 0) -> list[int]:
    """"512" or "128,256" → [512] / [128, 256]; every value an integer ≥ minimum; duplicates dropped."""
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            v = int(part)
        except ValueError:
            raise EdgeLMError(f"{option}: expected a comma-separated list of integers, got {str(text)!r}") from None
        if v < minimum:
            raise EdgeLMError(f"{option}: values must be at least {minimum}, got {v}")
        if v not in out:
            out.append(v)
    return out


# The cache types llama.cpp's -ctk/-ctv accept (common/arg.cpp, kv_cache_types): those we do not store are
# refused by name, so a llama.cpp command line fails with a clear reason instead of "unknown value".
LLAMA_CPP_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


def parse_cache_type(text: str, option: str) -> str:
    """One KV cache type name, checked against runtime.kv_cache's storage table (the one the runtime uses)."""
    from ..runtime.kv_cache import CACHE_TYPES
    name = str(text).strip().lower()
    if name in CACHE_TYPES:
        return name
    supported = ", ".join(CACHE_TYPES)
    if name in LLAMA_CPP_CACHE_TYPES:
        raise EdgeLMError(f"{option}: KV cache type {name} is not supported here (supported: {supported})")
    raise EdgeLMError(f"{option}: unknown KV cache type {str(text)!r} (supported: {supported})")


def parse_cache_types(text: str, option: str) -> list[str]:
    """"f16" or "f16,q8_0" → ["f16"] / ["f16", "q8_0"] (llama-bench's comma lists); duplicates dropped."""
    out: list[str] = []
    for part in str(text).split(","):
        name = parse_cache_type(part, option)
        if name not in out:
            out.append(name)
    return out


def parse_models(text: str) -> list[str]:
    models = [m.strip() for m in str(text).split(",") if m.strip()]
    if not models:
        raise EdgeLMError("-m: no model given")
    return models


# -- the numbers -------------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024   # bytes on macOS, KiB on Linux


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def stdev(xs: list[float]) -> float:
    """Sample standard deviation (Bessel's correction), 0 for fewer than two samples — as llama-bench."""
    if len(xs) <= 1:
        return 0.0
    m = mean(xs)
    return math.sqrt(max(0.0, sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))


def size_label(n_params: int) -> str:
    return f"{n_params / 1e9:.1f}B" if n_params >= 1e9 else f"{round(n_params / 1e6)}M"


def model_desc(metadata: dict, arch: str, n_params: int, tensor_types: Iterable[str]) -> str:
    """Like llama.cpp's llama_model_desc: "<arch> <size> <file type>", e.g. "llama 135M Q4_1"."""
    size = metadata.get("general.size_label") or size_label(n_params)
    ft = metadata.get("general.file_type")
    if ft in FTYPE_NAMES:
        ftype = FTYPE_NAMES[ft]
    else:   # no file type recorded: the most common tensor type, as llama.cpp guesses it
        types = list(tensor_types)
        ftype = (max(set(types), key=types.count) + " (guessed)") if types else "unknown"
    return f"{arch} {size} {ftype}"


def cpu_info() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def test_name(n_prompt: int, n_gen: int, n_depth: int = 0, n_parallel: int = 1) -> str:
    """"pp512", "tg128", "pp512 @ d4096": llama-bench's markdown test column (markdown_printer::print_test);
    "tg128 x8": 8 sequences generating together (a batched-generation test, t/s counts all of them)."""
    name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}" + (f" x{n_parallel}" if n_parallel > 1 else "")
    return name + (f" @ d{n_depth}" if n_depth else "")


@dataclass
class BenchTest:
    n_prompt: int
    n_gen: int
    n_depth: int = 0
    n_parallel: int = 1        # tg: sequences decoded together, each in its own session

    @property
    def name(self) -> str:
        return test_name(self.n_prompt, self.n_gen, self.n_depth, self.n_parallel)

    @property
    def n_context(self) -> int:
        """Tokens in the cache before the timed part: the depth, or for tg at depth 0 the 1-token prompt."""
        return self.n_depth if self.n_prompt or self.n_depth else 1

    @property
    def n_ctx_needed(self) -> int:
        return self.n_context + self.n_prompt + self.n_gen


def plan_tests(n_prompt: list[int], n_gen: list[int], n_depth: list[int] = (0,),
               n_parallel: list[int] = (1,)) -> list[BenchTest]:
    """For each depth: each non-zero prompt size is a pp test, then each non-zero generation length a tg test
    (0 skips) — llama-bench's order (get_cmd_params_instances: depth outside, pp then tg inside) — once per
    number of parallel sequences."""
    tests = [BenchTest(p, 0, d) for d in n_depth for p in n_prompt if p > 0]
    tests += [BenchTest(0, n, d, b) for d in n_depth for n in n_gen if n > 0 for b in n_parallel]
    tests.sort(key=lambda t: n_depth.index(t.n_depth))          # stable: pp before tg within a depth
    if not tests:
        raise EdgeLMError("nothing to measure: -p and -n are both 0")
    return tests


def _random_ids(rng: np.random.Generator, n: int, n_vocab: int, first: int | None) -> list[int]:
    ids = [int(t) for t in rng.integers(0, n_vocab, size=n)]
    if first is not None and ids:
        ids[0] = first   # llama-bench starts a prompt with BOS when the model adds one
    return ids


def _bos(model) -> int | None:
    md = model.gguf.metadata
    bos = md.get("tokenizer.ggml.bos_token_id")
    add = md.get("tokenizer.ggml.add_bos_token", True)
    return int(bos) if bos is not None and add else None


def restore_context(session, context: list[int]) -> None:
    """Make `session` hold exactly `context` (untimed): cut it back when it still holds that prefix (as
    llama-bench restores its saved depth state), else clear and evaluate it again. A ring (sliding-window
    layer) that has overwritten keys a query at the cut still needs cannot be cut back there."""
    n = len(context)
    held = session.tokens[:n] == context and session.can_resume_at(n)
    if held:
        session.truncate(n)
    else:
        session.clear()
        if context:
            session.prefill(context)


def time_prompt(session, context: list[int], ids: list[int]) -> int:
    """Nanoseconds to evaluate `ids` after `context` (the last token's logits are computed, not sampled)."""
    restore_context(session, context)
    t = time.perf_counter_ns()
    session.prefill(context + ids)           # the held prefix is reused: only `ids` are evaluated
    return time.perf_counter_ns() - t


def time_generation(session, context: list[int], ids: list[int]) -> int:
    """Nanoseconds for len(ids) single-token decode steps after `context`."""
    restore_context(session, context)
    t = time.perf_counter_ns()
    for tok in ids:
        session.decode(tok)
    return time.perf_counter_ns() - t


def time_batch_generation(sessions, workspace, context: list[int], ids: list[list[int]]) -> int:
    """Nanoseconds for len(ids[0]) steps of every session decoding its own token in one pass (decode_many)."""
    from ..runtime.session import decode_many
    for s in sessions:
        restore_context(s, context)
    t = time.perf_counter_ns()
    for step in zip(*ids):
        decode_many(sessions, list(step), workspace)
    return time.perf_counter_ns() - t


def run_test(model, test: BenchTest, reps: int, rng: np.random.Generator, warmup: bool = True,
             on_rep: Callable[[int], None] | None = None, context: list[int] | None = None) -> list[int]:
    """Sample times in ns of `reps` runs of `test` on the model's default session (after an untimed warm-up
    run). `context`: the test.n_context token ids to hold before each timed part (random when None); pass the
    same list to tests of the same depth and its evaluation is done once."""
    from ..model import N_BATCH
    n_vocab = model.config.n_vocab
    bos = _bos(model)
    session = model.session
    if context is None:
        context = _random_ids(rng, test.n_context, n_vocab, bos if bos is not None else int(rng.integers(0, n_vocab)))

    if test.n_parallel > 1:
        sessions = [session] + [model.create_session() for _ in range(test.n_parallel - 1)]
        workspace = model.decoder.workspace(test.n_parallel)

    def one_run(n: int) -> int:
        if test.n_prompt:
            return time_prompt(session, context, _random_ids(rng, n, n_vocab, bos))
        if test.n_parallel > 1:
            return time_batch_generation(sessions, workspace, context,
                                         [_random_ids(rng, n, n_vocab, None) for _ in sessions])
        return time_generation(session, context, _random_ids(rng, n, n_vocab, None))

    if warmup:
        one_run(min(test.n_prompt, N_BATCH) if test.n_prompt else min(test.n_gen, 2))
    samples = []
    for i in range(reps):
        if on_rep:
            on_rep(i)
        samples.append(one_run(test.n_prompt or test.n_gen))
    return samples


def make_record(info: dict, test: BenchTest, n_threads: int, samples_ns: list[int], load_s: float) -> dict:
    n = test.n_prompt or test.n_gen * test.n_parallel
    samples_ns = [max(int(s), 1) for s in samples_ns]
    samples_ts = [n * 1e9 / s for s in samples_ns]
    return {
        **info,
        "n_threads": n_threads,
        "n_prompt": test.n_prompt,
        "n_gen": test.n_gen,
        "n_depth": test.n_depth,
        "n_parallel": test.n_parallel,
        "test_time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "avg_ns": round(mean(samples_ns)),
        "stddev_ns": round(stdev(samples_ns)),
        "avg_ts": mean(samples_ts),
        "stddev_ts": stdev(samples_ts),
        "samples_ns": samples_ns,
        "samples_ts": samples_ts,
        "peak_rss_bytes": peak_rss_bytes(),
        "load_s": round(load_s, 4),
    }


def _model_info(model, n_ctx: int, type_k: str, type_v: str) -> dict:
    from .. import __version__
    from ..model import N_BATCH
    from ..quant.formats import format_for
    tensors = list(model.gguf.tensors.values())
    n_params = model.n_params
    return {
        "build_commit": f"edgelm-{__version__}",
        "cpu_info": cpu_info(),
        "backends": "CPU (NumPy+Numba)",
        "model_filename": model.path,
        "model_type": model_desc(model.gguf.metadata, model.config.arch, n_params,
                                 (format_for(t.ggml_type).name for t in tensors if len(t.shape) >= 2)),
        "model_size": sum(t.n_bytes for t in tensors),
        "model_n_params": n_params,
        "n_batch": N_BATCH,
        "n_ctx": n_ctx,
        "type_k": type_k,
        "type_v": type_v,
        "use_mmap": True,
    }


def default_threads() -> int:
    from ..model import default_threads as physical_cores
    return physical_cores()


def run_bench(paths: list[str], n_prompt: list[int], n_gen: list[int], threads: list[int] | None = None,
              reps: int = 5, n_ctx: int | None = None, warmup: bool = True, seed: int = 0,
              progress: Callable[[str], None] | None = None, n_depth: list[int] = (0,),
              type_k: list[str] = ("f16",), type_v: list[str] = ("f16",),
              n_parallel: list[int] = (1,)) -> Iterator[dict]:
    """Yield one record per (model, type_k, type_v, threads, depth, test), in llama-bench's order (models
    outermost, then cache types, threads, depths, and within a depth the pp tests before the tg tests). The
    model is loaded once per cache-type pair, with a context of at least every test's depth + p + n (default
    max(d) + max(p) + max(n) + 8)."""
    from ..model import Model, set_threads
    if reps < 1:
        raise EdgeLMError(f"-r: repetitions must be at least 1, got {reps}")
    n_depth, type_k, type_v = list(n_depth), list(type_k), list(type_v)
    tests = plan_tests(n_prompt, n_gen, n_depth, list(n_parallel))
    threads = threads or [default_threads()]
    n_ctx = _context_size(tests, n_ctx, n_prompt, n_gen, n_depth)
    _check_threads(threads)
    _check_models(paths, n_ctx, type_k, type_v)
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(seed)
    for path in paths:
        for tk in type_k:
            for tv in type_v:
                t0 = time.perf_counter()
                model = Model(path, n_ctx=n_ctx, cache_type_k=tk, cache_type_v=tv)
                load_s = time.perf_counter() - t0
                info = _model_info(model, n_ctx, tk, tv)
                contexts = _ContextIds(model, rng)
                for nt in threads:
                    set_threads(nt)
                    for test in tests:
                        label = f"{os.path.basename(path)} {tk}/{tv} t={nt} {test.name}"
                        say(f"{label}: warm-up")
                        samples = run_test(model, test, reps, rng, warmup, context=contexts.get(test.n_context),
                                           on_rep=lambda i: say(f"{label}: run {i + 1}/{reps}"))
                        rec = make_record(info, test, nt, samples, load_s)
                        say(f"{label}: {rec['avg_ts']:.2f} ± {rec['stddev_ts']:.2f} t/s")
                        yield rec
                del model


class _ContextIds:
    """The random tokens held before the timed part, one list per length for a loaded model: tests at the same
    depth share it, so its evaluation is done once and then cut back to (restore_context)."""

    def __init__(self, model, rng: np.random.Generator):
        self.n_vocab, self.bos, self.rng, self.lists = model.config.n_vocab, _bos(model), rng, {}

    def get(self, n: int) -> list[int]:
        if n not in self.lists:
            first = self.bos if self.bos is not None else int(self.rng.integers(0, self.n_vocab))
            self.lists[n] = _random_ids(self.rng, n, self.n_vocab, first)
        return self.lists[n]


def _context_size(tests: list[BenchTest], n_ctx: int | None, n_prompt: list[int], n_gen: list[int],
                  n_depth: list[int]) -> int:
    need = max(t.n_ctx_needed for t in tests)
    if n_ctx is None:
        return max(n_depth + [0]) + max(n_prompt + [0]) + max(n_gen + [0]) + 8
    if n_ctx < need:
        raise EdgeLMError(f"-c: a context of {n_ctx} tokens cannot hold the longest test ({need} tokens: "
                          f"depth + prompt + generation)")
    return n_ctx


def _check_threads(threads: list[int]) -> None:
    import numba
    cap = int(numba.config.NUMBA_NUM_THREADS)
    for nt in threads:
        if nt < 1 or nt > cap:
            raise EdgeLMError(f"-t: {nt} threads asked, but this machine runs 1 to {cap} "
                              f"(NUMBA_NUM_THREADS={cap})")


def _check_models(paths: list[str], n_ctx: int, type_k: list[str], type_v: list[str]) -> None:
    """Every file, and every cache type with its head size, checked before any timing: a bad last model or a
    q4_0 cache on a head size it cannot store fails at once, not after minutes of output."""
    from ..config import ModelConfig
    from ..gguf_file import GGUFFile
    from ..runtime.kv_cache import cache_bytes
    for tk in type_k:
        parse_cache_type(tk, "-ctk")
    for tv in type_v:
        parse_cache_type(tv, "-ctv")
    for path in paths:
        cfg = ModelConfig.from_gguf(GGUFFile(path))
        for tk in type_k:
            for tv in type_v:
                try:
                    cache_bytes(cfg, n_ctx, tk, tv)
                except EdgeLMError as e:
                    raise type(e)(f"{path}: {e}") from None


# -- output ------------------------------------------------------------------------------------------------------
def _fmt_size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


# (record field, header, width, alignment); widths as llama-bench's markdown_printer::get_field_width
MD_COLUMNS = [("model", "model", 30, "<"), ("size", "size", 10, ">"), ("params", "params", 10, ">"),
              ("n_threads", "threads", 7, ">"), ("test", "test", 15, ">"), ("t/s", "t/s", 20, ">")]
MD_TYPE_COLUMNS = [("type_k", "type_k", 6, ">"), ("type_v", "type_v", 6, ">")]


def md_columns(type_k: list[str] = ("f16",), type_v: list[str] = ("f16",)) -> list[tuple]:
    """The table's columns: type_k / type_v (before test) only when a list has several values or is not the
    default f16 — llama-bench's rule (markdown_printer::print_header)."""
    cols = MD_COLUMNS[:4]
    for col, types in zip(MD_TYPE_COLUMNS, (type_k, type_v)):
        if list(types) != ["f16"]:
            cols.append(col)
    return cols + MD_COLUMNS[4:]


def md_header(columns: list[tuple] = MD_COLUMNS) -> str:
    head = "| " + " | ".join(f"{name:{align}{w}}" for _, name, w, align in columns) + " |"
    rule = "| " + " | ".join(("-" * w) if a == "<" else ("-" * (w - 1) + ":") for _, _, w, a in columns) + " |"
    return head + "\n" + rule


def _md_value(r: dict, field: str) -> str:
    if field == "model":
        return r["model_type"]
    if field == "size":
        return _fmt_size(r["model_size"])
    if field == "params":
        return _fmt_params(r["model_n_params"])
    if field == "test":
        return test_name(r["n_prompt"], r["n_gen"], r.get("n_depth", 0), r.get("n_parallel", 1))
    if field == "t/s":
        return f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"
    return str(r[field])


def md_row(r: dict, columns: list[tuple] = MD_COLUMNS) -> str:
    return "| " + " | ".join(f"{_md_value(r, f):{a}{w}}" for f, _, w, a in columns) + " |"


def md_footer(records: list[dict]) -> str:
    from .. import __version__
    rss = max((r["peak_rss_bytes"] for r in records), default=peak_rss_bytes())
    loads = ", ".join(f"{os.path.basename(r['model_filename'])} {r['load_s']:.2f} s"
                      for r in {r["model_filename"]: r for r in records}.values())
    return f"\nbuild: edgelm {__version__} | peak RSS: {rss / 2**20:.0f} MiB | load: {loads}"


CSV_FIELDS = ["build_commit", "cpu_info", "backends", "model_filename", "model_type", "model_size",
              "model_n_params", "n_batch", "n_ctx", "n_threads", "type_k", "type_v", "use_mmap", "n_prompt",
              "n_gen", "n_depth", "n_parallel", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts",
              "samples_ns", "samples_ts", "peak_rss_bytes", "load_s"]


def csv_line(values: list) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n").writerow(values)
    return buf.getvalue().rstrip("\n")


def csv_row(r: dict) -> str:
    vals = []
    for f in CSV_FIELDS:
        v = r.get(f, "")
        if isinstance(v, list):
            v = ";".join(f"{x:.6f}" if isinstance(x, float) else str(x) for x in v)
        vals.append(v)
    return csv_line(vals)


class Printer:
    """Writes records to `out` as they arrive (md, csv, jsonl) or all at the end (json: one array)."""

    def __init__(self, fmt: str, out=None, md_columns: list[tuple] = MD_COLUMNS):
        if fmt not in OUTPUT_FORMATS:
            raise EdgeLMError(f"-o: unknown output format {fmt!r} (choose from {', '.join(OUTPUT_FORMATS)})")
        self.fmt, self.out, self.records, self.md_columns = fmt, out or sys.stdout, [], md_columns

    def _w(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def add(self, r: dict) -> None:
        if not self.records:
            if self.fmt == "md":
                self._w(md_header(self.md_columns))
            elif self.fmt == "csv":
                self._w(csv_line(CSV_FIELDS))
        self.records.append(r)
        if self.fmt == "md":
            self._w(md_row(r, self.md_columns))
        elif self.fmt == "csv":
            self._w(csv_row(r))
        elif self.fmt == "jsonl":
            self._w(json.dumps(r))

    def close(self) -> None:
        if self.fmt == "json":
            self._w(json.dumps(self.records, indent=2))
        elif self.fmt == "md" and self.records:
            self._w(md_footer(self.records))
