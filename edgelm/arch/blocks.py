"""The numeric pieces of a transformer layer, in float32 like transformers' reference computation."""
from __future__ import annotations

import math

import numba as nb
import numpy as np

_SQRT_2_OVER_PI = np.float32(np.sqrt(2.0 / np.pi))


# error_model="numpy": a division by zero gives inf/NaN as in NumPy instead of raising ZeroDivisionError, so
# weights that are garbage (a corrupted file that still passes every check) give garbage, not a traceback.
@nb.njit(fastmath=True, cache=True, error_model="numpy")
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


# gpt-oss's clamped SwiGLU (transformers models/gpt_oss/modeling_gpt_oss.py GptOssExperts._apply_gate;
# llama.cpp ggml swiglu_oai): config swiglu_alpha 1.702, swiglu_limit 7.0.
SWIGLU_OAI_ALPHA = np.float32(1.702)
SWIGLU_OAI_LIMIT = np.float32(7.0)


def swiglu_oai(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    g = np.minimum(gate, SWIGLU_OAI_LIMIT)
    u = np.clip(up, -SWIGLU_OAI_LIMIT, SWIGLU_OAI_LIMIT)
    with np.errstate(over="ignore"):
        glu = g / (np.float32(1.0) + np.exp(-SWIGLU_OAI_ALPHA * g))
    return (u + np.float32(1.0)) * glu


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}
# Gated MLPs: act(gate) * up, or a function of both.
GLUS = {"silu": lambda g, u: silu(g) * u, "gelu_tanh": lambda g, u: gelu_tanh(g) * u, "swiglu_oai": swiglu_oai}
NORMS = {"rms": lambda x, w, b, eps: rms_norm(x, w, eps), "layer": layer_norm}


def rope_frequencies(base: float, dim: int, scaling: str = "none", factor: float = 1.0, orig_ctx: int = 0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0, truncate: bool = True,
                     freq_factors: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """(inv_freq float32 (dim/2,), cos/sin multiplier), computed as transformers' modeling_rope_utils.py does
    (default, linear and yarn rope types, float32 arrays, Python floats for the scalars). Llama-3 scaling
    arrives as per-frequency divisors (llama.cpp's rope_freqs tensor, made at conversion)."""
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = (np.float32(base) ** exponent).astype(np.float32)
    inv_freq = (np.float32(1.0) / pos_freqs).astype(np.float32)
    attn_factor = 1.0
    if scaling == "linear":
        inv_freq = (inv_freq / np.float32(factor)).astype(np.float32)
    elif scaling == "yarn":
        # _compute_yarn_parameters: ramp between the dims that rotate beta_fast and beta_slow times over the
        # original context; attention factor 0.1 ln(factor) + 1.
        def correction_dim(n_rot):
            return (dim * math.log(orig_ctx / (n_rot * 2 * math.pi))) / (2 * math.log(base))
        low, high = correction_dim(beta_fast), correction_dim(beta_slow)
        if truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = (np.float32(1.0) - ramp).astype(np.float32)
        interpolation = (np.float32(1.0) / (np.float32(factor) * pos_freqs)).astype(np.float32)
        inv_freq = (interpolation * (np.float32(1.0) - extrapolation) + inv_freq * extrapolation).astype(np.float32)
        attn_factor = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    if freq_factors is not None:
        inv_freq = (inv_freq / freq_factors.astype(np.float32)).astype(np.float32)
    return inv_freq, attn_factor


class Rope:
    """Rotary embeddings for one set of frequencies and style, with cos/sin computed as transformers does
    (angles in float32) so positions far into the context round the same way."""

    def __init__(self, inv_freq: np.ndarray, style: str, attn_factor: float = 1.0):
        self.dim, self.style = 2 * len(inv_freq), style
        self.inv_freq = np.asarray(inv_freq, np.float32)
        self.attn_factor = np.float32(attn_factor)

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ang = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(ang), np.sin(ang)
        if self.attn_factor != 1:
            cos *= self.attn_factor
            sin *= self.attn_factor
        return cos[:, None, :], sin[:, None, :]   # (T, 1, dim/2): broadcast over heads

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None:
        """Rotate x (T, heads, head_dim) in place; only the first `dim` features of each head rotate."""
        if (x.flags.c_contiguous and cos.flags.c_contiguous and sin.flags.c_contiguous
                and cos.shape[0] in (1, x.shape[0]) and sin.shape == cos.shape):
            # one compiled pass (the NumPy form below costs ~8 us per call at decode sizes, 60 calls a token)
            _rope_rows(x, cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1), self.dim,
                       self.style == "neox")
            return
        half = self.dim // 2
        if self.style == "neox":       # pairs (i, i + dim/2)
            a, b = x[..., :half], x[..., half:self.dim]
        else:                          # "norm": pairs (2i, 2i+1)
            a, b = x[..., 0:self.dim:2], x[..., 1:self.dim:2]
        a0 = a.copy()
        a[...] = a0 * cos - b * sin
        b[...] = b * cos + a0 * sin


# No fastmath: the same float32 multiplies and adds as the NumPy form of Rope.apply (no FMA), so the same bits.
@nb.njit(cache=True)
def _rope_rows(x, cos, sin, dim, neox):
    """x (T, heads, head_dim) rotated in place by cos/sin (T or 1, dim/2; one row applies to every t): pairs
    (i, i + dim/2) (neox) or (2i, 2i+1)."""
    half = dim // 2
    for t in range(x.shape[0]):
        tc = t if cos.shape[0] > 1 else 0
        for h in range(x.shape[1]):
            for i in range(half):
                ia, ib = (i, i + half) if neox else (2 * i, 2 * i + 1)
                a0, b0 = x[t, h, ia], x[t, h, ib]
                c, s = cos[tc, i], sin[tc, i]
                x[t, h, ia] = a0 * c - b0 * s
                x[t, h, ib] = b0 * c + a0 * s
