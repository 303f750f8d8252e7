"""The prompt cache: sessions' states kept in memory after their slot is given to another prompt, so a
conversation that comes back after other clients used every slot still evaluates only its new tokens (llama-server's
host-memory prompt cache, `--cache-ram`). Least recently used states go first once the byte budget is spent."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..runtime.session import SessionState


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(np.asarray(a[:n], np.int64) != np.asarray(b[:n], np.int64))
    return int(diff[0]) if len(diff) else n


class PromptCache:
    def __init__(self, limit_bytes: int):
        self.limit = limit_bytes
        self.entries: OrderedDict[int, SessionState] = OrderedDict()    # oldest first
        self.nbytes = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self.entries)

    def put(self, state: SessionState) -> None:
        """Keep `state`, unless a kept state already continues it; states it continues are dropped."""
        if not state.tokens or state.nbytes > self.limit:
            return
        for key, old in list(self.entries.items()):
            p = common_prefix(old.tokens, state.tokens)
            if p == len(state.tokens):          # nothing new
                self.entries.move_to_end(key)
                return
            if p == len(old.tokens):            # superseded
                self._drop(key)
        self.entries[id(state)] = state
        self.nbytes += state.nbytes
        while self.nbytes > self.limit:
            self._drop(next(iter(self.entries)))

    def best(self, ids: list[int]) -> tuple[SessionState | None, int]:
        """The kept state sharing the longest prefix with `ids`, and that length."""
        best, best_n = None, 0
        for state in self.entries.values():
            n = common_prefix(state.tokens, ids)
            if n > best_n:
                best, best_n = state, n
        return best, best_n

    def used(self, state: SessionState, whole: bool) -> None:
        """`state` was restored into a slot. When the prompt continues all of it, the slot now holds it (and will
        save it again, longer, when the slot is needed): it leaves the cache. When only a prefix was wanted (a
        shared system prompt, say), the rest may still be wanted: it stays, as the most recently used."""
        self.hits += 1
        if whole:
            self._drop(id(state))
        else:
            self.entries.move_to_end(id(state))

    def _drop(self, key: int) -> None:
        self.nbytes -= self.entries.pop(key).nbytes
