"""The importance matrix: the mean squared activation of every input column of every layer matrix, over
calibration text (what `quantize --imatrix` weighs its block searches with), in llama.cpp's imatrix GGUF
format so files go both ways (llama.cpp tools/imatrix/imatrix.cpp save_imatrix, tools/quantize
load_imatrix):

    general.type = "imatrix"; imatrix.datasets [str]; imatrix.chunk_count u32; imatrix.chunk_size u32
    <tensor>.in_sum2  f32 (n_mat, n_in)   sum over tokens of x^2 per input column     (1-D when n_mat is 1)
    <tensor>.counts   f32 (n_mat, 1)      tokens summed;   importance = in_sum2 / counts (1 where counts is 0)

As llama-imatrix does by default, only the matrices of the layers (`blk.*`) are collected: the token
embeddings are no matmul input, and the output matrix (`output.weight`, not a tied embedding) only with
process_output.  The text is cut into chunks of n_ctx tokens evaluated from an empty cache, BOS first where the
model adds one (as perplexity).

llama.cpp's older format (`--output-format dat`, still read by its quantizer; tools/imatrix/imatrix.cpp
save_imatrix_legacy, common/imatrix-loader.cpp), all little-endian int32 / f32:

    n_entries; per entry (names sorted): len, name, ncall, nval, values[nval] = mean x^2 * ncall
    trailing: chunk count, len, dataset name          where ncall = ceil(tokens / chunk_size)
"""
from __future__ import annotations

import os
import struct

import numpy as np

from ..errors import EdgeLMError
from .perplexity import chunk_ids


class Collector:
    """The decoder's observer: per tensor name, sums of squares per column (float64, one row per matrix:
    n_expert rows for an expert tensor) and tokens counted per matrix."""

    def __init__(self, process_output: bool = False):
        self.process_output = process_output
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}

    def wants(self, name: str) -> bool:
        return name.startswith("blk.") or (self.process_output and name == "output.weight")

    def __call__(self, names, x: np.ndarray, expert: int = 0, n_expert: int = 1) -> None:
        """x (T, n_in): the input rows of the named matrices (of expert `expert` of n_expert)."""
        names = [n for n in names if self.wants(n)]
        if not names:
            return
        sq = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        for name in names:
            if name not in self.sums:
                self.sums[name] = np.zeros((n_expert, x.shape[1]), np.float64)
                self.counts[name] = np.zeros(n_expert, np.int64)
            self.sums[name][expert] += sq
            self.counts[name][expert] += len(x)


def collect(model, tokens, n_ctx: int, n_chunk: int, on_chunk=None, process_output: bool = False) -> Collector:
    """Run the first n_chunk chunks of `tokens` through the model with a Collector attached.  The output
    matrix's input is every position's (llama-imatrix computes all logits), so process_output evaluates them."""
    tokens = np.asarray(tokens)
    c = Collector(process_output)
    decoder = model.decoder
    decoder.observer = c
    try:
        for i in range(n_chunk):
            ids = chunk_ids(model, tokens, i, n_ctx).tolist()
            if process_output:
                model.session.eval_logits(ids, 0)          # from an empty cache, all positions' logits
            else:
                model.session.clear()                  # every chunk from an empty cache, all its tokens seen
                model.session.prefill(ids)
            if on_chunk is not None:
                on_chunk(i)
    finally:
        decoder.observer = None
    return c


FORMATS = ("gguf", "dat")


