"""The importance matrix: the mean squared activation of every input column of every layer matrix, over
calibration text (what `quantize --imatrix` weighs its block searches with), in llama.cpp's imatrix GGUF
format so files go both ways (llama.cpp tools/imatrix/imatrix.cpp save_imatrix, tools/quantize
load_imatrix):

    general.type = "imatrix"; imatrix.datasets [str]; imatrix.chunk_count u32; imatrix.chunk_size u32
    <tensor>.in_sum2  f32 (n_mat, n_in)   sum over tokens of x^2 per input column
    <tensor>.counts   f32 (n_mat, 1)      tokens summed;   importance = in_sum2 / counts (1 where counts is 0)

As llama-imatrix does by default, only the matrices of the layers (`blk.*`) are collected: the token
embeddings are no matmul input, and the output matrix needs llama-imatrix's --process-output.  The text is cut
into chunks of n_ctx tokens evaluated from an empty cache, BOS first where the model adds one (as perplexity).
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import EdgeLMError, UnsupportedError
from .perplexity import chunk_ids


class Collector:
    """The decoder's observer: sums of squares per column (float64) and token counts, per tensor name."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, names, x: np.ndarray) -> None:
        sq = np.einsum("ti,ti->i", x, x, dtype=np.float64)
        for name in names:
            if not name.startswith("blk."):
                continue
            if name in self.sums:
                self.sums[name] += sq
            else:
                self.sums[name] = sq.copy()
            self.counts[name] = self.counts.get(name, 0) + len(x)


def collect(model, tokens, n_ctx: int, n_chunk: int, on_chunk=None) -> Collector:
    """Run the first n_chunk chunks of `tokens` through the model with a Collector attached."""
    if model.config.n_expert:
        raise UnsupportedError(f"{model.path}: an importance matrix for a mixture-of-experts model is not "
                               "supported yet")
    tokens = np.asarray(tokens)
    c = Collector()
    decoder = model.decoder
    decoder.observer = c
    try:
        for i in range(n_chunk):
            model.session.clear()                  # every chunk from an empty cache, all its tokens seen
            model.session.prefill(chunk_ids(model, tokens, i, n_ctx).tolist())
            if on_chunk is not None:
                on_chunk(i)
    finally:
        decoder.observer = None
    return c


def write(path: str, c: Collector, dataset: str, n_chunk: int, n_ctx: int) -> None:
    """The llama.cpp imatrix GGUF at `path` (the caller makes the write atomic)."""
    import gguf
    w = gguf.GGUFWriter(path, arch=None)
    w.add_string("general.type", "imatrix")
    w.add_array("imatrix.datasets", [dataset])
    w.add_uint32("imatrix.chunk_count", n_chunk)
    w.add_uint32("imatrix.chunk_size", n_ctx)
    for name in sorted(c.sums):
        w.add_tensor(f"{name}.in_sum2", c.sums[name].astype(np.float32)[None, :])
        w.add_tensor(f"{name}.counts", np.array([[c.counts[name]]], np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class Imatrix:
    """An imatrix file read for quantization: per tensor name, the importance of each input column."""

    def __init__(self, path: str, values: dict[str, np.ndarray], dataset: str | None, n_chunk: int | None):
        self.path, self.values, self.dataset, self.n_chunk = path, values, dataset, n_chunk

    def for_tensor(self, name: str, n_in: int) -> np.ndarray | None:
        v = self.values.get(name)
        if v is None:
            return None
        if v.shape != (1, n_in):
            raise EdgeLMError(f"{self.path}: entry {name} has {v.shape[0]} x {v.shape[1]} values, the model's "
                              f"tensor has 1 x {n_in} (columns): an importance matrix of another model?")
        return v[0]


def read(path: str | os.PathLike) -> Imatrix:
    """Read llama.cpp's imatrix GGUF (not its legacy .dat format), checking what quantize relies on."""
    import gguf
    path = os.fspath(path)
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
        n = np.asarray(counts.data, np.float32).reshape(-1)
        sums = sums.reshape(len(n), -1) if sums.size % max(len(n), 1) == 0 and len(n) else None
        if sums is None:
            raise EdgeLMError(f"{path}: {stem}.in_sum2 does not divide into its {len(n)} counts")
        if not (np.all(np.isfinite(sums)) and np.all(sums >= 0) and np.all(np.isfinite(n)) and np.all(n >= 0)):
            raise EdgeLMError(f"{path}: {stem} holds negative or non-finite values")
        safe = np.where(n > 0, n, 1)[:, None]
        values[stem] = np.where(n[:, None] > 0, sums / safe, 1.0).astype(np.float32)  # llama.cpp: 1 when unseen
    if not values:
        raise EdgeLMError(f"{path}: no <tensor>.in_sum2 entries (an imatrix GGUF written by llama-imatrix or "
                          "edgelm imatrix?)")
    datasets = field("imatrix.datasets")
    return Imatrix(path, values, datasets[0] if datasets else None, field("imatrix.chunk_count"))
