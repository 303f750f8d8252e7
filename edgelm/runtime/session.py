"""A Session: the state of one conversation with a model — its per-layer KV caches, the token ids they hold,
and the work arrays of the forward pass — apart from the Model (weights, tokenizer, config: shared, read-only).

    s = model.create_session()
    logits = s.prefill(ids)          # reuses the longest cached prefix every cache still holds
    logits = s.decode(token)         # one step; logits are a view of the session's buffer
    s.shift(n_keep, n_discard)       # context shift: drop positions n_keep..n_keep+n_discard-1
    s.save("chat.session"); s2 = model.load_session("chat.session")

Several sessions on one model work side by side: nothing here is shared except the read-only model.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np

from ..atomic import atomic_output
from ..errors import ContextError, EdgeLMError
from .kv_cache import make_caches

N_BATCH = 512          # prompt tokens evaluated per forward pass (llama.cpp's default n_batch)


class Session:
    def __init__(self, model):
        self.model = model
        self.decoder = model.decoder
        self.n_ctx = model.n_ctx
        self.cache_type_k, self.cache_type_v = model.cache_type_k, model.cache_type_v
        self.caches = make_caches(model.config, self.n_ctx, self.cache_type_k, self.cache_type_v, n_batch=N_BATCH)
        self.tokens: list[int] = []     # ids whose K/V are held at positions 0..len-1
        # Ring caches (sliding-window layers) overwrite old positions, so not every earlier position can be
        # resumed from: `_high` is the end of what was ever written since the last clear, `_floor` the
        # smallest position > 0 at which evaluation can resume (every ring still holds the window it needs).
        self._high = 0
        self._floor = 0
        self._rings = [c for c in self.caches if c.capacity < self.n_ctx]
        self._step = self.decoder.workspace(1)          # decode: allocated once (llama2.c's RunState)
        self._batch = None                              # prompt batches: made on the first prefill
        self._one = np.zeros(1, np.int64)

    # -- state --------------------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def workspace(self, n_rows: int):
        if n_rows == 1:
            return self._step
        if self._batch is None or self._batch.n_rows < n_rows:
            self._batch = self.decoder.workspace(max(n_rows, min(N_BATCH, self.n_ctx)))
        return self._batch

    def share_prompt_workspace(self, ws) -> None:
        """Evaluate prompt batches in `ws` (Decoder.workspace): sessions that never evaluate at the same time,
        such as a server's slots, can share one instead of holding one each."""
        self._batch = ws

    def can_resume_at(self, n: int) -> bool:
        """Can evaluation continue after the first n held tokens (a reused prefix, a truncation)?"""
        return n == 0 or (n <= self.n_tokens and n >= self._floor)

    def truncate(self, n: int) -> None:
        """Forget positions n and later (their slots are overwritten by the next evaluation)."""
        del self.tokens[n:]

    def clear(self) -> None:
        self.tokens.clear()
        self._high = self._floor = 0

    # -- evaluation ---------------------------------------------------------------------------------
    def _check_ids(self, ids) -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64)
        if arr.ndim != 1 or len(arr) == 0:
            raise EdgeLMError("expected a non-empty list of token ids")
        bad = arr[(arr < 0) | (arr >= self.model.config.n_vocab)]
        if len(bad):
            raise EdgeLMError(f"token id {int(bad[0])} is outside the vocabulary "
                              f"(0..{self.model.config.n_vocab - 1})")
        return arr

    def check_fits(self, n: int) -> None:
        if n > self.n_ctx:
            raise ContextError(f"{n} tokens do not fit in the context of {self.n_ctx} tokens "
                               f"(raise it with n_ctx / -c, up to the model's {self.model.config.n_ctx_train})")

    def _evaluate(self, arr: np.ndarray, all_logits: bool = False) -> np.ndarray:
        """Evaluate `arr` after the held tokens, in batches of N_BATCH: the last position's logits, or with
        all_logits every position's (len(arr), n_vocab)."""
        out = np.empty((len(arr), self.model.config.n_vocab), np.float32) if all_logits else None
        logits = None
        for s in range(0, len(arr), N_BATCH):
            chunk = arr[s:s + N_BATCH]
            pos0 = self.n_tokens
            logits = self.decoder.forward(chunk, pos0, self, all_logits=all_logits)
            if all_logits:
                out[s:s + len(chunk)] = logits
            self.tokens.extend(chunk.tolist())
            self._written(pos0 + len(chunk))
        return out if all_logits else logits

    def _written(self, end: int) -> None:
        """Positions < end were just written: rings may have dropped older ones."""
        if end <= self._high:
            return
        self._high = end
        for c in self._rings:
            oldest = c.oldest_kept(end)
            if oldest > 0:      # a query resuming at n needs n-window+1.. still held
                self._floor = max(self._floor, oldest + c.window - 1)

    def prefill(self, ids, stats=None) -> np.ndarray:
        """Make the caches hold `ids`, evaluating only what is not already held; returns the last logits (a
        view of this session's buffer, valid until its next evaluation)."""
        arr = self._check_ids(ids)
        self.check_fits(len(arr))
        keep = 0
        held = self.tokens
        n = min(len(held), len(arr))
        while keep < n and held[keep] == arr[keep]:
            keep += 1
        keep = min(keep, len(arr) - 1)     # the last token is always evaluated: we need its logits
        if not self.can_resume_at(keep):
            keep = 0
        if keep == 0:
            self.clear()
        else:
            self.truncate(keep)
        logits = self._evaluate(arr[keep:])
        if stats is not None:
            stats.prompt_evaluated = len(arr) - keep
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Evaluate one token after the held ones; its logits (a view of this session's buffer)."""
        self.check_fits(self.n_tokens + 1)
        token = int(token)
        if not 0 <= token < self.model.config.n_vocab:
            self._check_ids([token])
        self._one[0] = token
        pos = self.n_tokens
        logits = self.decoder.forward(self._one, pos, self)
        self._appended(token, pos)
        return logits

    def _appended(self, token: int, pos: int) -> None:
        self.tokens.append(token)
        self._written(pos + 1)

    def extend(self, ids) -> np.ndarray:
        """Evaluate `ids` after the held tokens in one batch: every position's logits (len, n_vocab), a new
        array (speculative decoding verifies a proposal this way, then truncates what it rejects)."""
        arr = self._check_ids(ids)
        self.check_fits(self.n_tokens + len(arr))
        return self._evaluate(arr, all_logits=True)

    def eval_logits(self, ids, first: int = 0) -> np.ndarray:
        """Next-token logits at the positions first.. of `ids`, evaluated from an empty context:
        (len - first, n_vocab). The positions before `first` are evaluated without their logits."""
        arr = self._check_ids(ids)
        self.check_fits(len(arr))
        if not 0 <= first < len(arr):
            raise ValueError(f"first must be in 0..{len(arr) - 1}, not {first}")
        self.clear()
        if first:
            self._evaluate(arr[:first])
        return self._evaluate(arr[first:], all_logits=True)

    # -- context shift ------------------------------------------------------------------------------
    def shift(self, n_keep: int, n_discard: int) -> None:
        """llama.cpp's context shift: drop positions n_keep..n_keep+n_discard-1 and move the later ones down
        by n_discard, their keys re-rotated by -n_discard (RoPE is relative: scores then see the new
        distances). As in llama.cpp, the moved K/V of deeper layers still carry what the dropped tokens
        contributed; only evaluating the kept tokens again would remove that. Models with learned positions
        cannot move keys: their kept tokens are evaluated again; so are they when a sliding-window layer's
        ring no longer holds kept tokens that later queries still see."""
        n = self.n_tokens
        if not (0 <= n_keep and 0 < n_discard and n_keep + n_discard <= n):
            raise EdgeLMError(f"context shift: keep {n_keep}, discard {n_discard} does not fit {n} held tokens")
        kept = self.tokens[:n_keep] + self.tokens[n_keep + n_discard:]
        floor = self._floor_after_shift(n_keep, n_discard)
        if not self._keys_rotate() or floor > len(kept):
            self.clear()
            self._evaluate(np.asarray(kept, np.int64))
            return
        for L, cache in zip(self.decoder.layers, self.caches):
            cache.shift(n_keep, n_discard, n, _rotation(L.rope))
        self.tokens = kept
        self._high = len(kept)
        self._floor = floor

    def _keys_rotate(self) -> bool:
        return self.decoder.pos_embd is None and all(L.rope is not None for L in self.decoder.layers)

    def _floor_after_shift(self, n_keep: int, n_discard: int) -> int:
        """The resume floor once rings are shifted: a ring held positions >= _high - capacity; after the shift,
        what it lost is below min(n_keep, _high - cap) (kept tokens overwritten earlier) and below
        _high - cap - n_discard (the moved ones), and a query must not reach back into that."""
        floor = 0
        for c in self._rings:
            lost_old = max(0, self._high - c.capacity)
            lost = max(min(n_keep, lost_old), lost_old - n_discard)
            if lost > 0:
                floor = max(floor, lost + c.window - 1)
        return floor

    def shift_to_reuse(self, ids: list[int], min_reuse: int = 16) -> int:
        """Before a prefill of `ids`: when the held tokens are ids' prefix P, then a dropped run D, then a run
        that ids continues with (a chat whose oldest turns were dropped), shift D out so the run is reused
        instead of evaluated again. Returns the tokens shifted out (0: nothing done)."""
        held, n = self.tokens, self.n_tokens
        p = 0
        while p < min(n, len(ids)) and held[p] == ids[p]:
            p += 1
        if p >= len(ids) or p >= n:
            return 0
        best_len, best_d = 0, 0
        first = ids[p]
        for start in range(p + 1, n):
            if held[start] != first:
                continue
            m = 0
            while start + m < n and p + m < len(ids) and held[start + m] == ids[p + m]:
                m += 1
            if m > best_len:
                best_len, best_d = m, start - p
        if best_len < min_reuse or not self._keys_rotate():
            return 0
        self.shift(p, best_d)
        return best_d

    # -- in-memory snapshots (a server's prompt cache) ----------------------------------------------
    def snapshot(self) -> "SessionState":
        """A copy of what this session holds (token ids, the caches' held slots), to restore() later into this
        or another session of the same model: what save() writes, kept in memory."""
        # positions < n_tokens live in slots p % capacity < min(capacity, n_tokens); the other slots of a ring hold
        # only positions >= n_tokens (truncated, never read before they are written again): not worth copying
        slots = [min(c.capacity, self.n_tokens) for c in self.caches]
        arrays = [(c.k[:, :n].copy(), c.v[:, :n].copy()) for c, n in zip(self.caches, slots)]
        return SessionState(list(self.tokens), self._high, self._floor, arrays)

    def restore(self, state: "SessionState") -> None:
        """Make this session hold `state` (a snapshot of a session of the same model and cache types)."""
        if len(state.arrays) != len(self.caches) or any(
                k.shape[0] != c.k.shape[0] or k.shape[2:] != c.k.shape[2:] or k.dtype != c.k.dtype
                or k.shape[1] > c.capacity for (k, _), c in zip(state.arrays, self.caches)):
            raise EdgeLMError("restore: the snapshot was taken on another model or cache type")
        for (k, v), c in zip(state.arrays, self.caches):
            n = k.shape[1]
            c.k[:, :n] = k
            c.v[:, :n] = v
        self.tokens = list(state.tokens)
        self._high, self._floor = state.high, state.floor

    # -- save / load --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write this session (token ids and the caches' held slots) to `path`, atomically."""
        header, body = self._state()
        crc = 0
        for part in body:
            crc = zlib.crc32(memoryview(part).cast("B"), crc)
        header["crc32"] = crc
        blob = json.dumps(header, sort_keys=True).encode()
        with atomic_output(path, [self.model.path]) as tmp:
            with open(tmp, "wb") as f:
                f.write(MAGIC + struct.pack("<II", FORMAT_VERSION, len(blob)) + blob)
                for part in body:
                    f.write(memoryview(part).cast("B"))

    def _state(self) -> tuple[dict, list[np.ndarray]]:
        slots = self._held_slots()
        header = dict(model=model_fingerprint(self.model), n_ctx=self.n_ctx, cache_type_k=self.cache_type_k,
                      cache_type_v=self.cache_type_v, n_layer=len(self.caches), n_tokens=self.n_tokens,
                      high=self._high, floor=self._floor, slots=slots)
        body = [np.asarray(self.tokens, dtype="<i4")]
        for c, s in zip(self.caches, slots):
            body += [np.ascontiguousarray(c.k[:, :s]), np.ascontiguousarray(c.v[:, :s])]
        return header, body

    def _held_slots(self) -> list[int]:
        """Slots worth saving per layer: a full cache's first n_tokens, a ring's slots written so far."""
        return [min(c.capacity, self._high if c in self._rings else self.n_tokens) for c in self.caches]

    @classmethod
    def load(cls, model, path: str | os.PathLike) -> "Session":
        """A session read back from `path`; every field is checked against `model` before anything is
        allocated or trusted (a session file is untrusted input)."""
        path = os.fspath(path)
        s = cls(model)
        try:
            with open(path, "rb") as f:
                _SessionReader(s, f, path).read()
        except OSError as e:
            raise EdgeLMError(f"{path}: cannot read the session file ({e.strerror or e})") from None
        return s


class SessionState:
    """A session's held tokens and K/V, copied (Session.snapshot / restore)."""

    def __init__(self, tokens: list[int], high: int, floor: int, arrays: list[tuple[np.ndarray, np.ndarray]]):
        self.tokens, self.high, self.floor, self.arrays = tokens, high, floor, arrays
        self.nbytes = sum(k.nbytes + v.nbytes for k, v in arrays) + 8 * len(tokens)


def decode_many(sessions: list[Session], tokens: list[int], workspace) -> np.ndarray:
    """Session i evaluates tokens[i] after its held ones, all in one forward pass (the weights read once for
    every session): logits (n, n_vocab), a new array; row i is what sessions[i].decode(tokens[i]) returns, to
    the bit.  `workspace`: the decoder's work arrays for len(tokens) rows (Decoder.workspace)."""
    if len({id(s) for s in sessions}) != len(sessions):
        raise EdgeLMError("decode_many: each session may take one token per step")
    groups = []
    for s, tok in zip(sessions, tokens):
        s.check_fits(s.n_tokens + 1)
        if not 0 <= tok < s.model.config.n_vocab:
            s._check_ids([tok])
        groups.append((s, s.n_tokens, 1))
    logits = sessions[0].decoder.forward_rows(np.asarray(tokens, np.int64), groups, workspace, all_logits=True)
    for s, tok in zip(sessions, tokens):
        s._appended(int(tok), s.n_tokens)
    return logits


MAGIC = b"EDGELMSS"
FORMAT_VERSION = 1
MAX_HEADER = 1 << 20


class _SessionReader:
    """Reads a session file into a fresh session, refusing with one line naming the file and the rule."""

    def __init__(self, session: Session, f, path: str):
        self.s, self.f, self.path = session, f, path
        self.size = os.fstat(f.fileno()).st_size

    def fail(self, rule: str):
        raise EdgeLMError(f"{self.path}: not a usable session file for this model: {rule}")

    def read(self) -> None:
        head = self.f.read(16)
        if len(head) < 16 or head[:8] != MAGIC:
            self.fail("it does not start with the edgelm session magic")
        version, n_header = struct.unpack("<II", head[8:])
        if version != FORMAT_VERSION:
            self.fail(f"format version {version}, this edgelm reads version {FORMAT_VERSION}")
        if n_header > min(MAX_HEADER, self.size - 16):
            self.fail(f"header length {n_header} is larger than the file allows")
        try:
            h = json.loads(self.f.read(n_header).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.fail("its header is not valid JSON (truncated or corrupted)")
        if not isinstance(h, dict):
            self.fail("its header is not a JSON object")
        self.check_header(h)
        self.check_size(h, 16 + n_header)
        self.read_body(h)

    def field(self, h: dict, key: str, kind=int):
        v = h.get(key)
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            self.fail(f"header field {key!r} must be a non-negative integer, got {v!r}")
        if kind is not int and not isinstance(v, kind):
            self.fail(f"header field {key!r} has the wrong type")
        return v

    def check_header(self, h: dict) -> None:
        s = self.s
        if self.field(h, "model", str) != model_fingerprint(s.model):
            self.fail(f"it was saved with another model (not {os.path.basename(s.model.path)})")
        for key, want in (("cache_type_k", s.cache_type_k), ("cache_type_v", s.cache_type_v)):
            if self.field(h, key, str) != want:
                self.fail(f"its {key} is {h[key]}, this model was loaded with {want}")
        if self.field(h, "n_ctx") != s.n_ctx:
            self.fail(f"it was saved with a context of {h['n_ctx']} tokens, this model has {s.n_ctx}")
        if self.field(h, "n_layer") != len(s.caches):
            self.fail(f"it holds {h['n_layer']} layers, the model has {len(s.caches)}")
        n_tokens, high, floor = self.field(h, "n_tokens"), self.field(h, "high"), self.field(h, "floor")
        if not n_tokens <= high <= s.n_ctx or floor > high + max(c.window for c in s.caches):
            self.fail(f"its positions (n_tokens {n_tokens}, high {high}, floor {floor}) do not fit the context "
                      f"of {s.n_ctx}")
        slots = self.field(h, "slots", list)
        want = [min(c.capacity, high if c in s._rings else n_tokens) for c in s.caches]
        if slots != want:
            self.fail("its per-layer slot counts do not match the model's caches")
        self.field(h, "crc32")

    def check_size(self, h: dict, body_start: int) -> None:
        expect = body_start + 4 * h["n_tokens"] + sum(
            (c.k[:, :n].nbytes + c.v[:, :n].nbytes) for c, n in zip(self.s.caches, h["slots"]))
        if self.size != expect:
            self.fail(f"it is {self.size} bytes, its header says {expect} (truncated or corrupted)")

    def read_body(self, h: dict) -> None:
        s, crc = self.s, 0
        raw = self.exact(4 * h["n_tokens"])
        crc = zlib.crc32(raw, crc)
        tokens = np.frombuffer(raw, dtype="<i4").astype(np.int64)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= s.model.config.n_vocab):
            self.fail("it holds token ids outside the model's vocabulary")
        for c, n in zip(s.caches, h["slots"]):
            for dst in (c.k, c.v):
                part = self.exact(dst[:, :n].nbytes)
                crc = zlib.crc32(part, crc)
                dst[:, :n] = np.frombuffer(part, dtype=dst.dtype).reshape(dst.shape[0], n, dst.shape[2])
        if crc != h["crc32"]:
            s.clear()
            self.fail("its checksum does not match its contents (corrupted)")
        s.tokens = tokens.tolist()
        s._high, s._floor = h["high"], h["floor"]

    def exact(self, n: int) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            self.fail("it ends early (truncated)")
        return b


def model_fingerprint(model) -> str:
    """SHA-256 of the GGUF's header bytes (metadata and tensor infos): what makes two files the same model
    for a saved session, without hashing hundreds of MiB of weights."""
    fp = getattr(model, "_fingerprint", None)
    if fp is None:
        h = hashlib.sha256()
        with open(model.path, "rb") as f:
            left = model.gguf.data_start
            while left > 0:
                chunk = f.read(min(left, 1 << 20))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
        fp = model._fingerprint = h.hexdigest()
    return fp


def _rotation(rope):
    """rotate(k (n, n_kv, hd) f32, delta): RoPE by `delta` positions, in place. A pure rotation: the YaRN
    attention factor that Rope.cos_sin multiplies in is already in the stored keys."""
    def rotate(k: np.ndarray, delta: int) -> None:
        ang = np.float64(delta) * rope.inv_freq.astype(np.float64)
        cos = np.cos(ang).astype(np.float32)[None, None, :]
        sin = np.sin(ang).astype(np.float32)[None, None, :]
        rope.apply(k, cos, sin)
    return rotate
