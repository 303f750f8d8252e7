"""`edgelm bench`: prompt-processing and generation speed, measured the way llama.cpp's llama-bench does.

A test is `ppN` (evaluate N random token ids from an empty cache in one prefill) or `tgN` (after a 1-token
prompt, N single-token decode steps with random ids). Timings exclude tokenization and sampling; each test
is run once untimed first (Numba compilation, caches), then `reps` times. Records carry llama-bench's JSON
field names (model_filename, model_type, model_size, model_n_params, n_threads, n_prompt, n_gen, avg_ns,
stddev_ns, avg_ts, stddev_ts, samples_ns, samples_ts, ...) plus peak_rss_bytes and load_s, so scripts written
for llama-bench's `-o json` read ours.
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

from .errors import EdgeLMError

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


@dataclass
class BenchTest:
    n_prompt: int
    n_gen: int

    @property
    def name(self) -> str:
        return f"pp{self.n_prompt}" if self.n_prompt else f"tg{self.n_gen}"


def plan_tests(n_prompt: list[int], n_gen: list[int]) -> list[BenchTest]:
    """Each non-zero prompt size is a pp test and each non-zero generation length a tg test (0 skips)."""
    tests = [BenchTest(p, 0) for p in n_prompt if p > 0] + [BenchTest(0, n) for n in n_gen if n > 0]
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


def time_prompt(model, ids: list[int]) -> int:
    """Nanoseconds to evaluate `ids` from an empty cache (the last token's logits are computed, not sampled)."""
    model.cache.clear()
    t = time.perf_counter_ns()
    model.prefill(ids)
    return time.perf_counter_ns() - t


def time_generation(model, first: int, ids: list[int]) -> int:
    """Nanoseconds for len(ids) single-token decode steps after a 1-token prompt (untimed)."""
    model.cache.clear()
    model.prefill([first])
    t = time.perf_counter_ns()
    for tok in ids:
        model.decode_one(tok)
    return time.perf_counter_ns() - t


def run_test(model, test: BenchTest, reps: int, rng: np.random.Generator, warmup: bool = True,
             on_rep: Callable[[int], None] | None = None) -> list[int]:
    """Sample times in ns of `reps` runs of `test` on `model` (after an untimed warm-up run)."""
    n_vocab = model.config.n_vocab
    bos = _bos(model)
    first = bos if bos is not None else int(rng.integers(0, n_vocab))
    from .model import N_BATCH
    if warmup:
        if test.n_prompt:
            time_prompt(model, _random_ids(rng, min(test.n_prompt, N_BATCH), n_vocab, bos))
        else:
            time_generation(model, first, _random_ids(rng, min(test.n_gen, 2), n_vocab, None))
    samples = []
    for i in range(reps):
        if on_rep:
            on_rep(i)
        if test.n_prompt:
            samples.append(time_prompt(model, _random_ids(rng, test.n_prompt, n_vocab, bos)))
        else:
            samples.append(time_generation(model, first, _random_ids(rng, test.n_gen, n_vocab, None)))
    model.cache.clear()
    return samples


def make_record(info: dict, test: BenchTest, n_threads: int, samples_ns: list[int], load_s: float) -> dict:
    n = test.n_prompt or test.n_gen
    samples_ns = [max(int(s), 1) for s in samples_ns]
    samples_ts = [n * 1e9 / s for s in samples_ns]
    return {
        **info,
        "n_threads": n_threads,
        "n_prompt": test.n_prompt,
        "n_gen": test.n_gen,
        "n_depth": 0,
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


def _model_info(model, n_ctx: int) -> dict:
    from . import __version__
    from .model import N_BATCH
    from .quant.formats import format_for
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
        "type_k": "f16",
        "type_v": "f16",
        "use_mmap": True,
    }


def default_threads() -> int:
    import numba
    return int(numba.config.NUMBA_NUM_THREADS)


def run_bench(paths: list[str], n_prompt: list[int], n_gen: list[int], threads: list[int] | None = None,
              reps: int = 5, n_ctx: int | None = None, warmup: bool = True, seed: int = 0,
              progress: Callable[[str], None] | None = None) -> Iterator[dict]:
    """Yield one record per (model, threads, test), in llama-bench's order: models outermost, then threads,
    then the pp tests, then the tg tests. Each model is loaded once, with a context of at least
    max(p) and max(n)+1 tokens (default max(p) + max(n) + 8)."""
    from .gguf_file import GGUFFile
    from .config import ModelConfig
    from .model import Model, set_threads
    if reps < 1:
        raise EdgeLMError(f"-r: repetitions must be at least 1, got {reps}")
    tests = plan_tests(n_prompt, n_gen)
    threads = threads or [default_threads()]
    need = max(max((t.n_prompt for t in tests), default=0), max((t.n_gen + 1 for t in tests), default=0))
    if n_ctx is None:
        n_ctx = max(n_prompt + [0]) + max(n_gen + [0]) + 8
    elif n_ctx < need:
        raise EdgeLMError(f"-c: a context of {n_ctx} tokens cannot hold the longest test ({need} tokens)")
    cap = default_threads()
    for nt in threads:
        if nt < 1 or nt > cap:
            raise EdgeLMError(f"-t: {nt} threads asked, but this machine runs 1 to {cap} "
                              f"(NUMBA_NUM_THREADS={cap})")
    for path in paths:   # every file checked before any timing: a bad last model fails at once
        ModelConfig.from_gguf(GGUFFile(path))
    say = progress or (lambda msg: None)
    rng = np.random.default_rng(seed)
    for path in paths:
        t0 = time.perf_counter()
        model = Model(path, n_ctx=n_ctx)
        load_s = time.perf_counter() - t0
        info = _model_info(model, n_ctx)
        for nt in threads:
            set_threads(nt)
            for test in tests:
                label = f"{os.path.basename(path)} t={nt} {test.name}"
                say(f"{label}: warm-up")
                samples = run_test(model, test, reps, rng, warmup,
                                   on_rep=lambda i: say(f"{label}: run {i + 1}/{reps}"))
                rec = make_record(info, test, nt, samples, load_s)
                say(f"{label}: {rec['avg_ts']:.2f} ± {rec['stddev_ts']:.2f} t/s")
                yield rec
        del model


# -- output ------------------------------------------------------------------------------------------------------
def _fmt_size(b: int) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def _fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


MD_COLUMNS = [("model", 30, "<"), ("size", 10, ">"), ("params", 10, ">"), ("threads", 7, ">"),
              ("test", 13, ">"), ("t/s", 20, ">")]


def md_header() -> str:
    head = "| " + " | ".join(f"{name:{align}{w}}" for name, w, align in MD_COLUMNS) + " |"
    rule = "| " + " | ".join(("-" * w) if a == "<" else ("-" * (w - 1) + ":") for _, w, a in MD_COLUMNS) + " |"
    return head + "\n" + rule


def md_row(r: dict) -> str:
    test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
    vals = [r["model_type"], _fmt_size(r["model_size"]), _fmt_params(r["model_n_params"]), str(r["n_threads"]),
            test, f"{r['avg_ts']:.2f} ± {r['stddev_ts']:.2f}"]
    return "| " + " | ".join(f"{v:{a}{w}}" for v, (_, w, a) in zip(vals, MD_COLUMNS)) + " |"


def md_footer(records: list[dict]) -> str:
    from . import __version__
    rss = max((r["peak_rss_bytes"] for r in records), default=peak_rss_bytes())
    loads = ", ".join(f"{os.path.basename(r['model_filename'])} {r['load_s']:.2f} s"
                      for r in {r["model_filename"]: r for r in records}.values())
    return f"\nbuild: edgelm {__version__} | peak RSS: {rss / 2**20:.0f} MiB | load: {loads}"


CSV_FIELDS = ["build_commit", "cpu_info", "backends", "model_filename", "model_type", "model_size",
              "model_n_params", "n_batch", "n_ctx", "n_threads", "type_k", "type_v", "use_mmap", "n_prompt",
              "n_gen", "n_depth", "test_time", "avg_ns", "stddev_ns", "avg_ts", "stddev_ts", "samples_ns",
              "samples_ts", "peak_rss_bytes", "load_s"]


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

    def __init__(self, fmt: str, out=None):
        if fmt not in OUTPUT_FORMATS:
            raise EdgeLMError(f"-o: unknown output format {fmt!r} (choose from {', '.join(OUTPUT_FORMATS)})")
        self.fmt, self.out, self.records = fmt, out or sys.stdout, []

    def _w(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def add(self, r: dict) -> None:
        if not self.records:
            if self.fmt == "md":
                self._w(md_header())
            elif self.fmt == "csv":
                self._w(csv_line(CSV_FIELDS))
        self.records.append(r)
        if self.fmt == "md":
            self._w(md_row(r))
        elif self.fmt == "csv":
            self._w(csv_row(r))
        elif self.fmt == "jsonl":
            self._w(json.dumps(r))

    def close(self) -> None:
        if self.fmt == "json":
            self._w(json.dumps(self.records, indent=2))
        elif self.fmt == "md" and self.records:
            self._w(md_footer(self.records))
