"""The base-logits file of `perplexity --kl-divergence-base`, in llama.cpp's layout so that a file written by
llama-perplexity serves edgelm and the other way round (layout from llama.cpp tools/perplexity/perplexity.cpp,
perplexity() and kl_divergence()):

    "_logits_"  u32 n_ctx  i32 n_vocab  i32 n_chunk  i32 tokens[n_chunk * n_ctx]
    then per chunk, per scored position (n_ctx - 1 - n_ctx / 2 of them), nv = 2 * ceil(n_vocab / 2) + 4 u16:
    f32 scale, f32 min_log_prob (the first 4 u16), then n_vocab u16 codes; log p = scale * code + min_log_prob.

The codes cover [max - 16, max] of the logits (lower ones are 0), 65535 steps.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import EdgeLMError

MAGIC = b"_logits_"
LOG_PROB_FLOOR = 16.0       # log-probabilities below max - 16 are not kept (llama.cpp's cut)
_HEADER = 8 + 4 + 4 + 4


def row_words(n_vocab: int) -> int:
    return 2 * ((n_vocab + 1) // 2) + 4


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """(rows, n_vocab) float32 logits -> (rows, nv) u16: each row's log-softmax, coded as llama.cpp does."""
    rows, n_vocab = logits.shape
    out = np.zeros((rows, row_words(n_vocab)), np.uint16)
    top = logits.max(-1)
    low = np.maximum(logits.min(-1), top - np.float32(LOG_PROB_FLOOR))
    log_sum = np.log(np.exp((logits - top[:, None]).astype(np.float64)).sum(-1)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    head = out[:, :4].view(np.float32)
    head[:, 0] = scale
    head[:, 1] = low - top - log_sum                             # min_log_prob
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.rint((np.float32(1) / safe)[:, None] * (logits - low[:, None]))
    codes = np.where((logits > low[:, None]) & (scale[:, None] > 0), codes, 0)
    out[:, 4:4 + n_vocab] = np.clip(codes, 0, 65535).astype(np.uint16)
    return out


def decode_rows(words: np.ndarray, n_vocab: int) -> np.ndarray:
    """(rows, nv) u16 -> (rows, n_vocab) float32 log-probabilities (the floor where nothing was kept)."""
    head = np.ascontiguousarray(words[:, :4]).view(np.float32)
    return head[:, :1] * words[:, 4:4 + n_vocab].astype(np.float32) + head[:, 1:2]


class LogitsWriter:
    """Writes the file as perplexity() goes: header and tokens first, then each chunk's rows."""

    def __init__(self, f, n_ctx: int, n_vocab: int, n_chunk: int, tokens: np.ndarray):
        self.f = f
        f.write(MAGIC)
        f.write(np.array([n_ctx], "<u4").tobytes())
        f.write(np.array([n_vocab, n_chunk], "<i4").tobytes())
        f.write(np.asarray(tokens[:n_chunk * n_ctx], "<i4").tobytes())

    def chunk(self, logits: np.ndarray) -> None:
        self.f.write(encode_rows(logits).astype("<u2").tobytes())


@dataclass
class BaseLogits:
    path: str
    n_ctx: int
    n_vocab: int
    n_chunk: int
    tokens: np.ndarray          # (n_chunk * n_ctx,) int32
    _rows: np.ndarray           # (n_chunk, scored, nv) u16, memory-mapped

    @property
    def scored(self) -> int:
        return self.n_ctx - 1 - self.n_ctx // 2

    def log_probs(self, chunk: int) -> np.ndarray:
        return decode_rows(self._rows[chunk], self.n_vocab)


def read_base(path: str | os.PathLike) -> BaseLogits:
    """Open a base-logits file, checking its header against its size (a short or padded file is refused)."""
    path = os.fspath(path)

    def fail(rule: str):
        raise EdgeLMError(f"{path}: {rule}")

    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(_HEADER)
    except OSError as e:
        raise EdgeLMError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(head) < _HEADER or head[:8] != MAGIC:
        fail("not a base-logits file (llama-perplexity's, starting with '_logits_')")
    n_ctx = int(np.frombuffer(head, "<u4", 1, 8)[0])
    n_vocab, n_chunk = (int(v) for v in np.frombuffer(head, "<i4", 2, 12))
    if not (2 <= n_ctx <= 1 << 24 and 1 <= n_vocab <= 1 << 24 and 1 <= n_chunk <= 1 << 24):
        fail(f"header out of range (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk})")
    scored = n_ctx - 1 - n_ctx // 2
    want = _HEADER + 4 * n_ctx * n_chunk + 2 * n_chunk * scored * row_words(n_vocab)
    if size != want:
        fail(f"{size} bytes, but its header (n_ctx {n_ctx}, n_vocab {n_vocab}, n_chunk {n_chunk}) says {want}")
    tokens = np.fromfile(path, "<i4", n_ctx * n_chunk, offset=_HEADER).astype(np.int32)
    if tokens.size and not (0 <= tokens.min() and tokens.max() < n_vocab):
        fail(f"token ids outside the vocabulary of {n_vocab}")
    rows = np.memmap(path, "<u2", "r", _HEADER + 4 * n_ctx * n_chunk, (n_chunk, scored, row_words(n_vocab)))
    return BaseLogits(path, n_ctx, n_vocab, n_chunk, tokens, rows)
