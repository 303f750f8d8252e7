"""Model: a loaded GGUF with its tokenizer and decoder (shared, read-only) and a default Session (its KV caches)
— the object behind the public API."""
from __future__ import annotations

import logging
import os

import numpy as np
import psutil

from .arch.decoder import Decoder
from .config import ModelConfig
from .errors import ContextError, EdgeLMError
from .runtime.generate import GenerationStats, clean_text, stream_tokens
from .gguf_file import GGUFFile
from .runtime.kv_cache import cache_bytes
from .runtime.session import N_BATCH, Session
from .runtime.sampling import SamplingParams, check_value, recommended_sampling
from .tokenizer import tokenizer_from_metadata

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096   # like llama.cpp's CLI default; capped by the model's training context


class Model:
    def __init__(self, path: str, n_ctx: int | None = None, threads: int | None = None,
                 cache_type_k: str = "f16", cache_type_v: str = "f16", kv_type: str | None = None):
        """cache_type_k / cache_type_v: KV storage, "f16" (default), "q8_0", "q4_0" or "f32" (exact comparisons
        with transformers; twice the memory). kv_type, the older keyword, sets both."""
        if kv_type is not None:
            cache_type_k = cache_type_v = kv_type
        if n_ctx is not None:
            n_ctx = check_value("n_ctx", n_ctx, "context size (n_ctx / -c)")
        set_threads(default_threads() if threads is None else threads)
        self.path = path
        self.gguf = GGUFFile(path)
        self.config = ModelConfig.from_gguf(self.gguf)
        self.n_ctx = int(n_ctx or min(DEFAULT_N_CTX, self.config.n_ctx_train))
        self.cache_type_k, self.cache_type_v = cache_type_k, cache_type_v
        self._check_context()
        self.tokenizer = tokenizer_from_metadata(self.gguf.metadata)
        self.decoder = Decoder(self.config, self.gguf)
        limit = self.decoder.max_positions
        if limit is not None and self.n_ctx > limit:
            raise ContextError(f"{path}: context size {self.n_ctx} is larger than the {limit} positions the model "
                               f"has learned embeddings for")
        self.sampling_defaults, self.sampling_sources = self._recommended_sampling()
        self.session = self.create_session()      # the default: generate/chat without session= use it
        self.last_stats: GenerationStats | None = None
        from .warmup import ensure_compiled
        ensure_compiled(self)

    def create_session(self) -> Session:
        """A new, empty conversation state (its own KV caches and work buffers) on this model."""
        return Session(self)

    def load_session(self, path) -> Session:
        """A session saved by Session.save(), checked against this model (file, cache types, context)."""
        return Session.load(self, path)

    @property
    def cache(self) -> Session:
        """The default session (older name: it was the KV cache)."""
        return self.session

    @property
    def kv_type(self) -> str:
        k, v = self.cache_type_k, self.cache_type_v
        return k if k == v else f"{k}/{v}"

    def _check_context(self) -> None:
        """Refuse, before anything is allocated, a context whose KV cache could never fit in this machine's
        memory (an unknown cache type is refused here too); warn about one longer than the model was trained
        on (it works, but quality drops past it)."""
        need = cache_bytes(self.config, self.n_ctx, self.cache_type_k, self.cache_type_v, N_BATCH)
        total = psutil.virtual_memory().total
        if need > total:
            raise ContextError(f"{self.path}: a context of {self.n_ctx} tokens needs a {need / 2**30:,.1f} GiB KV "
                               f"cache, more than this machine's {total / 2**30:.1f} GiB of memory (use a smaller -c / "
                               f"n_ctx)")
        if self.n_ctx > self.config.n_ctx_train:
            log.warning(f"context size {self.n_ctx} is larger than the {self.config.n_ctx_train} tokens "
                        f"{os.path.basename(self.path)} was trained on: expect worse text beyond that")

    def _recommended_sampling(self) -> tuple[SamplingParams, dict[str, str]]:
        """The sampling this model's makers recommend (GGUF general.sampling.*, else the catalog entry), filled
        in with llama.cpp's defaults; and where each value came from."""
        entry = _catalog_entry_for(self.path)
        return recommended_sampling(self.gguf.metadata, entry.name if entry else None,
                                    entry.sampling if entry else None,
                                    warn=lambda msg: log.warning(f"{self.path}: {msg}"))

    # -- tokens ----------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(clean_text(text), add_special=add_special, parse_special=parse_special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(ids)

    # -- evaluation ------------------------------------------------------------------------------
    def eval_logits(self, ids, session: Session | None = None, first: int = 0) -> np.ndarray:
        """Next-token logits at every position of `ids` (from `first` on), evaluated from an empty context:
        (len - first, n_vocab) f32."""
        return (session or self.session).eval_logits(ids, first)

    def prefill(self, ids: list[int], stats: GenerationStats | None = None,
                session: Session | None = None) -> np.ndarray:
        """Make the session hold `ids`, evaluating only what is not already held; returns the last logits."""
        return (session or self.session).prefill(ids, stats).copy()

    def decode_one(self, token: int, session: Session | None = None) -> np.ndarray:
        return (session or self.session).decode(token).copy()

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int] | list[str] | list[list[int]], max_tokens: int = 128,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repeat_penalty: float | None = None, repeat_last_n: int | None = None,
                 seed: int | None = None, stop: str | list[str] | None = None, stream: bool = False,
                 add_special: bool = True, parse_special: bool = False, session: Session | None = None,
                 n_keep: int | None = None, lookup_ngram: int | None = None, draft_model: "Model | None" = None,
                 draft_max: int = 8, draft_min: int = 0, draft_p_min: float = 0.75, n_parallel: int = 8):
        """Continue `prompt` (text, or token ids). Returns the text, or with stream=True an iterator of pieces.
        Sampling keywords left at None take the model's defaults (`sampling_defaults`); max_tokens -1 runs
        until an end token or a full context. Asked for more tokens than the context holds, the context is
        shifted (llama.cpp's context shift): the first n_keep tokens stay (default: the BOS, if the model adds
        one), the older half of the rest is dropped.

        Speculative decoding (the same output as without at temperature 0, the same distribution otherwise):
        lookup_ngram N proposes up to draft_max tokens from the latest earlier match of the last N..1 tokens;
        draft_model (a Model with the same vocabulary) proposes them by greedy decoding in its own session,
        stopping where its top token's probability (among its 10 best) is below draft_p_min. Either way the
        proposal is verified in one batched pass; draft_min: shorter proposals are not tried.

        A list of prompts (texts, or lists of token ids) is generated as a batch, up to n_parallel sequences
        decoded together (one forward pass per step for all): returns the list of texts, or with stream=True
        an iterator of (prompt index, piece). Each text is what generating its prompt alone gives.

        Statistics of the last call are in `model.last_stats` (a batch's: totals, and per prompt in
        `.sequences`; speculation's: proposals and their acceptance)."""
        max_tokens = check_value("num_predict", max_tokens, "max_tokens")
        params = self.sampling_defaults.with_(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                              repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                              seed=seed)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if _is_batch(prompt):
            if lookup_ngram is not None or draft_model is not None or session is not None:
                raise EdgeLMError("a batch of prompts is generated without speculation and in its own sessions "
                                  "(lookup_ngram, draft_model and session apply to one prompt)")
            return self._generate_batch(prompt, max_tokens, params, stops, add_special, parse_special, n_keep,
                                        n_parallel, stream)
        ids = self._prompt_ids(prompt, add_special, parse_special)
        session = session or self.session
        session.check_fits(len(ids))
        n_keep = self._n_keep(ids, n_keep)
        if max_tokens < 0:
            max_tokens = self.n_ctx - len(ids)
        stats = self.last_stats = GenerationStats()
        drafter = self._drafter(lookup_ngram, draft_model, draft_max, draft_min, draft_p_min)
        pieces = stream_tokens(self, session, ids, max_tokens, params, stops, stats, n_keep=n_keep,
                               drafter=drafter)
        return pieces if stream else "".join(pieces)

    def _prompt_ids(self, prompt, add_special: bool, parse_special: bool) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_special, parse_special)
        else:
            if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
                raise EdgeLMError("a prompt is a text or a list of token ids (ints)")
            ids = [int(t) for t in prompt]
        if not ids:
            raise EdgeLMError("the prompt is empty (and the model adds no BOS token)")
        return ids

    def _n_keep(self, ids: list[int], n_keep: int | None) -> int:
        if n_keep is None:
            n_keep = 1 if self.tokenizer.add_bos and ids[0] == self.tokenizer.bos_id else 0
        if isinstance(n_keep, bool) or not isinstance(n_keep, (int, np.integer)) or not 0 <= n_keep < self.n_ctx:
            raise EdgeLMError(f"n_keep: expected an integer from 0 to {self.n_ctx - 1} (the context size - 1), "
                              f"got {n_keep!r}")
        return int(n_keep)

    def _drafter(self, lookup_ngram=None, draft_model=None, draft_max: int = 8, draft_min: int = 0,
                 draft_p_min: float = 0.75):
        """The proposal rule of speculative decoding (runtime/speculative.py), or None."""
        if lookup_ngram is not None and draft_model is not None:
            raise EdgeLMError("choose one kind of speculation: lookup_ngram or draft_model, not both")
        from .runtime.speculative import DraftModel, PromptLookup
        if lookup_ngram is not None:
            return PromptLookup(lookup_ngram, draft_max, draft_min)
        if draft_model is not None:
            return DraftModel(self, draft_model, draft_max, draft_min, draft_p_min)
        return None

    def _generate_batch(self, prompts, max_tokens, params, stops, add_special, parse_special, n_keep,
                        n_parallel, stream):
        from .runtime.batch import BatchStats, generate_batch
        n_parallel = check_value("n_parallel", n_parallel)
        all_ids = [self._prompt_ids(p, add_special, parse_special) for p in prompts]
        for ids in all_ids:
            self.session.check_fits(len(ids))
        keeps = [self._n_keep(ids, n_keep) for ids in all_ids]
        stats = self.last_stats = BatchStats()     # max_tokens -1: each until an end token or a full context
        pieces = generate_batch(self, all_ids, max_tokens, params, stops, int(n_parallel), keeps, stats)
        if stream:
            return pieces
        texts = [""] * len(all_ids)
        for i, piece in pieces:
            texts[i] += piece
        return texts

    def chat(self, messages: list[dict], stream: bool = False, max_tokens: int | None = None,
             stop: str | list[str] | None = None, chat_template: str | None = None, session: Session | None = None,
             **sampling):
        """OpenAI-style chat completion: `r.choices[0].message.content`, `r.usage`; with stream=True an iterator
        of chunks whose `choices[0].delta` carries the text. Sampling keywords as in generate(); those left out
        (or None) take the model's defaults. Messages that do not fit the context lose their oldest turns (the
        system message stays); a reply longer than the room left shifts the context. Speculative decoding as in
        generate(): lookup_ngram=, draft_model=, draft_max=, draft_min=, draft_p_min=."""
        from .chat import chat_completion
        if max_tokens is not None:
            check_value("num_predict", max_tokens, "max_tokens")
        spec = {k: sampling.pop(k) for k in ("lookup_ngram", "draft_model", "draft_max", "draft_min", "draft_p_min")
                if k in sampling}
        drafter = self._drafter(**spec)
        self.sampling_defaults.with_(**sampling)    # a bad keyword is a one-line error before any work
        return chat_completion(self, messages, stream=stream, max_tokens=max_tokens, stop=stop,
                               chat_template=chat_template, session=session or self.session, drafter=drafter,
                               **sampling)

    create_chat_completion = chat   # the name llama-cpp-python users know

    # -- description -----------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return self.gguf.n_params

    def __repr__(self) -> str:
        return f"<edgelm.Model {os.path.basename(self.path)} arch={self.config.arch} n_ctx={self.n_ctx}>"


