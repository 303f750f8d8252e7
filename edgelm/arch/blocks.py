"""The numeric pieces of a transformer layer, in float32 like transformers' reference computation."""
from __future__ import annotations

import numba as nb
import numpy as np

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


@nb.njit(fastmath=True, cache=True)
def _rms_norm_rows(x, w, eps, out):
    n = x.shape[1]
    for i in range(x.shape[0]):
        ss = np.float32(0.0)
        for j in range(n):
            ss += x[i, j] * x[i, j]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(n) + eps)
        for j in range(n):
            out[i, j] = x[i, j] * r * w[j]


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x * rsqrt(mean(x^2) + eps) * weight over the last axis (transformers LlamaRMSNorm), in one compiled
    pass: a dozen NumPy calls per norm cost more than the arithmetic at decode sizes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1])
    out = np.empty_like(rows)
    _rms_norm_rows(rows, np.ascontiguousarray(weight, dtype=np.float32), np.float32(eps), out)
    return out.reshape(x.shape)


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float) -> np.ndarray:
    mu = np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
    xc = x - mu
    var = np.mean(np.square(xc), axis=-1, keepdims=True, dtype=np.float32)
    y = xc * (1.0 / np.sqrt(var + np.float32(eps))) * weight
    return y if bias is None else y + bias


def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(-x))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (transformers 'gelu_pytorch_tanh'): 0.5·x·(1 + tanh(z)) written as
    x / (1 + exp(-2z)), the same function, because NumPy's float32 exp is SIMD and tanh is not (~30% faster)."""
    z = _SQRT_2_OVER_PI * (x + np.float32(0.044715) * x * x * x)
    with np.errstate(over="ignore"):
        return x / (np.float32(1.0) + np.exp(np.float32(-2.0) * z))


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}
NORMS = {"rms": lambda x, w, b, eps: rms_norm(x, w, eps), "layer": layer_norm}


class Rope:
    """Rotary embeddings for one (base, dim, style), with cos/sin computed as transformers does
    (inv_freq and angles in float32) so positions far into the context round the same way."""

    def __init__(self, base: float, dim: int, style: str):
        self.dim, self.style = dim, style
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        self.inv_freq = (np.float32(1.0) / (np.float32(base) ** exponent)).astype(np.float32)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ang = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        return np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]   # (T, 1, dim/2): broadcast over heads

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        """Rotate x (T, heads, head_dim) in place; only the first `dim` features of each head rotate."""
        half = self.dim // 2
        if self.style == "neox":       # pairs (i, i + dim/2)
            a, b = x[..., :half], x[..., half:self.dim]
        else:                          # "norm": pairs (2i, 2i+1)
            a, b = x[..., 0:self.dim:2], x[..., 1:self.dim:2]
        a0 = a.copy()
        a[...] = a0 * cos - b * sin
        b[...] = b * cos + a0 * sin
