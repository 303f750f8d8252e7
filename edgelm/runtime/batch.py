"""Batched generation: several prompts decoded together, one forward pass per step over the next token of every
running sequence (each in its own session, at its own position), so each weight matrix is read once per step
for all of them.  Sequences finish independently; a finished one's slot takes the next waiting prompt
(continuous batching, as llama.cpp's server does with its slots).

Each step's rows are evaluated as that many decode steps would be (Decoder.forward_rows, at most
kernels.BATCH_ROWS rows per pass), and every sequence has its own sampler seeded as a single generate()
would seed it: each output is exactly what generating its prompt alone gives, token for token.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

from ..quant.kernels import BATCH_ROWS
from .generate import GenerationStats, Sequence, shift_context
from .sampling import SamplingParams
from .session import decode_many


@dataclass
class _Slot:
    session: object
    index: int = -1            # which prompt it is generating (-1: free)
    seq: Sequence | None = None
    n_keep: int = 0
    token: int = -1            # sampled, not yet evaluated
    started: float = 0.0


@dataclass
class BatchStats(GenerationStats):
    """The whole batch: token counts summed over sequences, times of the whole run (generate_tps is the
    batch's total throughput); `sequences` holds each prompt's own statistics."""
    sequences: list[GenerationStats] = field(default_factory=list)
    steps: int = 0             # forward passes of the decode loop


def generate_batch(model, prompts: list[list[int]], max_tokens: int, params: SamplingParams, stop: list[str],
                   n_parallel: int, n_keep: list[int], stats: BatchStats) -> Iterator[tuple[int, str]]:
    """Generate a continuation of every prompt (token ids), up to n_parallel at a time; yields (prompt index,
    text piece) as they come.  max_tokens -1: until an end token or a full context.  n_keep[i]: the tokens a
    context shift keeps for prompt i."""
    stats.sequences = [GenerationStats() for _ in prompts]
    slots = [_Slot(model.create_session()) for _ in range(min(n_parallel, len(prompts)))]
    workspace = model.decoder.workspace(min(len(slots), BATCH_ROWS))
    waiting = deque(range(len(prompts)))
    t_start = time.perf_counter()

    def start(slot: _Slot) -> Iterator[tuple[int, str]]:
        """Give the slot the next waiting prompts until one needs decoding (a prompt can end at once)."""
        while waiting:
            i = waiting.popleft()
            st = stats.sequences[i]
            limit = max_tokens if max_tokens >= 0 else slot.session.n_ctx - len(prompts[i])
            seq = Sequence(model, prompts[i], limit, params, stop, st)
            t0 = time.perf_counter()
            logits = slot.session.prefill(prompts[i], st)
            st.prompt_s = time.perf_counter() - t0
            slot.index, slot.seq, slot.n_keep, slot.started = i, seq, n_keep[i], time.perf_counter()
            yield from advance(slot, logits)
            if slot.index >= 0:
                return

    def advance(slot: _Slot, logits) -> Iterator[tuple[int, str]]:
        seq = slot.seq
        tok = seq.sample(logits)
        piece, end = seq.take(tok) if seq.max_tokens > 0 else ("", "length")
        if piece:
            yield slot.index, piece
        if end:
            tail = seq.finish(end)
            if tail:
                yield slot.index, tail
            seq.stats.generate_s = time.perf_counter() - slot.started
            slot.index, slot.seq = -1, None
            return
        if slot.session.n_tokens >= slot.session.n_ctx:
            shift_context(slot.session, slot.n_keep)
            seq.stats.context_shifts += 1
        slot.token = tok

    try:
        for slot in slots:
            yield from start(slot)
        while True:
            running = [s for s in slots if s.index >= 0]
            if not running:
                break
            for c in range(0, len(running), BATCH_ROWS):
                chunk = running[c:c + BATCH_ROWS]
                logits = decode_many([s.session for s in chunk], [s.token for s in chunk], workspace)
                stats.steps += 1
                for slot, row in zip(chunk, logits):
                    yield from advance(slot, row)
                    if slot.index < 0:
                        yield from start(slot)
    finally:
        stats.generate_s = time.perf_counter() - t_start
        for st in stats.sequences:
            stats.prompt_tokens += st.prompt_tokens
            stats.prompt_evaluated += st.prompt_evaluated
            stats.prompt_s += st.prompt_s
            stats.generated_tokens += st.generated_tokens
            stats.context_shifts += st.context_shifts
        stats.generate_s -= stats.prompt_s       # decode time only, as for one sequence
