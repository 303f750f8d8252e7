"""The one forward pass: every supported architecture is this decoder plus its ArchTraits.

Tensor names are llama.cpp's (gguf-py constants.py TENSOR_NAMES): token_embd, output_norm, output,
blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm, post_attention_norm,
ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import GGUFError
from ..gguf_file import GGUFFile
from ..kv_cache import KVCache
from ..quant import kernels
from ..quant.kernels import FusedLinear
from ..quant.formats import dequantize
from .attention import attention
from .blocks import ACTIVATIONS, NORMS, Rope


@dataclass
class Linear:
    """A weight matrix kept in its quantized blocks; y = x @ W.T computed block by block."""
    name: str
    raw: np.ndarray      # uint8 (n_out, row_bytes), a view of the mapped file
    ggml_type: int
    n_out: int
    n_in: int

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:
            return kernels.matvec(self.raw, self.ggml_type, self.n_out, self.n_in, x[0])[None, :]
        return kernels.matmul(self.raw, self.ggml_type, self.n_out, self.n_in, x)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return kernels.get_rows(self.raw, self.ggml_type, self.n_in, ids)


@dataclass
class Layer:
    attn_norm: np.ndarray
    wq: Linear
    wk: Linear
    wv: Linear
    wo: Linear
    ffn_norm: np.ndarray
    w_gate: Linear
    w_up: Linear
    w_down: Linear
    q_norm: np.ndarray | None
    k_norm: np.ndarray | None
    post_attn_norm: np.ndarray | None
    post_ffn_norm: np.ndarray | None
    rope: Rope
    window: int
    qkv: FusedLinear | None = None      # wq, wk, wv in one parallel region (they share their input)
    gate_up: FusedLinear | None = None  # w_gate, w_up likewise

    def __post_init__(self):
        self.qkv = FusedLinear([self.wq, self.wk, self.wv], self.wq.n_in)
        self.gate_up = FusedLinear([self.w_gate, self.w_up], self.w_gate.n_in)


class Weights:
    """Looks tensors up by name and checks their shapes, naming the tensor on any mismatch."""

    def __init__(self, g: GGUFFile):
        self.g = g

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.g.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.g.path}: tensor {name} is missing")
        if tuple(info.shape) != shape:
            raise GGUFError(f"{self.g.path}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        return info

    def linear(self, name: str, n_in: int, n_out: int) -> Linear:
        info = self._info(name, (n_in, n_out))
        return Linear(name, self.g.tensor(name), info.ggml_type, n_out, n_in)

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self._info(name, (n,))
        raw = self.g.tensor(name)
        if info.ggml_type == 0:                          # F32: a zero-copy view
            return raw.view(np.float32).reshape(n)
        return dequantize(raw, info.ggml_type, n).reshape(n)

    def optional_vector(self, name: str, n: int) -> np.ndarray | None:
        return self.vector(name, n) if name in self.g.tensors else None

    def has(self, name: str) -> bool:
        return name in self.g.tensors


class Decoder:
    def __init__(self, cfg: ModelConfig, g: GGUFFile):
        self.cfg = cfg
        t = cfg.traits
        w = Weights(g)
        d, hq, hk = cfg.n_embd, cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim
        hv = cfg.n_head_kv * cfg.head_dim_v
        self.tok_embd = w.linear("token_embd.weight", d, cfg.n_vocab)
        # Tied embeddings: no output.weight means the embedding matrix is the output projection too.
        self.output = w.linear("output.weight", d, cfg.n_vocab) if w.has("output.weight") else self.tok_embd
        self.output_norm = w.vector("output_norm.weight", d)
        self.embed_scale = np.float32(math.sqrt(d)) if t.embed_scale_sqrt_dim else None
        self.norm = NORMS[t.norm]
        self.act = ACTIVATIONS[t.activation]
        rope_global = Rope(cfg.rope_base, cfg.rope_dim, t.rope_style)
        rope_local = Rope(cfg.rope_base_swa, cfg.rope_dim, t.rope_style)
        self.layers = []
        for il in range(cfg.n_layer):
            p = f"blk.{il}."
            swa = cfg.is_swa_layer(il)
            self.layers.append(Layer(
                attn_norm=w.vector(p + "attn_norm.weight", d),
                wq=w.linear(p + "attn_q.weight", d, hq),
                wk=w.linear(p + "attn_k.weight", d, hk),
                wv=w.linear(p + "attn_v.weight", d, hv),
                wo=w.linear(p + "attn_output.weight", cfg.n_head * cfg.head_dim_v, d),
                ffn_norm=w.vector(p + "ffn_norm.weight", d),
                w_gate=w.linear(p + "ffn_gate.weight", d, cfg.n_ff),
                w_up=w.linear(p + "ffn_up.weight", d, cfg.n_ff),
                w_down=w.linear(p + "ffn_down.weight", cfg.n_ff, d),
                q_norm=w.vector(p + "attn_q_norm.weight", cfg.head_dim) if t.qk_norm else None,
                k_norm=w.vector(p + "attn_k_norm.weight", cfg.head_dim) if t.qk_norm else None,
                post_attn_norm=w.vector(p + "post_attention_norm.weight", d) if t.sandwich_norm else None,
                post_ffn_norm=w.vector(p + "post_ffw_norm.weight", d) if t.sandwich_norm else None,
                rope=rope_local if swa else rope_global,
                window=cfg.sliding_window if swa else 0,
            ))

    def forward(self, ids: np.ndarray, pos0: int, cache: KVCache, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens `ids` at positions pos0.. (their K/V go into the cache).
        Returns logits (T, n_vocab) if all_logits, else the last position's (n_vocab,)."""
        cfg = self.cfg
        eps = cfg.norm_eps
        T = len(ids)
        x = self.tok_embd.rows(np.asarray(ids, dtype=np.int64))
        if self.embed_scale is not None:
            x *= self.embed_scale
        positions = np.arange(pos0, pos0 + T)
        cos_sin = {}
        for il, L in enumerate(self.layers):
            if L.rope not in cos_sin:
                cos_sin[L.rope] = L.rope.cos_sin(positions)
            cos, sin = cos_sin[L.rope]
            h = self.norm(x, L.attn_norm, None, eps)
            q, k, v = L.qkv(h)
            q = q.reshape(T, cfg.n_head, cfg.head_dim)
            k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
            v = v.reshape(T, cfg.n_head_kv, cfg.head_dim_v)
            if L.q_norm is not None:
                q = self.norm(q, L.q_norm, None, eps)
                k = self.norm(k, L.k_norm, None, eps)
            L.rope.apply(q, cos, sin)
            L.rope.apply(k, cos, sin)
            cache.store(il, pos0, k, v)
            a = attention(q, cache.k[il], cache.v[il], pos0, L.window, cfg.attn_scale)
            o = L.wo(a.reshape(T, cfg.n_head * cfg.head_dim_v))
            if L.post_attn_norm is not None:
                o = self.norm(o, L.post_attn_norm, None, eps)
            x += o
            h = self.norm(x, L.ffn_norm, None, eps)
            g, u = L.gate_up(h)
            f = self.act(g) * u
            f = L.w_down(f)
            if L.post_ffn_norm is not None:
                f = self.norm(f, L.post_ffn_norm, None, eps)
            x += f
        if not all_logits:
            x = x[-1:]
        x = self.norm(x, self.output_norm, None, eps)
        logits = self.output(np.ascontiguousarray(x))
        return logits if all_logits else logits[0]
