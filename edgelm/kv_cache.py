"""The KV cache: f16 (or f32, for exact comparisons) keys and values per layer, sized to the context asked for, plus the token ids it holds
(so a new prompt can reuse the longest common prefix)."""
from __future__ import annotations

import numpy as np
import psutil

from .config import ModelConfig
from .errors import ContextError, EdgeLMError


KV_TYPES = {"f16": np.uint16, "f32": np.float32}   # f16 kept as its bits (Numba has no CPU float16)


def _check_fits_in_memory(cfg: ModelConfig, n_ctx: int, itemsize: int) -> None:
    """The cache is sized only from validated numbers (ModelConfig.from_gguf) and the context asked for; still,
    refuse one larger than the memory available now, with its size, instead of failing later when the pages
    np.zeros maps lazily are touched."""
    need = cfg.n_layer * cfg.n_head_kv * (cfg.head_dim + cfg.head_dim_v) * n_ctx * itemsize
    available = psutil.virtual_memory().available
    if need > available:
        raise ContextError(f"a KV cache for {n_ctx} tokens needs {need / 2**30:.1f} GiB, more than the "
                           f"{available / 2**30:.1f} GiB of memory available (use a smaller context, -c / n_ctx)")


class KVCache:
    def __init__(self, cfg: ModelConfig, n_ctx: int, kv_type: str = "f16"):
        if kv_type not in KV_TYPES:
            raise EdgeLMError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer)) or n_ctx < 1:
            raise ContextError(f"context size must be a positive integer, got {n_ctx!r}")
        self.n_ctx, self.kv_type = n_ctx, kv_type
        dtype = KV_TYPES[kv_type]
        _check_fits_in_memory(cfg, n_ctx, np.dtype(dtype).itemsize)
        # np.zeros maps untouched pages lazily: resident memory grows with the tokens actually stored.
        self.k = np.zeros((cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim), dtype)
        self.v = np.zeros((cfg.n_layer, cfg.n_head_kv, n_ctx, cfg.head_dim_v), dtype)
        self.tokens: list[int] = []   # ids whose K/V are stored at positions 0..len-1

    @property
    def n_tokens(self) -> int:
        return len(self.tokens)

    def store(self, il: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """k (T, n_kv, hd), v (T, n_kv, hd_v) in float32 for positions pos0..pos0+T-1 (rounded to f16)."""
        T = k.shape[0]
        if self.kv_type == "f16":
            k, v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
        self.k[il, :, pos0:pos0 + T] = k.transpose(1, 0, 2)
        self.v[il, :, pos0:pos0 + T] = v.transpose(1, 0, 2)

    def truncate(self, n: int) -> None:
        """Forget positions n and later (their slots are overwritten by the next evaluation)."""
        del self.tokens[n:]

    def clear(self) -> None:
        self.tokens.clear()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
