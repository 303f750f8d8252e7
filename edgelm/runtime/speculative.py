"""Speculative decoding: cheap proposals for the next few tokens, verified by the model in one batched pass.

A drafter proposes tokens; the decode loop (generate.py) evaluates the last sampled token and the proposal
together (a matmul instead of several matvecs, the weights read once), keeps the longest prefix the model
agrees with, and rolls the session back over the rest.  Agreement is the standard speculative-sampling rule
(Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding", algorithm 1) for a
deterministic proposal: a proposed token is kept with the probability the sampler gives it, and after a
rejection the next token is drawn with the rejected one's share taken out, so the output has exactly the
distribution of plain decoding; at temperature 0 it is plain decoding's output, token for token.

PromptLookup is the drafter of llama.cpp's lookup decoding and transformers' prompt_lookup_num_tokens: find
the most recent earlier occurrence of the text's last n tokens (n from ngram_max down to 1) and propose the
tokens that followed it.  It costs no model and wins where the output copies from its input (summaries,
rewrites, code edits).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import EdgeLMError


@dataclass
class PromptLookup:
    ngram_max: int = 3
    draft_max: int = 8

    def __post_init__(self):
        for name, label in (("ngram_max", "lookup_ngram"), ("draft_max", "draft_max")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 1 <= v <= 64:
                raise EdgeLMError(f"{label}: expected an integer from 1 to 64, got {v!r}")

    def propose(self, history: list[int], limit: int) -> list[int]:
        """Up to min(draft_max, limit) tokens that followed the latest earlier match of history's tail."""
        limit = min(limit, self.draft_max)
        if limit < 1 or len(history) < 2:
            return []
        arr = np.asarray(history, dtype=np.int64)
        for n in range(min(self.ngram_max, len(arr) - 1), 0, -1):
            tail = arr[-n:]
            # windows starting at 0 .. len-n-1: every earlier occurrence, not the tail itself
            windows = sliding_window_view(arr[:-1], n)
            hits = np.flatnonzero((windows == tail).all(axis=1))
            if len(hits):
                start = int(hits[-1]) + n
                return arr[start:start + limit].tolist()
        return []