def default_threads() -> int:
    """All physical cores this process may run on, not SMT siblings: decode streams weights from memory and
    two threads on one core share its load units and caches (llama.cpp defaults to physical cores too).
    With an affinity mask (taskset, containers) the allowed CPUs bound it; Numba's pool caps it."""
    import numba
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    logical = psutil.cpu_count(logical=True) or allowed
    physical = psutil.cpu_count(logical=False) or logical
    n = min(allowed, max(1, allowed * physical // logical))   # SMT pairs inside the mask count once
    return max(1, min(n, int(numba.config.NUMBA_NUM_THREADS)))


def set_threads(n: int) -> None:
    import numba
    n = check_value("threads", n, "threads (-t)")
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def _catalog_entry_for(path: str):
    """The catalog entry a file is a copy of, by name and size (cheap; hashing 100s of MiB at every load is
    not): so a catalog model given by path gets its recommended sampling too."""
    from .catalog import CATALOG
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    name = os.path.basename(path)
    return next((e for e in CATALOG.values() if e.filename == name and e.size == size), None)


def _is_batch(prompt) -> bool:
    """A list of texts or of id lists (a list of ints is one prompt's token ids)."""
    return isinstance(prompt, (list, tuple)) and len(prompt) > 0 and all(
        isinstance(p, str) or (isinstance(p, (list, tuple)) or (isinstance(p, np.ndarray) and p.ndim == 1))
        for p in prompt)
