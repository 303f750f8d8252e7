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


def _check_count(label: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= 64:
        raise EdgeLMError(f"{label}: expected an integer from {lo} to 64, got {v!r}")
    return int(v)


class ProposalLength:
    """How many tokens are worth proposing, learnt from the verifications so far.

    A proposal is kept up to its first rejection, so the chance that its k-th token is kept is about a^k,
    a being the chance that a proposed token is kept after the ones before it (estimated as kept / (kept +
    rejections), over recent proposals).  Verifying one more token costs c decode steps (measured by the
    decode loop: a batch of 1 + k rows against one decode step; ~0.5 for a small model on 2 cores, less
    where decoding is memory-bound), and a kept token saves one: the k-th is worth proposing while a^k > c.
    Where not even the first is (text the model does not copy), one token is still proposed now and then
    (every PROBE_EVERY-th chance) so that a change back to copying is noticed."""

    DECAY = 0.9          # weight of the previous estimate per verification (recent text counts most)
    PROBE_EVERY = 8

    def __init__(self, draft_max: int):
        self.draft_max = draft_max
        self.kept, self.rejected = 1.0, 1.0     # a prior of a = 0.5
        self.row_cost = 0.5
        self._skipped = 0

    def limit(self) -> int:
        a = self.kept / (self.kept + self.rejected)
        c = min(max(self.row_cost, 0.02), 0.98)
        k = int(np.floor(np.log(c) / np.log(a))) if 0 < a < 1 else (self.draft_max if a >= 1 else 0)
        if k >= 1:
            self._skipped = 0
            return min(k, self.draft_max)
        self._skipped += 1
        if self._skipped >= self.PROBE_EVERY:
            self._skipped = 0
            return 1
        return 0

    def update(self, n_accepted: int, n_proposed: int, row_cost: float | None = None) -> None:
        self.kept = self.DECAY * self.kept + n_accepted
        self.rejected = self.DECAY * self.rejected + (1 if n_accepted < n_proposed else 0)
        if row_cost is not None:
            self.row_cost = 0.8 * self.row_cost + 0.2 * row_cost


@dataclass
class PromptLookup:
    ngram_max: int = 3
    draft_max: int = 8
    draft_min: int = 0      # a match offering fewer tokens is not proposed
    adaptive: bool = True   # propose only as many tokens as are likely to pay (ProposalLength)

    def __post_init__(self):
        _check_count("lookup_ngram", self.ngram_max, 1)
        _check_count("draft_max", self.draft_max, 1)
        _check_count("draft_min", self.draft_min, 0)
        self.length = ProposalLength(self.draft_max) if self.adaptive else None

    def propose(self, history: list[int], limit: int) -> list[int]:
        """Up to min(draft_max, limit) tokens that followed the latest earlier match of history's tail (fewer,
        or none, where recent proposals were mostly rejected)."""
        limit = min(limit, self.draft_max)
        if limit < max(1, self.draft_min) or len(history) < 2:
            return []
        match = self._match(history, limit)
        if not match:
            return []
        if self.length is not None:
            match = match[:self.length.limit()]
        return match if len(match) >= max(1, self.draft_min) else []

    def _match(self, history: list[int], limit: int) -> list[int]:
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

    def accepted(self, n_accepted: int, n_proposed: int, row_cost: float | None = None) -> None:
        """Told after each verification how much of the proposal was kept, and what a verified row cost."""
        if self.length is not None:
            self.length.update(n_accepted, n_proposed, row_cost)


# llama.cpp common/common.h, common_params_speculative: p_min = 0.75 (stop drafting once the draft model's top
# token is less likely than this), n_min = 0; common/speculative.cpp compares vocabularies from token id 5 on
# and allows sizes to differ by up to 128 (SPEC_VOCAB_CHECK_START_TOKEN_ID, SPEC_VOCAB_MAX_SIZE_DIFFERENCE).
DRAFT_P_MIN = 0.75
_DRAFT_TOP_K = 10          # common/speculative.cpp: the draft's sampler keeps the top 10 (its p is among those)
_VOCAB_MAX_SIZE_DIFFERENCE = 128


class DraftModel:
    """Proposals from a smaller model with the same vocabulary: it decodes greedily, in its own session, from the
    text so far, and stops at draft_max tokens or where its top token's probability drops below p_min (a guess
    it is unsure of is likely to be rejected, and verifying it costs a row).  Its session keeps the text, so
    each proposal evaluates only what is new (the kept tokens of the last verification)."""

    def __init__(self, target, draft, draft_max: int = 8, draft_min: int = 0, p_min: float = DRAFT_P_MIN):
        self.draft_max = _check_count("draft_max", draft_max, 1)
        self.draft_min = _check_count("draft_min", draft_min, 0)
        if not isinstance(p_min, (int, float)) or isinstance(p_min, bool) or not 0.0 <= p_min <= 1.0:
            raise EdgeLMError(f"draft_p_min: expected a probability from 0 to 1, got {p_min!r}")
        check_vocabularies(target, draft)
        self.p_min = float(p_min)
        self.session = draft.create_session()
        self.n_vocab = min(target.config.n_vocab, draft.config.n_vocab)

    def propose(self, history: list[int], limit: int) -> list[int]:
        limit = min(limit, self.draft_max)
        if limit < max(1, self.draft_min):
            return []
        s = self.session
        context = history[-(s.n_ctx - limit):]      # past the draft's context: the latest tokens
        logits = s.prefill(context)
        draft: list[int] = []
        while True:
            z = logits[:self.n_vocab]
            tok = int(np.argmax(z))
            if self.p_min > 0:               # the top token's share among the 10 best, as llama.cpp's draft sampler
                best = np.partition(z, len(z) - _DRAFT_TOP_K)[-_DRAFT_TOP_K:].astype(np.float64)
                p_top = 1.0 / float(np.exp(best - float(z[tok])).sum())
                if p_top < self.p_min:
                    break
            draft.append(tok)
            if len(draft) >= limit:
                break
            logits = s.decode(tok)
        return draft if len(draft) >= self.draft_min else []

    def accepted(self, n_accepted: int, n_proposed: int, row_cost: float | None = None) -> None:
        """The draft session holds the proposal; the next prefill keeps what the target kept (its own p_min
        decides how far to guess)."""


def check_vocabularies(target, draft) -> None:
    """Refuse a draft model whose token ids do not mean what the target's mean (one line naming both files)."""
    tt, td = target.tokenizer, draft.tokenizer
    name_t, name_d = target.path, draft.path
    rule = None
    if tt.kind != td.kind:
        rule = f"its tokenizer is {td.kind}, the model's is {tt.kind}"
    elif abs(tt.n_vocab - td.n_vocab) > _VOCAB_MAX_SIZE_DIFFERENCE:
        rule = f"its vocabulary has {td.n_vocab} tokens, the model's {tt.n_vocab}"
    elif (tt.bos_id, tt.eos_id, tt.add_bos) != (td.bos_id, td.eos_id, td.add_bos):
        rule = (f"its BOS/EOS ids are {td.bos_id}/{td.eos_id} (add BOS: {td.add_bos}), the model's "
                f"{tt.bos_id}/{tt.eos_id} (add BOS: {tt.add_bos})")
    else:
        n = min(tt.n_vocab, td.n_vocab)
        diff = next((i for i in range(5, n) if tt.tokens[i] != td.tokens[i]), None)
        if diff is not None:
            rule = f"token {diff} is {td.tokens[diff]!r} there, {tt.tokens[diff]!r} in the model"
    if rule:
        raise EdgeLMError(f"draft model {name_d} does not share the vocabulary of {name_t}: {rule}")
