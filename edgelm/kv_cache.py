"""The KV cache: f16 keys and values per layer, sized to the context asked for, plus the token ids it holds
(so a new prompt can reuse the longest common prefix)."""
from __future__ import annotations

import numpy as np

from .config import ModelConfig


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int):
        self.n_ctx = n_ctx
        # np.zeros maps untouched pages lazily: resident memory grows with the tokens actually stored.
        self.k = np.zeros((cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim), np.uint16)
        self.v = np.zeros((cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim_v), np.uint16)
        self.tokens: list[int] = []   # ids whose K/V are stored at positions 0..len-1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def store(self, il: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k (T, n_kv, hd), v (T, n_kv, hd_v) in float32 for positions pos0..pos0+T-1 (rounded to f16)."""
        T = k.shape[0]
        self.k[il, :, pos0:pos0 + T] = k.astype(np.float16).view(np.uint16).transpose(1, 0, 2)
        self.v[il, :, pos0:pos0 + T] = v.astype(np.float16).view(np.uint16).transpose(1, 0, 2)

    def truncate(self, n: int) -> None:
        """Forget positions n and later (their slots are overwritten by the next evaluation)."""
        del self.tokens[n:]

    def clear(self) -> None:
        self.tokens.clear()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