def write(path: str, c: Collector, dataset: str, n_chunk: int, n_ctx: int, fmt: str = "gguf") -> None:
    """The imatrix at `path` in llama.cpp's GGUF or legacy .dat format (the caller makes the write atomic)."""
    if fmt == "dat":
        return _write_legacy(path, c, dataset, n_chunk, n_ctx)
    import gguf
    w = gguf.GGUFWriter(path, arch=None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", n_chunk)
    w.add_uint32("imatrix.chunk_size", n_ctx)
    for name in sorted(c.sums):
        sums, counts = c.sums[name].astype(np.float32), c.counts[name].astype(np.float32)[:, None]
        if len(sums) == 1:       # one matrix: 1-D tensors, as llama.cpp writes them (ggml drops a trailing 1)
            sums, counts = sums[0], counts[0]
        w.add_tensor(f"{name}.in_sum2", sums)
        w.add_tensor(f"{name}.counts", counts)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _write_legacy(path: str, c: Collector, dataset: str, n_chunk: int, n_ctx: int) -> None:
    # entries no token reached are left out; an expert no token reached stores 1s (save_imatrix_legacy)
    names = [n for n in sorted(c.sums) if c.counts[n].any()]
    parts = [struct.pack("<i", len(names))]
    for name in names:
        count = c.counts[name]
        ncall = int(-(-count.max() // n_ctx))          # ceiling, as llama.cpp: never 0 for a seen matrix
        safe = np.where(count > 0, count, 1)[:, None]
        mean = np.where(count[:, None] > 0, (c.sums[name] / safe).astype(np.float32), np.float32(1))
        values = (mean * np.float32(ncall)).reshape(-1)
        raw = name.encode()
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, len(values)),
                  values.astype("<f4").tobytes()]
    raw = dataset.encode()
    parts += [struct.pack("<ii", n_chunk, len(raw)), raw]
    with open(path, "wb") as f:
        f.write(b"".join(parts))


class Imatrix:
    """An imatrix file read for quantization: per tensor name, the importance of each input column."""

    def __init__(self, path: str, values: dict[str, np.ndarray], dataset: str | None, n_chunk: int | None):
        self.path, self.values, self.dataset, self.n_chunk = path, values, dataset, n_chunk

    def for_tensor(self, name: str, n_in: int, n_mat: int = 1) -> np.ndarray | None:
        """(n_mat, n_in): the weights of each matrix of the tensor (n_mat > 1: its experts)."""
        v = self.values.get(name)
        if v is None:
            return None
        if v.size != n_mat * n_in:         # llama.cpp checks the size alone (the .dat format keeps no shape)
            raise EdgeLMError(f"{self.path}: entry {name} has {v.size} values, the model's tensor needs "
                              f"{n_mat} x {n_in} (matrices x columns): an importance matrix of another model?")
        return v.reshape(n_mat, n_in)


def read(path: str | os.PathLike) -> Imatrix:
    """Read llama.cpp's imatrix GGUF or its legacy .dat format (told apart by the GGUF magic, as
    common_imatrix_load), checking what quantize relies on."""
    import gguf
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise EdgeLMError(f"{path}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        return _read_legacy(path)
    try:
        r = gguf.GGUFReader(path)
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise EdgeLMError(f"{path}: not a readable imatrix GGUF ({e})") from None

    def field(key):
        f = r.fields.get(key)
        return None if f is None else f.contents()

    kind = field("general.type")
    if kind is not None and kind != "imatrix":
        raise EdgeLMError(f"{path}: general.type is {kind!r}, not 'imatrix'")
    tensors = {t.name: t for t in r.tensors}
    values = {}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        stem = name[:-len(".in_sum2")]
        counts = tensors.get(stem + ".counts")
        if counts is None:
            raise EdgeLMError(f"{path}: tensor {name} has no {stem}.counts")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or counts.tensor_type != gguf.GGMLQuantizationType.F32:
            raise EdgeLMError(f"{path}: tensors {stem}.in_sum2 / .counts must be F32")
        sums = np.asarray(t.data, np.float32)
        n = np.floor(np.asarray(counts.data, np.float64).reshape(-1) + 0.5)   # llama.cpp rounds counts (lround)
        sums = sums.reshape(len(n), -1) if sums.size % max(len(n), 1) == 0 and len(n) else None
        if sums is None:
            raise EdgeLMError(f"{path}: {stem}.in_sum2 does not divide into its {len(n)} counts")
        if not (np.all(np.isfinite(sums)) and np.all(sums >= 0) and np.all(np.isfinite(n)) and np.all(n >= 0)):
            raise EdgeLMError(f"{path}: {stem} holds negative or non-finite values")
        safe = np.where(n > 0, n, 1)[:, None].astype(np.float32)
        values[stem] = np.where(n[:, None] > 0, sums / safe, 1.0).astype(np.float32)  # llama.cpp: 1 when unseen
    if not values:
        raise EdgeLMError(f"{path}: no <tensor>.in_sum2 entries (an imatrix GGUF written by llama-imatrix or "
                          "edgelm imatrix?)")
    datasets = field("imatrix.datasets")
    return Imatrix(path, values, datasets[0] if datasets else None, field("imatrix.chunk_count"))


def _read_legacy(path: str) -> Imatrix:
    """The .dat format: values / ncall per entry (llama.cpp tools/quantize/quantize.cpp load_imatrix)."""
    data = open(path, "rb").read()
    pos = 0

    def bad(why: str) -> EdgeLMError:
        return EdgeLMError(f"{path}: not a readable imatrix (neither GGUF nor llama.cpp's legacy format: {why})")

    def take(n: int, what: str) -> bytes:
        nonlocal pos
        if pos + n > len(data):
            raise bad(f"the file ends inside {what}")
        pos += n
        return data[pos - n:pos]

    def i32(what: str) -> int:
        return struct.unpack("<i", take(4, what))[0]

    n_entries = i32("the entry count")
    if n_entries < 1:
        raise bad(f"{n_entries} entries")
    values = {}
    for i in range(n_entries):
        n = i32(f"entry {i + 1}'s name length")
        if not 0 < n <= 1024:
            raise bad(f"entry {i + 1} has a name length of {n}")
        try:
            name = take(n, f"entry {i + 1}'s name").decode()
        except UnicodeDecodeError:
            raise bad(f"entry {i + 1}'s name is not UTF-8") from None
        ncall, nval = i32(f"{name}'s call count"), i32(f"{name}'s value count")
        if nval < 1:
            raise bad(f"entry {name} has {nval} values")
        v = np.frombuffer(take(4 * nval, f"{name}'s values"), "<f4").astype(np.float32)
        if not (np.all(np.isfinite(v)) and np.all(v >= 0)):
            raise EdgeLMError(f"{path}: {name} holds negative or non-finite values")
        values[name] = (v / np.float32(ncall) if ncall > 0 else v)[None, :]
    n_chunk, dataset = None, None
    if len(data) - pos >= 4:                            # optional trailer: chunk count, dataset name
        n_chunk = i32("the chunk count")
        if len(data) - pos >= 4:
            n = i32("the dataset name length")
            if 0 < n <= len(data) - pos:
                dataset = take(n, "the dataset name").decode(errors="replace")
    return Imatrix(path, values, dataset, n_chunk)
