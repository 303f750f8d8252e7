"""The one forward pass: every supported architecture is this decoder plus its ArchTraits and the tensors
its file holds.

Tensor names are llama.cpp's (gguf-py constants.py TENSOR_NAMES): token_embd, position_embd, output_norm,
output, rope_freqs, blk.N.{attn_norm, attn_q, attn_k, attn_v | attn_qkv, attn_output, attn_q_norm,
attn_k_norm, attn_sinks, post_attention_norm, ffn_norm, ffn_gate, ffn_up, ffn_down, post_ffw_norm,
ffn_gate_inp, ffn_gate_exps, ffn_up_exps, ffn_down_exps}, each with an optional .bias beside its .weight.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..errors import GGUFError
from ..gguf_file import GGUFFile
from ..quant import kernels
from ..quant.kernels import FusedLinear
from ..quant.formats import dequantize
from .blocks import ACTIVATIONS, GLUS, NORMS, Rope, _rms_norm_rows, rope_frequencies


@dataclass
class Linear:
    """A weight matrix kept in its quantized blocks; y = x @ W.T (+ bias) computed block by block."""
    name: str
    raw: np.ndarray      # uint8 (n_out, row_bytes), a view of the mapped file
    ggml_type: int
    n_out: int
    n_in: int
    bias: np.ndarray | None = None
    kinds: int = 0       # the types the kernels are compiled for (kernels.kinds_mask): all the model's

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if x.shape[0] == 1:
            y = kernels.matvec(self.raw, self.ggml_type, self.n_out, self.n_in, x[0], kinds=self.kinds)[None, :]
        else:
            y = kernels.matmul(self.raw, self.ggml_type, self.n_out, self.n_in, x, kinds=self.kinds)
        if self.bias is not None:
            y += self.bias
        return y

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return kernels.get_rows(self.raw, self.ggml_type, self.n_in, ids, kinds=self.kinds)

    def split(self, sizes: list[int]) -> list["Linear"]:
        """Consecutive row ranges as their own matrices (views: fused QKV or gate/up stay in place)."""
        if sum(sizes) != self.n_out:
            raise GGUFError(f"tensor {self.name} has {self.n_out} rows, expected {sum(sizes)} ({sizes})")
        out, r = [], 0
        for n in sizes:
            b = None if self.bias is None else self.bias[r:r + n]
            out.append(Linear(self.name, self.raw[r:r + n], self.ggml_type, n, self.n_in, b, self.kinds))
            r += n
        return out


class Fused:
    """Matrices sharing one input, computed in one parallel region; biases added afterwards."""

    def __init__(self, parts: list[Linear]):
        kinds = 0
        for p in parts:
            kinds |= p.kinds
        self.kernel = FusedLinear(parts, parts[0].n_in, kinds)
        self.biases = [p.bias for p in parts]
        self.names = tuple(dict.fromkeys(p.name for p in parts))    # the file's tensors (fused QKV: one)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        ys = self.kernel(x)
        return [y if b is None else y + b for y, b in zip(ys, self.biases)]


class Weights:
    """Looks tensors up by name and checks their shapes, naming the tensor on any mismatch."""

    def __init__(self, g: GGUFFile):
        self.g = g
        # One kernel specialisation per model: compiled for exactly the types its file holds, so a first
        # run compiles only those (each type adds its own code to every kernel).
        self.kinds = kernels.kinds_mask({info.ggml_type for info in g.tensors.values()})

    def _info(self, name: str, shape: tuple[int, ...]):
        info = self.g.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.g.path}: tensor {name} is missing")
        if tuple(info.shape) != shape:
            raise GGUFError(f"{self.g.path}: tensor {name} has shape {list(info.shape)}, expected {list(shape)}")
        return info

    def has(self, name: str) -> bool:
        return name in self.g.tensors

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self._info(name, (n,))
        raw = self.g.tensor(name)
        if info.ggml_type == 0:                          # F32: a zero-copy view
            return raw.view(np.float32).reshape(n)
        return dequantize(raw, info.ggml_type, n, self.kinds).reshape(n)

    def optional_vector(self, name: str, n: int) -> np.ndarray | None:
        return self.vector(name, n) if self.has(name) else None

    def matrix_f32(self, name: str, n_in: int, n_rows: int) -> np.ndarray:
        """A small 2-D tensor (expert biases) as float32 (n_rows, n_in)."""
        info = self._info(name, (n_in, n_rows))
        return dequantize(self.g.tensor(name), info.ggml_type, n_in, self.kinds)

    def linear(self, stem: str, n_in: int, n_out: int) -> Linear:
        """`stem`.weight (n_out x n_in) with `stem`.bias if the file has one."""
        name = stem + ".weight"
        info = self._info(name, (n_in, n_out))
        return Linear(name, self.g.tensor(name), info.ggml_type, n_out, n_in,
                      self.optional_vector(stem + ".bias", n_out), self.kinds)

    def experts(self, stem: str, n_in: int, n_out: int, n_expert: int) -> list[Linear]:
        """A 3-D expert tensor (n_expert matrices n_out x n_in, stacked) as one Linear view per expert."""
        name = stem + ".weight"
        info = self._info(name, (n_in, n_out, n_expert))
        raw = self.g.tensor(name)
        bias = self.matrix_f32(stem + ".bias", n_out, n_expert) if self.has(stem + ".bias") else None
        return [Linear(f"{name}[{e}]", raw[e * n_out:(e + 1) * n_out], info.ggml_type, n_out, n_in,
                       None if bias is None else bias[e], self.kinds) for e in range(n_expert)]


class GatedMLP:
    """down(glu(gate(x), up(x))): SwiGLU, GeGLU, gpt-oss's clamped SwiGLU."""

    def __init__(self, gate: Linear, up: Linear, down: Linear, glu_name: str):
        self.gate_up = Fused([gate, up])
        self.down, self.glu_name, self.glu = down, glu_name, GLUS[glu_name]
        self.n_ff = gate.n_out

    def __call__(self, h: np.ndarray) -> np.ndarray:
        g, u = self.gate_up(h)
        return self.down(self.glu(g, u))


