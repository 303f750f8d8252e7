"""Model: a loaded GGUF with its tokenizer, decoder and KV cache — the object behind the public API."""
from __future__ import annotations

import logging
import os
from typing import Iterator

import numpy as np
import psutil

from .arch.decoder import Decoder
from .config import ModelConfig
from .errors import ContextError, EdgeLMError
from .generate import GenerationStats, clean_text, stream_tokens
from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .sampling import SamplingParams, check_value, recommended_sampling
from .tokenizer import tokenizer_from_metadata

log = logging.getLogger(__name__)

DEFAULT_N_CTX = 4096   # like llama.cpp's CLI default; capped by the model's training context
N_BATCH = 512          # prompt tokens evaluated per forward pass (llama.cpp's default n_batch)


class Model:
    def __init__(self, path: str, n_ctx: int | None = None, threads: int | None = None, kv_type: str = "f16"):
        """kv_type "f32" keeps the cache in float32 (exact comparisons with transformers; twice the memory)."""
        if n_ctx is not None:
            n_ctx = check_value("n_ctx", n_ctx, "context size (n_ctx / -c)")
        if threads is not None:
            set_threads(threads)
        self.path = path
        self.gguf = GGUFFile(path)
        self.config = ModelConfig.from_gguf(self.gguf)
        self.n_ctx = int(n_ctx or min(DEFAULT_N_CTX, self.config.n_ctx_train))
        self._check_context(kv_type)
        self.tokenizer = tokenizer_from_metadata(self.gguf.metadata)
        self.decoder = Decoder(self.config, self.gguf)
        limit = self.decoder.max_positions
        if limit is not None and self.n_ctx > limit:
            raise ContextError(f"{path}: context size {self.n_ctx} is larger than the {limit} positions the model "
                               f"has learned embeddings for")
        self.sampling_defaults, self.sampling_sources = self._recommended_sampling()
        self.cache = KVCache(self.config, self.n_ctx, kv_type)
        self.last_stats: GenerationStats | None = None
        from .warmup import ensure_compiled
        ensure_compiled(self)

    def _check_context(self, kv_type: str) -> None:
        """Refuse, before anything is allocated, a context whose KV cache could never fit in this machine's
        memory; warn about one longer than the model was trained on (it works, but quality drops past it)."""
        per_token = self.config.kv_bytes_per_token * (2 if kv_type == "f32" else 1)   # f16 per the config
        need, total = per_token * self.n_ctx, psutil.virtual_memory().total
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
    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or len(arr) == 0:
            raise EdgeLMError("expected a non-empty list of token ids")
        bad = arr[(arr < 0) | (arr >= self.config.n_vocab)]
        if len(bad):
            raise EdgeLMError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.n_vocab - 1})")
        return arr

    def _fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextError(f"{n} tokens do not fit in the context of {self.n_ctx} tokens "
                               f"(raise it with n_ctx / -c, up to the model's {self.config.n_ctx_train})")

    def eval_logits(self, ids) -> np.ndarray:
        """Next-token logits at every position of `ids`, evaluated from an empty context: (len, n_vocab) f32."""
        arr = self._check_ids(ids)
        self._fits(len(arr))
        self.cache.clear()
        out = np.empty((len(arr), self.config.n_vocab), np.float32)
        for s in range(0, len(arr), N_BATCH):
            chunk = arr[s:s + N_BATCH]
            out[s:s + len(chunk)] = self.decoder.forward(chunk, s, self.cache, all_logits=True)
            self.cache.tokens.extend(int(t) for t in chunk)
        return out

    def prefill(self, ids: list[int], stats: GenerationStats | None = None) -> np.ndarray:
        """Make the cache hold `ids`, evaluating only what is not already cached; returns the last logits."""
        arr = self._check_ids(ids)
        self._fits(len(arr))
        cached = self.cache.tokens
        keep = 0
        while keep < min(len(cached), len(arr)) and cached[keep] == arr[keep]:
            keep += 1
        keep = min(keep, len(arr) - 1)     # the last token is always evaluated: we need its logits
        self.cache.truncate(keep)
        logits = None
        for s in range(keep, len(arr), N_BATCH):
            chunk = arr[s:s + N_BATCH]
            logits = self.decoder.forward(chunk, s, self.cache)
            self.cache.tokens.extend(int(t) for t in chunk)
        if stats is not None:
            stats.prompt_evaluated = len(arr) - keep
        return logits

    def decode_one(self, token: int) -> np.ndarray:
        pos = self.cache.n_tokens
        self._fits(pos + 1)
        logits = self.decoder.forward(np.array([token], dtype=np.int64), pos, self.cache)
        self.cache.tokens.append(int(token))
        return logits

    # -- generation ------------------------------------------------------------------------------
    def generate(self, prompt: str | list[int], max_tokens: int = 128, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 repeat_penalty: float | None = None, repeat_last_n: int | None = None, seed: int | None = None,
                 stop: str | list[str] | None = None, stream: bool = False, add_special: bool = True,
                 parse_special: bool = False) -> str | Iterator[str]:
        """Continue `prompt` (text, or token ids). Returns the text, or with stream=True an iterator of pieces.
        Sampling keywords left at None take the model's defaults (`sampling_defaults`); max_tokens -1 runs
        until an end token or a full context. Statistics of the last call are in `model.last_stats`."""
        max_tokens = check_value("num_predict", max_tokens, "max_tokens")
        params = self.sampling_defaults.with_(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                              repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                              seed=seed)
        if isinstance(prompt, str):
            ids = self.tokenize(prompt, add_special, parse_special)
        else:
            ids = list(prompt)
        if not ids:
            raise EdgeLMError("the prompt is empty (and the model adds no BOS token)")
        self._fits(len(ids))
        if max_tokens < 0:
            max_tokens = self.n_ctx - len(ids)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        stats = self.last_stats = GenerationStats()
        pieces = stream_tokens(self, ids, max_tokens, params, stops, stats)
        return pieces if stream else "".join(pieces)

    def chat(self, messages: list[dict], stream: bool = False, max_tokens: int | None = None,
             stop: str | list[str] | None = None, chat_template: str | None = None, **sampling):
        """OpenAI-style chat completion: `r.choices[0].message.content`, `r.usage`; with stream=True an iterator
        of chunks whose `choices[0].delta` carries the text. Sampling keywords as in generate(); those left out
        (or None) take the model's defaults."""
        from .chat import chat_completion
        if max_tokens is not None:
            check_value("num_predict", max_tokens, "max_tokens")
        self.sampling_defaults.with_(**sampling)    # a bad keyword is a one-line error before any work
        return chat_completion(self, messages, stream=stream, max_tokens=max_tokens, stop=stop,
                               chat_template=chat_template, **sampling)

    create_chat_completion = chat   # the name llama-cpp-python users know

    # -- description -----------------------------------------------------------------------------
    @property
    def n_params(self) -> int:
        return self.gguf.n_params

    def __repr__(self) -> str:
        return f"<edgelm.Model {os.path.basename(self.path)} arch={self.config.arch} n_ctx={self.n_ctx}>"


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
