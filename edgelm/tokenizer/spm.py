"""SentencePiece-style tokenizer (GGUF `tokenizer.ggml.model` = "llama"), as llama.cpp's llm_tokenizer_spm.

Each plain-text run between special tokens: an optional leading space (add_space_prefix, only at the start
and after a special token), spaces escaped to "▁", then greedy merging of adjacent pieces, highest vocabulary
score first, over UTF-8 characters; characters that end up as no token fall back to <0xXX> byte tokens.
"""

from __future__ import annotations

import heapq
from typing import Any

from .base import Tokenizer

_SPACE = "\u2581"  # "▁", SentencePiece's escaped space


class SPMTokenizer(Tokenizer):
    kind = "spm"
    # llama.cpp defaults for SPM vocabularies when the GGUF has no ids
    _default_bos = 1
    _default_eos = 2
    _default_unk = 0

    def __init__(self, meta: dict[str, Any]):
        # llama.cpp: SPM defaults are add_space_prefix=True, add_bos=True, add_eos=False (metadata overrides)
        self._load_common(meta, add_bos=True, add_eos=False, add_space_prefix=True)
        self.pre = str(meta.get("tokenizer.ggml.pre") or "default")
        self._neg_scores: list[float] | None = None
        vocab = self.token_to_id
        # byte fallback ids: "<0xXX>", else the one-character token for that byte (llama_vocab::byte_to_token)
        self._byte_ids: list[int | None] = [
            vocab.get(f"<0x{b:02X}>", vocab.get(chr(b)) if b < 0x80 else None) for b in range(256)
        ]

    def _neg_score_list(self) -> list[float]:
        s = self._neg_scores
        if s is None:
            if self.scores is None:
                s = [0.0] * self.n_vocab  # no scores in the file: llama.cpp uses 0 for every token
            else:
                s = (-self.scores.astype("float64")).tolist()
            self._neg_scores = s
        return s

    def _encode_fragment(self, text: str, prev_special: bool, out: list[int]) -> None:
        if self.add_space_prefix and prev_special:
            text = " " + text
        text = text.replace(" ", _SPACE)
        n = len(text)
        if n == 0:
            return
        vocab = self.token_to_id
        neg_score = self._neg_score_list()

        # llm_tokenizer_spm_session::tokenize: symbols are the UTF-8 characters; a heap of adjacent pairs
        # that form a vocabulary token, best score first, ties to the leftmost; a pair is stale when either
        # side has changed since it was pushed (checked through the combined length).
        sym = list(text)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        get = vocab.get
        for i in range(n - 1):
            tid = get(sym[i] + sym[i + 1])
            if tid is not None:
                heap.append((neg_score[tid], i, i + 1, 2))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, size = pop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or len(ls) + len(rs) != size:
                continue
            merged = ls + rs
            sym[left] = merged
            sym[right] = ""
            nr = nxt[right]
            nxt[left] = nr
            if nr >= 0:
                prv[nr] = left
            pl = prv[left]
            if pl >= 0:
                t = sym[pl] + merged
                tid = get(t)
                if tid is not None:
                    push(heap, (neg_score[tid], pl, left, len(t)))
            if nr >= 0:
                t = merged + sym[nr]
                tid = get(t)
                if tid is not None:
                    push(heap, (neg_score[tid], left, nr, len(t)))

        # resegment: every merged symbol is a token; a single character that is not one becomes its UTF-8
        # bytes as byte tokens (the unknown token if the vocabulary has no byte tokens).
        byte_ids = self._byte_ids
        i = 0
        while i >= 0:
            s = sym[i]
            tid = get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bid = byte_ids[b]
                    out.append(bid if bid is not None else self.unk_id)  # type: ignore[arg-type]
            i = nxt[i]

    def _normal_piece_bytes(self, text: str) -> bytes:
        return text.replace(_SPACE, " ").encode("utf-8")