class PlainMLP:
    """down(act(up(x))): GPT-2."""

    def __init__(self, up: Linear, down: Linear, act_name: str):
        self.up, self.down, self.act_name, self.act = up, down, act_name, ACTIVATIONS[act_name]

    def __call__(self, h: np.ndarray) -> np.ndarray:
        return self.down(self.act(self.up(h)))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class MoE:
    """Routed experts: a linear router picks n_used experts per token and mixes their outputs.

    "softmax_topk" (Qwen3-MoE): probabilities over all experts, keep the top k, optionally renormalised.
    "topk_softmax" (gpt-oss): keep the top-k router logits, softmax over those. Only experts that some token
    chose are evaluated, each once over all of its tokens."""

    def __init__(self, router: Linear, experts: list[GatedMLP], n_used: int, routing: str, norm_weights: bool):
        self.router, self.experts = router, experts
        self.n_used, self.routing, self.norm_weights = n_used, routing, norm_weights

    def __call__(self, h: np.ndarray, obs=None) -> np.ndarray:
        """obs: the decoder's observer, shown each expert's input rows (as llama-imatrix sees MUL_MAT_ID)."""
        if obs is not None:
            obs((self.router.name,), h)
        logits = self.router(h)                                      # (T, n_expert)
        k = self.n_used
        if self.routing == "topk_softmax":
            top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            weights = _softmax(np.take_along_axis(logits, top, axis=1))
        else:
            probs = _softmax(logits)
            top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            weights = np.take_along_axis(probs, top, axis=1)
            if self.norm_weights:
                weights = weights / weights.sum(axis=1, keepdims=True)
        out = np.zeros_like(h)
        for e in np.unique(top):
            tok, slot = np.nonzero(top == e)
            x = np.ascontiguousarray(h[tok])
            y = self.experts[e](x) if obs is None else _observed_mlp(self.experts[e], x, obs, e, len(self.experts))
            out[tok] += weights[tok, slot][:, None] * y
        return out


def _observed_mlp(mlp, x: np.ndarray, obs, expert: int = 0, n_expert: int = 1) -> np.ndarray:
    """A GatedMLP's or PlainMLP's __call__, showing the observer the inputs of its matrices (by the file's
    tensor names: an expert's view "blk.0.ffn_up_exps.weight[3]" is expert 3 of its tensor)."""
    def tensors(names):
        return tuple(n.partition("[")[0] for n in names)

    if isinstance(mlp, GatedMLP):
        obs(tensors(mlp.gate_up.names), x, expert, n_expert)
        a = mlp.glu(*mlp.gate_up(x))
    else:
        obs(tensors((mlp.up.name,)), x, expert, n_expert)
        a = mlp.act(mlp.up(x))
    obs(tensors((mlp.down.name,)), a, expert, n_expert)
    return mlp.down(a)


