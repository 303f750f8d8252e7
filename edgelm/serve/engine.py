"""The server's engine: N slots (each a Session with its own KV cache) fed by one thread, so requests from any
number of HTTP connections become one stream of forward passes.

    engine = Engine(model, n_slots=2, max_queue=32)
    job = Job(ids, max_tokens, params, stops, emit=callback)   # emit(event) is called on the engine's thread
    engine.submit(job)                                         # QueueFull when max_queue jobs already wait
    job.cancel()                                               # stops it before its next token

A job goes to the free slot whose cached tokens share the longest prefix with its prompt (llama-server's prompt
cache reuse), else to the least recently used one, so the second turn of a conversation evaluates only its new
tokens. Prompts are evaluated in chunks between decode steps (a long prompt does not stall the other slots for
its whole length); every step decodes the next token of all generating slots in one forward pass
(runtime/session.decode_many: each row is what decoding that slot alone gives, to the bit).

Events a job receives: Piece(text, tokens) while generating, then exactly one Done(finish_reason, stats) or
Failed(message).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import EdgeLMError
from ..quant.kernels import BATCH_ROWS
from ..runtime.generate import GenerationStats, Sequence
from ..runtime.sampling import SamplingParams
from ..runtime.session import N_BATCH, decode_many
from .prompt_cache import PromptCache, common_prefix

log = logging.getLogger(__name__)

PROMPT_CHUNK = 128      # prompt tokens per engine step while other slots are generating
MIN_SAVE = 16           # a slot's state goes to the prompt cache when a new prompt would overwrite this many tokens


class QueueFull(EdgeLMError):
    """Every slot is busy and the waiting line is at its bound."""


@dataclass
class TokenInfo:
    """One generated token, for logprobs: its id, log-probability and the top alternatives (id, logprob)."""
    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    text: str
    tokens: list[TokenInfo]     # tokens generated since the previous piece (filled only when logprobs asked)


@dataclass
class Done:
    finish_reason: str          # "stop" (end token or stop string) | "length"
    stats: GenerationStats
    cached_tokens: int          # prompt tokens reused from the slot's cache


@dataclass
class Failed:
    message: str


@dataclass
class Job:
    ids: list[int]
    max_tokens: int
    params: SamplingParams
    stops: list[str]
    emit: Callable[[object], None]
    n_logprobs: int | None = None      # None: no logprobs; k: the chosen token's and the top k alternatives
    stats: GenerationStats = field(default_factory=GenerationStats)
    cancelled: bool = False
    cached_tokens: int = 0
    finished: bool = False
    tokens_at_cancel: int = -1         # generated when cancel() came (tokens after it: what cancelling cost)

    def cancel(self) -> None:
        """Stop generating (a disconnected client): the engine frees its slot before the next token."""
        if not self.cancelled and not self.finished:
            self.tokens_at_cancel = self.stats.generated_tokens
        self.cancelled = True


@dataclass
class Slot:
    id: int
    session: object
    job: Job | None = None
    seq: Sequence | None = None
    done_prompt: int = 0        # prompt tokens held so far (the prompt is evaluated in chunks)
    token: int = -1             # sampled, not yet evaluated
    pending: list = field(default_factory=list)     # TokenInfo since the last piece
    last_used: float = 0.0
    t_start: float = 0.0

    @property
    def generating(self) -> bool:
        return self.job is not None and self.done_prompt == len(self.job.ids)


class Engine:
    def __init__(self, model, n_slots: int = 1, max_queue: int = 32, cache_bytes: int = 256 << 20):
        self.model = model
        self.cache = PromptCache(cache_bytes) if cache_bytes > 0 else None
        self.slots = [Slot(i, model.create_session()) for i in range(n_slots)]
        prompt_ws = model.decoder.workspace(min(N_BATCH, model.n_ctx))   # one prompt chunk at a time: shared
        for s in self.slots:
            s.session.share_prompt_workspace(prompt_ws)
        self.max_queue = max_queue
        self.workspace = model.decoder.workspace(min(n_slots, BATCH_ROWS))
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self.cancelled_jobs = 0
        self.tokens_after_cancel = 0     # the most tokens a cancelled job generated after its cancel()
        self._thread: threading.Thread | None = None

    def start(self) -> "Engine":
        """Run the engine in a background thread (tests, notebooks). Not for `edgelm serve`: see run()."""
        self._thread = threading.Thread(target=self.run, name="edgelm-engine", daemon=True)
        self._thread.start()
        return self

    # -- the HTTP side (any thread) ------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise EdgeLMError("the server is shutting down")
            if len(self._waiting) >= self.max_queue and not any(s.job is None for s in self.slots):
                raise QueueFull(f"all {len(self.slots)} slots are busy and {len(self._waiting)} requests wait")
            self._waiting.append(job)
            self._cv.notify()

    def status(self) -> dict:
        """Counts for /health and /slots (read without the lock: a snapshot that may be one step old)."""
        busy = [s for s in self.slots if s.job is not None]
        cache = self.cache
        return dict(slots_idle=len(self.slots) - len(busy), slots_processing=len(busy),
                    requests_waiting=len(self._waiting), prompt_cache_states=len(cache) if cache else 0,
                    prompt_cache_bytes=cache.nbytes if cache else 0)

    def slot_info(self) -> list[dict]:
        return [dict(id=s.id, n_ctx=s.session.n_ctx, is_processing=s.job is not None,
                     n_cached_tokens=s.session.n_tokens) for s in self.slots]

    def close(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # -- the engine thread ---------------------------------------------------------------------------
    def run(self) -> None:
        """The engine loop, on the calling thread, until close(). `edgelm serve` runs it on the thread that
        loaded the model: Numba's OpenMP layer gives every thread that starts parallel kernels its own team of
        workers, and with more workers than cores libgomp cuts its spin-wait to almost nothing (its
        GOMP_SPINCOUNT throttling), so a second launching thread made every kernel barrier a futex sleep and
        decode ~40 % slower (measured on the 2-core VM)."""
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not any(s.job for s in self.slots):
                    self._cv.wait()
                if self._stopping:
                    break
                self._assign()
            try:
                self._step()
            except Exception as e:          # a bug must not kill the engine: fail the jobs, keep serving
                log.exception("engine step failed")
                for s in self.slots:
                    if s.job is not None:
                        self._end(s, Failed(f"internal error: {e}"))
                        s.session.clear()
        for s in self.slots:
            if s.job is not None:
                self._end(s, Failed("the server is shutting down"))
        for job in self._waiting:
            job.emit(Failed("the server is shutting down"))

    def _assign(self) -> None:
        """Waiting jobs, first come first served, to free slots: the one holding the longest prefix of the
        job's prompt, else the least recently used."""
        while self._waiting:
            free = [s for s in self.slots if s.job is None]
            if not free:
                return
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            slot = max(free, key=lambda s: (common_prefix(s.session.tokens, job.ids), -s.last_used))
            try:
                self._start(slot, job)
            except Exception as e:          # (a bug, or no memory for a snapshot): this job fails, not the engine
                log.exception("starting a job failed")
                slot.session.clear()
                self._end(slot, Failed(f"internal error: {e}"))

    def _start(self, slot: Slot, job: Job) -> None:
        session = slot.session
        slot.job, slot.t_start = job, time.perf_counter()
        held = common_prefix(session.tokens, job.ids)
        if self.cache is not None:
            if session.n_tokens - held >= MIN_SAVE:           # what the job would overwrite is kept
                self.cache.put(session.snapshot())
            state, n = self.cache.best(job.ids)
            if state is not None and n > held:
                session.restore(state)                        # (a copy: the kept state stays valid)
                self.cache.used(state, whole=n == len(state.tokens))
                held = n
        keep = min(held, len(job.ids) - 1)                    # the last is evaluated: its logits are needed
        if not session.can_resume_at(keep):
            keep = 0
        if keep:
            session.truncate(keep)
        else:
            session.clear()
        slot.job, slot.done_prompt, slot.pending = job, keep, []
        slot.seq = Sequence(self.model, job.ids, job.max_tokens, job.params, job.stops, job.stats)
        job.cached_tokens = keep
        job.stats.prompt_evaluated = 0
        slot.t_start = time.perf_counter()

    def _step(self) -> None:
        for s in self.slots:
            if s.job is not None and s.job.cancelled:
                self._end(s, None)
        generating = [s for s in self.slots if s.generating]
        prompting = [s for s in self.slots if s.job is not None and not s.generating]
        if prompting:                       # one chunk of one prompt per step
            self._prompt_chunk(prompting[0], PROMPT_CHUNK if generating else None)
        for c in range(0, len(generating), BATCH_ROWS):
            chunk = [s for s in generating[c:c + BATCH_ROWS] if s.job is not None]
            if not chunk:
                continue
            try:
                if len(chunk) == 1:         # plain decode: the same bits, no (1, n_vocab) logits array per step
                    logits = [chunk[0].session.decode(chunk[0].token)]
                else:
                    logits = decode_many([s.session for s in chunk], [s.token for s in chunk], self.workspace)
            except EdgeLMError as e:
                for s in chunk:
                    self._end(s, Failed(str(e)))
                continue
            for s, row in zip(chunk, logits):
                self._advance(s, row)

    def _prompt_chunk(self, slot: Slot, limit: int | None) -> None:
        job, session = slot.job, slot.session
        end = len(job.ids) if limit is None else min(len(job.ids), slot.done_prompt + limit)
        t0 = time.perf_counter()
        try:
            logits = session.prefill(job.ids[:end])     # held: ids[:done_prompt], so only the chunk is evaluated
        except EdgeLMError as e:
            self._end(slot, Failed(str(e)))
            return
        job.stats.prompt_evaluated += end - slot.done_prompt
        job.stats.prompt_s += time.perf_counter() - t0
        slot.done_prompt = end
        if end == len(job.ids):
            slot.t_start = time.perf_counter()
            self._advance(slot, logits)

    def _advance(self, slot: Slot, logits: np.ndarray) -> None:
        """Sample the slot's next token from `logits`, send what it makes of the text."""
        job, seq = slot.job, slot.seq
        if job.max_tokens <= 0:
            self._end(slot, Done("length", job.stats, job.cached_tokens))
            return
        try:
            tok = seq.sample(logits)
        except EdgeLMError as e:
            self._end(slot, Failed(str(e)))
            return
        piece, end = seq.take(tok)
        if job.n_logprobs is not None and end != "eos":
            slot.pending.append(_token_info(logits, tok, job.n_logprobs))
        if not end and slot.session.n_tokens >= slot.session.n_ctx:
            end = "length"                  # the server does not shift contexts: the slot is full
        if piece:
            job.emit(Piece(piece, slot.pending))
            slot.pending = []
        if end:
            tail = seq.finish(end)
            if tail or slot.pending:
                job.emit(Piece(tail, slot.pending))
            self._end(slot, Done("length" if end == "length" else "stop", job.stats, job.cached_tokens))
            return
        slot.token = tok

    def _end(self, slot: Slot, event) -> None:
        job = slot.job
        job.finished = True
        job.stats.generate_s = time.perf_counter() - slot.t_start
        if job.cancelled and job.tokens_at_cancel >= 0:
            self.cancelled_jobs += 1
            self.tokens_after_cancel = max(self.tokens_after_cancel,
                                           job.stats.generated_tokens - job.tokens_at_cancel)
        slot.job, slot.seq, slot.pending = None, None, []
        slot.last_used = time.perf_counter()
        if event is not None:
            job.emit(event)


def _token_info(logits: np.ndarray, tok: int, k: int) -> TokenInfo:
    """log-softmax of the model's logits (before any sampling transform, as OpenAI's logprobs are)."""
    x = logits.astype(np.float64)
    m = x.max()
    lse = m + np.log(np.exp(x - m).sum())
    top = []
    if k > 0:
        idx = np.argpartition(-x, k - 1)[:k] if k < len(x) else np.arange(len(x))
        idx = idx[np.argsort(-x[idx], kind="stable")]
        top = [(int(i), float(x[i] - lse)) for i in idx]
    return TokenInfo(int(tok), float(x[tok] - lse), top)
