"""The decode loop: prompt in, text out, streamed without ever splitting a UTF-8 character."""
from __future__ import annotations

import codecs
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from ..errors import EdgeLMError
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationStats:
    prompt_tokens: int = 0          # tokens in the prompt
    prompt_evaluated: int = 0       # of those, evaluated now (the rest came from the cache)
    prompt_s: float = 0.0
    generated_tokens: int = 0
    generate_s: float = 0.0
    stop_reason: str = ""           # "eos" | "stop" | "length"
    context_shifts: int = 0         # times the full context was shifted to go on
    draft_tokens: int = 0           # speculative decoding: tokens proposed ...
    draft_accepted: int = 0         # ... and kept
    draft_batches: int = 0          # proposals verified

    @property
    def acceptance_rate(self) -> float:
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_evaluated / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generate_tps(self) -> float:
        return self.generated_tokens / self.generate_s if self.generate_s > 0 else 0.0


class StreamDecoder:
    """Token bytes in, complete UTF-8 text out: an incomplete character waits for its next bytes."""

    def __init__(self, token_bytes: Callable[[int], bytes]):
        self.token_bytes = token_bytes
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self.token_bytes(token))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def clean_text(text: str) -> str:
    """Text from outside (argv, stdin, a terminal) made encodable: bytes that were not UTF-8 reach Python as
    lone surrogates (surrogateescape, PEP 383) and would end the tokenizer's .encode() in a traceback; they
    become U+FFFD, as a UTF-8 decoder with errors="replace" would have made them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:     # surrogates that no decoder made (e.g. "\ud800" typed in Python)
        return text.encode("utf-8", "replace").decode("utf-8")


class StopMatcher:
    """Holds back the tail of the text that could still become a stop string."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, stopped)."""
        self.pending += text
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Sequence:
    """One output being generated: its sampler, the ids so far, the text decoded from them and the stop strings
    still being matched.  The decode loop (stream_tokens) and the batch loop (runtime/batch.py) feed it."""

    def __init__(self, model, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                 stop: list[str] | None, stats: GenerationStats):
        self.sampler = Sampler(params)
        self.end_ids = model.tokenizer.end_of_generation_ids
        self.history = list(prompt_ids)
        self.max_tokens = max_tokens
        self.stats = stats
        self.text = StreamDecoder(model.tokenizer.token_bytes)
        self.stopper = StopMatcher(stop or [])
        self.path = model.path
        stats.prompt_tokens = len(prompt_ids)
        stats.stop_reason = "length"

    def sample(self, logits: np.ndarray, exclude: int | None = None) -> int:
        if np.isnan(logits).any():      # only a damaged file gets here (every hyper-parameter was checked)
            raise EdgeLMError(f"{self.path}: the model computed NaN logits: its weights are damaged")
        return self.sampler(logits, self.history, exclude)

    def take(self, tok: int) -> tuple[str, str]:
        """Account for an output token: (text to yield, "" or why generation ends here)."""
        if tok in self.end_ids:
            return "", "eos"
        self.history.append(tok)
        self.stats.generated_tokens += 1
        piece, stopped = self.stopper.push(self.text.push(tok))
        if stopped:
            return piece, "stop"
        return piece, "length" if self.stats.generated_tokens >= self.max_tokens else ""

    def finish(self, end: str) -> str:
        """Generation ended (`end`: eos, stop, length): the text still held back, if it is output."""
        self.stats.stop_reason = end
        if end == "stop":               # what the stop string held back is not output
            return ""
        tail, _ = self.stopper.push(self.text.flush())
        return tail + self.stopper.flush()


def stream_tokens(model, session, prompt_ids: list[int], max_tokens: int, params: SamplingParams,
                  stop: list[str] | None, stats: GenerationStats, n_keep: int = 0,
                  reuse_by_shift: bool = False, drafter=None) -> Iterator[str]:
    """Evaluate the prompt in `session` (reusing the cached prefix; with reuse_by_shift also a cached run after
    a dropped one), then sample up to max_tokens, yielding text pieces. A full context is shifted: the first
    n_keep tokens stay, the older half of the rest goes (llama.cpp examples/main: n_discard = (n_past -
    n_keep) / 2). drafter: speculative decoding (runtime/speculative.py): after each sampled token its
    proposal is verified in one batched pass and the longest accepted prefix kept."""
    seq = Sequence(model, prompt_ids, max_tokens, params, stop, stats)
    t0 = time.perf_counter()
    if reuse_by_shift:
        session.shift_to_reuse(prompt_ids)
    logits = session.prefill(prompt_ids, stats)
    stats.prompt_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    exclude = None            # a rejected proposal: the next token is drawn without it (speculative.py)
    decode_s = None           # recent time of a decode step: what a verified row costs is told to the drafter

    def verify(tok: int, draft: list[int]):
        """Evaluate tok and the proposal in one batch, output the accepted prefix, roll the session back over
        the rest; returns (the logits after the last kept token, "" or why generation ends)."""
        nonlocal exclude
        base = session.n_tokens
        t = time.perf_counter()
        verified = session.extend([tok, *draft])          # logits after tok, after each draft token
        row_cost = None if decode_s is None else ((time.perf_counter() - t) / decode_s - 1) / len(draft)
        stats.draft_batches += 1
        stats.draft_tokens += len(draft)
        accepted, end = 0, ""
        for j, d in enumerate(draft):
            if not seq.sampler.accepts(verified[j], seq.history, d):
                exclude = None if seq.sampler.greedy else d
                break
            accepted += 1
            stats.draft_accepted += 1
            piece, end = seq.take(d)
            if piece:
                yield piece
            if end:
                break
        drafter.accepted(accepted, len(draft), row_cost)
        keep = base + 1 + accepted                        # held: tok and the accepted proposal
        if session.can_resume_at(keep):
            session.truncate(keep)
        else:                                     # a sliding-window ring overwrote what the rollback needs
            session.prefill(session.tokens[:keep])
        return verified[accepted], end

    try:
        end = "" if max_tokens > 0 else "length"
        while not end:
            tok = seq.sample(logits, exclude)
            exclude = None
            piece, end = seq.take(tok)
            if piece:
                yield piece
            if not end:
                if session.n_tokens >= session.n_ctx:
                    shift_context(session, n_keep)
                    stats.context_shifts += 1
                room = min(max_tokens - stats.generated_tokens, session.n_ctx - session.n_tokens - 1)
                draft = drafter.propose(seq.history, room) if drafter is not None else []
                if draft:
                    logits, end = yield from verify(tok, draft)
                else:
                    t = time.perf_counter()
                    logits = session.decode(tok)
                    if drafter is not None:
                        dt = time.perf_counter() - t
                        decode_s = dt if decode_s is None else 0.8 * decode_s + 0.2 * dt
        tail = seq.finish(end)
        if tail:
            yield tail
    finally:
        stats.generate_s = time.perf_counter() - t1


def shift_context(session, n_keep: int) -> None:
    """Make room in a full context: keep the first n_keep tokens, drop the older half of the rest."""
    n_keep = min(n_keep, session.n_tokens - 2)
    n_discard = (session.n_tokens - n_keep) // 2
    session.shift(n_keep, n_discard)