@dataclass
class Layer:
    attn_norm: tuple                   # (weight, bias or None)
    qkv: Fused
    wo: Linear
    ffn_norm: tuple
    mlp: object                        # GatedMLP | PlainMLP | MoE
    rope: Rope | None
    window: int
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None
    post_ffn_norm: np.ndarray | None = None
    sinks: np.ndarray | None = None


class Decoder:
    def __init__(self, cfg: ModelConfig, g: GGUFFile):
        self.cfg = cfg
        t = cfg.traits
        w = Weights(g)
        d = cfg.n_embd
        self.tok_embd = w.linear("token_embd", d, cfg.n_vocab)
        # Tied embeddings: no output.weight means the embedding matrix is the output projection too.
        self.output = w.linear("output", d, cfg.n_vocab) if w.has("output.weight") else self.tok_embd
        self.output_norm = self._norm(w, "output_norm", d)
        self.embed_scale = np.float32(math.sqrt(d)) if t.embed_scale_sqrt_dim else None
        self.pos_embd = w.linear("position_embd", d, cfg.n_ctx_train) if t.positions == "learned" else None
        self.norm = NORMS[t.norm]
        self.eps = np.float32(cfg.norm_eps)
        ropes = self._ropes(cfg, w) if t.positions == "rope" else {}
        self.layers = [self._layer(cfg, w, f"blk.{il}.", il, ropes) for il in range(cfg.n_layer)]
        # observer(names, x): sees the input rows x (T, n_in) of the named weight matrices of every layer
        # (the importance matrix, evaluate/imatrix.py); None in normal use.
        self.observer = None

    @staticmethod
    def _norm(w: Weights, stem: str, n: int) -> tuple:
        return w.vector(stem + ".weight", n), w.optional_vector(stem + ".bias", n)

    @staticmethod
    def _ropes(cfg: ModelConfig, w: Weights) -> dict[bool, Rope]:
        """The rotation of global layers (False) and sliding-window layers (True)."""
        factors = w.optional_vector("rope_freqs.weight", cfg.rope_dim // 2)   # Llama-3 scaling, made at conversion
        out = {}
        for swa, base in ((False, cfg.rope_base), (True, cfg.rope_base_swa)):
            scaled = not swa or cfg.traits.scale_swa_rope     # Gemma 3: local layers use plain RoPE
            inv_freq, attn_factor = rope_frequencies(
                base, cfg.rope_dim, cfg.rope_scaling if scaled else "none", cfg.rope_factor, cfg.rope_orig_ctx,
                cfg.yarn_beta_fast, cfg.yarn_beta_slow, cfg.traits.yarn_truncate, factors if scaled else None)
            out[swa] = Rope(inv_freq, cfg.traits.rope_style, attn_factor)
        return out

    def _layer(self, cfg: ModelConfig, w: Weights, p: str, il: int, ropes: dict) -> Layer:
        t = cfg.traits
        d = cfg.n_embd
        hq, hk, hv = cfg.n_head * cfg.head_dim, cfg.n_head_kv * cfg.head_dim, cfg.n_head_kv * cfg.head_dim_v
        if w.has(p + "attn_qkv.weight"):             # GPT-2 c_attn, Phi-3 qkv_proj: one matrix, split in place
            q, k, v = w.linear(p + "attn_qkv", d, hq + hk + hv).split([hq, hk, hv])
        else:
            q, k, v = (w.linear(p + "attn_q", d, hq), w.linear(p + "attn_k", d, hk), w.linear(p + "attn_v", d, hv))
        swa = cfg.is_swa_layer(il)
        return Layer(
            attn_norm=self._norm(w, p + "attn_norm", d),
            qkv=Fused([q, k, v]),
            wo=w.linear(p + "attn_output", cfg.n_head * cfg.head_dim_v, d),
            ffn_norm=self._norm(w, p + t.ffn_norm, d),
            mlp=self._mlp(cfg, w, p),
            rope=ropes.get(swa),
            window=cfg.sliding_window if swa else 0,
            q_norm=w.vector(p + "attn_q_norm.weight", cfg.head_dim) if t.qk_norm else None,
            k_norm=w.vector(p + "attn_k_norm.weight", cfg.head_dim) if t.qk_norm else None,
            post_attn_norm=w.vector(p + "post_attention_norm.weight", d) if t.sandwich_norm else None,
            post_ffn_norm=w.vector(p + "post_ffw_norm.weight", d) if t.sandwich_norm else None,
            sinks=w.optional_vector(p + "attn_sinks.weight", cfg.n_head),
        )

    @staticmethod
    def _mlp(cfg: ModelConfig, w: Weights, p: str):
        t = cfg.traits
        d = cfg.n_embd
        if w.has(p + "ffn_gate_inp.weight"):
            E, ff = cfg.n_expert, cfg.n_ff_exp
            if not E:
                raise GGUFError(f"{w.g.path}: tensor {p}ffn_gate_inp.weight needs {cfg.arch}.expert_count")
            gates = w.experts(p + "ffn_gate_exps", d, ff, E)
            ups = w.experts(p + "ffn_up_exps", d, ff, E)
            downs = w.experts(p + "ffn_down_exps", ff, d, E)
            return MoE(w.linear(p + "ffn_gate_inp", d, E),
                       [GatedMLP(g_, u_, dn, t.activation) for g_, u_, dn in zip(gates, ups, downs)],
                       cfg.n_expert_used, t.moe_routing, cfg.expert_weights_norm)
        ff = cfg.n_ff
        down = w.linear(p + "ffn_down", ff, d)
        if not t.gated_mlp:
            return PlainMLP(w.linear(p + "ffn_up", d, ff), down, t.activation)
        if w.has(p + "ffn_gate.weight"):
            gate, up = w.linear(p + "ffn_gate", d, ff), w.linear(p + "ffn_up", d, ff)
        else:                                          # Phi-3 gate_up_proj: gate rows first, then up
            gate, up = w.linear(p + "ffn_up", d, 2 * ff).split([ff, ff])
        return GatedMLP(gate, up, down, t.activation)

    @property
    def max_positions(self) -> int | None:
        """Learned position embeddings end somewhere; RoPE does not."""
        return None if self.pos_embd is None else self.pos_embd.n_out

    def workspace(self, n_rows: int) -> "Workspace":
        """Work arrays for one forward pass of up to n_rows tokens (a session keeps one for decode, one for
        prompt batches)."""
        return Workspace(self.cfg, n_rows)

    def forward(self, ids: np.ndarray, pos0: int, session, all_logits: bool = False) -> np.ndarray:
        """Evaluate tokens `ids` at positions pos0.. ; their K/V go into the session's per-layer caches.
        Returns logits (T, n_vocab) if all_logits (a new array), else the last position's (n_vocab,): a view
        of the session's work buffer, valid until its next forward pass."""
        return self.forward_rows(ids, [(session, pos0, len(ids))], session.workspace(len(ids)), all_logits)

    def forward_rows(self, ids: np.ndarray, groups: list, ws: "Workspace", all_logits: bool = False) -> np.ndarray:
        """forward() of rows from one or several sessions at once: `groups` lists (session, pos0, n) in the
        order of `ids`, n consecutive tokens of that session from position pos0 (a batch of sequences is one
        group per sequence).  Every matrix is read once for all rows.

        Up to kernels.BATCH_ROWS rows are evaluated as that many decode steps would be: each row's matvecs
        and its attention over its own session's cache are the decode kernels' (the same bits), so verifying
        a draft or stepping a batch of sequences gives exactly plain decoding's logits.  Longer batches are a
        prompt: matmul and blockwise causal attention.

        Intermediate values live in the preallocated work arrays `ws` (llama2.c's RunState); what still
        allocates per call: positions and RoPE cos/sin, RoPE's temporaries, LayerNorm (GPT-2), MoE routing,
        gpt-oss' clamped SwiGLU."""
        cfg = self.cfg
        T = len(ids)
        positions = np.concatenate([np.arange(p0, p0 + n) for _, p0, n in groups]) if len(groups) > 1 \
            else np.arange(groups[0][1], groups[0][1] + T)
        as_decode = T <= kernels.BATCH_ROWS
        with np.errstate(over="ignore"):              # exp overflow in GELU/SiLU is +inf -> 0/x, as intended
            x = self._embed(ids, positions, ws)
            cos_sin = {}
            obs = self.observer
            for il, L in enumerate(self.layers):
                h = self._apply_norm(x, L.attn_norm, ws.h[:T])
                if obs is not None:
                    obs(L.qkv.names, h)
                q, k, v = self._qkv(L, h, ws, T)
                if L.rope is not None:
                    if L.rope not in cos_sin:
                        cos_sin[L.rope] = L.rope.cos_sin(positions)
                    cos, sin = cos_sin[L.rope]
                    L.rope.apply(q, cos, sin)
                    L.rope.apply(k, cos, sin)
                a = ws.attn[:T]
                r = 0
                for session, p0, n in groups:
                    cache = session.caches[il]
                    cache.store(p0, k[r:r + n], v[r:r + n])
                    if as_decode:                     # each row as its own decode step
                        for i in range(r, r + n):
                            cache.attend(q[i:i + 1], p0 + i - r, cfg.attn_scale, L.sinks, a[i:i + 1])
                    else:
                        cache.attend(q[r:r + n], p0, cfg.attn_scale, L.sinks, a[r:r + n])
                    r += n
                a2 = a.reshape(T, cfg.n_head * cfg.head_dim_v)
                if obs is not None:
                    obs((L.wo.name,), a2)
                o = _linear_into(L.wo, a2, ws.o[:T])
                if L.post_attn_norm is not None:
                    o = self._apply_norm(o, (L.post_attn_norm, None), o)
                x += o
                f = self._run_mlp(L, self._apply_norm(x, L.ffn_norm, ws.h[:T]), ws, T, obs)
                if L.post_ffn_norm is not None:
                    f = self._apply_norm(f, (L.post_ffn_norm, None), f)
                x += f
            return self._logits(x, ws, all_logits)

    def _embed(self, ids, positions: np.ndarray, ws: "Workspace") -> np.ndarray:
        T = len(ids)
        x = kernels.get_rows(self.tok_embd.raw, self.tok_embd.ggml_type, self.tok_embd.n_in, ids, out=ws.x[:T],
                             kinds=self.tok_embd.kinds)
        if self.embed_scale is not None:
            x *= self.embed_scale
        if self.pos_embd is not None:
            x += self.pos_embd.rows(positions)
        return x

    def _apply_norm(self, x: np.ndarray, weights: tuple, out: np.ndarray) -> np.ndarray:
        """The model's norm of x (T, n) written into out (may be x itself)."""
        w, b = weights
        if self.cfg.traits.norm == "rms":       # the compiled row kernel of blocks.rms_norm, into `out`
            _rms_norm_rows(x, w, self.eps, out)
        else:
            out[...] = self.norm(x, w, b, self.cfg.norm_eps)
        return out

    def _qkv(self, L: Layer, h: np.ndarray, ws: "Workspace", T: int):
        """q (T, n_head, hd), k (T, n_kv, hd), v (T, n_kv, hd_v): views of the work buffer, biased, q/k-normed."""
        cfg = self.cfg
        q, k, v = _fused_into(L.qkv, h, ws.qkv[:T * L.qkv.kernel.n_total])
        q = q.reshape(T, cfg.n_head, cfg.head_dim)
        k = k.reshape(T, cfg.n_head_kv, cfg.head_dim)
        v = v.reshape(T, cfg.n_head_kv, cfg.head_dim_v)
        if L.q_norm is not None:                # per head, in place
            _rms_norm_rows(q.reshape(-1, cfg.head_dim), L.q_norm, self.eps, q.reshape(-1, cfg.head_dim))
            _rms_norm_rows(k.reshape(-1, cfg.head_dim), L.k_norm, self.eps, k.reshape(-1, cfg.head_dim))
        return q, k, v

    def _run_mlp(self, L: Layer, h: np.ndarray, ws: "Workspace", T: int, obs=None) -> np.ndarray:
        mlp = L.mlp
        if isinstance(mlp, GatedMLP) and mlp.glu_name in _GLU_INTO:
            if obs is not None:
                obs(mlp.gate_up.names, h)
            g, u = _fused_into(mlp.gate_up, h, ws.ffn[:2 * T * mlp.n_ff])
            _GLU_INTO[mlp.glu_name](g, ws.ffn_tmp[:T])
            g *= u
            if obs is not None:
                obs((mlp.down.name,), g)
            return _linear_into(mlp.down, g, ws.f[:T])
        if isinstance(mlp, PlainMLP) and mlp.act_name in _GLU_INTO:
            if obs is not None:
                obs((mlp.up.name,), h)
            up = _linear_into(mlp.up, h, ws.ffn[:T * mlp.up.n_out].reshape(T, mlp.up.n_out))
            _GLU_INTO[mlp.act_name](up, ws.ffn_tmp[:T])
            if obs is not None:
                obs((mlp.down.name,), up)
            return _linear_into(mlp.down, up, ws.f[:T])
        if obs is not None:                      # an importance matrix: the observed (allocating) paths
            return mlp(h, obs) if isinstance(mlp, MoE) else _observed_mlp(mlp, h, obs)
        return mlp(h)                            # MoE, clamped SwiGLU: their own (allocating) code

    def _logits(self, x: np.ndarray, ws: "Workspace", all_logits: bool) -> np.ndarray:
        if all_logits:
            h = self._apply_norm(x, self.output_norm, ws.h[:len(x)])
            if self.observer is not None:
                self.observer((self.output.name,), h)
            return self.output(h)
        h = self._apply_norm(x[-1:], self.output_norm, ws.h[:1])
        return kernels.matvec(self.output.raw, self.output.ggml_type, self.output.n_out, self.output.n_in,
                              h[0], out=ws.logits, kinds=self.output.kinds)


def _fused_into(f: Fused, x: np.ndarray, out: np.ndarray) -> list[np.ndarray]:
    """Fused matrices of x (T, n_in) into the flat buffer `out`; views (T, n_out_j), biases added in place."""
    ys = f.kernel.matmul(x, out=out)
    for y, b in zip(ys, f.biases):
        if b is not None:
            y += b
    return ys


def _linear_into(lin: Linear, x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """lin(x) for x (T, n_in) written into out (T, n_out)."""
    if x.shape[0] == 1:
        kernels.matvec(lin.raw, lin.ggml_type, lin.n_out, lin.n_in, x[0], out=out[0], kinds=lin.kinds)
    else:
        kernels.matmul(lin.raw, lin.ggml_type, lin.n_out, lin.n_in, x, out=out, kinds=lin.kinds)
    if lin.bias is not None:
        out += lin.bias
    return out


# In-place forms of blocks.silu and blocks.gelu_tanh: the same float32 operations in the same order (so the
# same bits), written into the gate buffer with one scratch array instead of a temporary per operation.
def _silu_into(g: np.ndarray, tmp: np.ndarray) -> None:
    np.negative(g, out=tmp)
    np.exp(tmp, out=tmp)
    np.add(np.float32(1.0), tmp, out=tmp)
    np.divide(g, tmp, out=g)


_GELU_C = np.float32(np.sqrt(2.0 / np.pi))


def _gelu_tanh_into(g: np.ndarray, tmp: np.ndarray) -> None:
    np.multiply(np.float32(0.044715), g, out=tmp)
    tmp *= g
    tmp *= g
    np.add(g, tmp, out=tmp)
    np.multiply(_GELU_C, tmp, out=tmp)
    np.multiply(np.float32(-2.0), tmp, out=tmp)
    np.exp(tmp, out=tmp)
    np.add(np.float32(1.0), tmp, out=tmp)
    np.divide(g, tmp, out=g)


_GLU_INTO = {"silu": _silu_into, "gelu_tanh": _gelu_tanh_into}


class Workspace:
    """The work arrays of one forward pass of up to n_rows tokens (llama2.c's RunState): the decoder writes
    every intermediate of a layer into these instead of allocating it. Row slices [:T] stay contiguous."""

    def __init__(self, cfg: ModelConfig, n_rows: int):
        d, f32 = cfg.n_embd, np.float32
        n_ff = max(cfg.n_ff or 0, cfg.n_ff_exp or 0, 1)
        n_qkv = (cfg.n_head + cfg.n_head_kv) * cfg.head_dim + cfg.n_head_kv * cfg.head_dim_v
        self.n_rows = n_rows
        self.x = np.zeros((n_rows, d), f32)                  # the residual stream
        self.h = np.zeros((n_rows, d), f32)                  # normed input of attention / MLP / output
        self.qkv = np.zeros(n_rows * n_qkv, f32)             # q, k, v of the fused projection
        self.attn = np.zeros((n_rows, cfg.n_head, cfg.head_dim_v), f32)
        self.o = np.zeros((n_rows, d), f32)                  # attention output projection
        self.ffn = np.zeros(2 * n_rows * n_ff, f32)          # gate and up (or up alone)
        self.ffn_tmp = np.zeros((n_rows, n_ff), f32)         # scratch of the activation
        self.f = np.zeros((n_rows, d), f32)                  # MLP output
        self.logits = np.zeros(cfg.n_vocab, f32)             # the last position's logits
