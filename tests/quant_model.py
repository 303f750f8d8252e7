"""Small llama-architecture GGUFs whose every matrix is one quant type, filled with random valid blocks, and a
NumPy forward pass over the weights as gguf-py decodes them (no edgelm code): the file-level check of each
quant type in tests/test_quant_files.py, and the files tools/make_quant_golden.py runs in llama.cpp.

Random blocks, not a quantizer's output, because llama.cpp writes the i-quants below IQ4 only with an importance
matrix; random bytes also reach every code and packed scale.  Each block's f16 scale is set so the weights have
a chosen spread, which keeps the activations of the random network in a normal range.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import gguf
import numpy as np

T = gguf.GGMLQuantizationType
TINY_TOKENIZER = Path(__file__).parent / "data" / "tiny" / "llama"   # a 512-token BPE vocabulary
SHAPE = dict(n_embd=256, n_layer=2, n_head=4, n_head_kv=2, n_ff=512, n_vocab=512, n_ctx=256)
RMS_EPS = 1e-5
ROPE_BASE = 10000.0
WEIGHT_STD = 0.05

# Byte offsets of the f16 scale fields in one block (ggml-common.h block_* structs); the default is a leading
# f16 d.  IQ1_M has no d field: its d is the top nibbles of its four u16 scales (bytes 48..55).
_SCALE_FIELDS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
                 T.TQ1_0: (52,), T.TQ2_0: (64,), T.IQ1_M: ()}


def set_block_scales(blocks: np.ndarray, qtype, d: np.ndarray, dmin: np.ndarray | None = None) -> None:
    """Write the f16 scales `d` (one per block; `dmin`, default d, for the types with a second field) into
    blocks (n_blocks, type_size) uint8, in place."""
    for k, off in enumerate(_SCALE_FIELDS.get(qtype, (0,))):
        scale = d if k == 0 or dmin is None else dmin
        blocks[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype == T.IQ1_M:
        bits = d.astype(np.float16).view(np.uint16)
        sc = blocks[:, 48:56].copy().view(np.uint16)
        for k in range(4):
            sc[:, k] = (sc[:, k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
        blocks[:, 48:56] = sc.view(np.uint8)


def random_blocks(rng, qtype, n_rows: int, n_in: int, std: float = WEIGHT_STD) -> np.ndarray:
    """(n_rows, row_bytes) uint8 of random blocks whose weights have about this std (scales vary 0.5-1.5x)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n_blocks = n_rows * n_in // block
    blocks = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    if qtype == T.Q2_K:     # minimums as a quantizer sets them: each sub-block centred (codes 0..3, m = 3/4 sc
        sc = blocks[:, :16] & 0x0F  # with dmin = 2d), or the random offsets dominate every dot product
        blocks[:, :16] = sc | (np.rint(0.75 * sc).astype(np.uint8) << 4)
    # Q2_K: dmin = 2d, the centring above assumes it
    second = 2.0 if qtype == T.Q2_K else 1.0
    ones = np.ones(n_blocks)
    set_block_scales(blocks, qtype, ones, second * ones)
    # the weights' spread at d = 1, from at most 4096 blocks (all of them in the test files)
    unit = float(gguf.quants.dequantize(blocks[:4096], qtype).std())
    d = std / unit * rng.uniform(0.5, 1.5, n_blocks)
    set_block_scales(blocks, qtype, d, second * d)
    return blocks.reshape(n_rows, -1)


def _tensors(qtype, seed: int, embedding_only: bool = False, shape: dict = SHAPE, edge_rows: bool = True):
    """(name, array, raw_dtype or None) of the model, in file order.  embedding_only: only token_embd has the
    type; the rest is float32 with zero attention-output and down projections, so the layers add nothing and
    the logits are a float32 function of the decoded embedding rows (a probe of a runtime's decode alone).
    qtype F16: a float file of Gaussian weights (and some edge rows, _edge_rows), the input of a quantizer."""
    s = shape
    d, hd = s["n_embd"], s["n_embd"] // s["n_head"]
    kv = s["n_head_kv"] * hd
    rng = np.random.default_rng([seed, int(qtype)])

    def norm():
        return rng.uniform(0.8, 1.2, d).astype(np.float32)

    def mat(rows, cols, zero=False):
        if qtype == T.F16:          # a float file, the input of a quantizer
            return (rng.standard_normal((rows, cols)) * WEIGHT_STD).astype(np.float16), None
        if embedding_only:
            m = np.zeros((rows, cols), np.float32) if zero else rng.standard_normal((rows, cols)) * WEIGHT_STD
            return m.astype(np.float32), None
        return random_blocks(rng, qtype, rows, cols), qtype

    def experts(n, rows, cols):
        assert qtype == T.F16, "expert tensors only in F16 files"
        return (rng.standard_normal((n, rows, cols)) * WEIGHT_STD).astype(np.float16), None

    embd = (rng.standard_normal((s["n_vocab"], d)).astype(np.float16), None) if qtype == T.F16 else \
        (random_blocks(rng, qtype, s["n_vocab"], d, 1.0), qtype)
    out = [("token_embd.weight", *embd),
           ("output_norm.weight", norm(), None),
           ("output.weight", *mat(s["n_vocab"], d))]
    for il in range(s["n_layer"]):
        p = f"blk.{il}."
        out += [(p + "attn_norm.weight", norm(), None),
                (p + "attn_q.weight", *mat(d, d)),
                (p + "attn_k.weight", *mat(kv, d)),
                (p + "attn_v.weight", *mat(kv, d)),
                (p + "attn_output.weight", *mat(d, d, zero=True)),
                (p + "ffn_norm.weight", norm(), None)]
        if s.get("n_expert"):        # Mixtral's layout: a router and 3-D expert tensors (F16 files only)
            e = s["n_expert"]
            out += [(p + "ffn_gate_inp.weight", rng.standard_normal((e, d)).astype(np.float32), None),
                    (p + "ffn_gate_exps.weight", *experts(e, s["n_ff"], d)),
                    (p + "ffn_up_exps.weight", *experts(e, s["n_ff"], d)),
                    (p + "ffn_down_exps.weight", *experts(e, d, s["n_ff"]))]
            continue
        out += [(p + "ffn_gate.weight", *mat(s["n_ff"], d)),
                (p + "ffn_up.weight", *mat(s["n_ff"], d)),
                (p + "ffn_down.weight", *mat(d, s["n_ff"], zero=True))]
    if qtype == T.F16 and edge_rows:
        tensors = dict((n, a) for n, a, _ in out)
        _edge_rows(tensors.get("blk.0.ffn_gate.weight", tensors["blk.0.attn_q.weight"]))
    return out


def _edge_rows(m: np.ndarray) -> None:
    """Rows a quantizer must get right beyond Gaussian data (in place, float16): zeros, constants of either
    sign, values at float16's subnormal end, one spike among zeros, a huge range, sub-blocks of zeros."""
    n = m.shape[1]
    m[0] = 0
    m[1] = 0.5
    m[2] = -0.25
    m[3] = np.float16(6e-8) * np.arange(n) % 7
    m[4] = 0
    m[4, n // 3] = 3.0
    m[5] = np.where(np.arange(n) % 2, 60000.0, -1e-3)
    m[6, :n // 2] = 0
    m[7] = np.abs(m[7])


def write_model(path, qtype, seed: int = 0, embedding_only: bool = False, shape: dict = SHAPE,
                edge_rows: bool = True) -> str:
    """Write the model with every matrix (embeddings and output too) of type `qtype` (see _tensors for
    embedding_only); returns a digest of its tensor data, the same wherever the file is made again.  `shape`:
    SHAPE's keys (tools/bench_quant_types.py writes larger ones; reference_logits reads only SHAPE's).  edge_rows:
    the F16 file's extreme rows (_edge_rows), off where a runtime must compute on it in float16 (they overflow)."""
    from edgelm.commands.convert.vocab import add_vocab

    s = shape
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"edgelm quant check {T(qtype).name} (random blocks)")
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(s["n_embd"])
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_dimension_count(s["n_embd"] // s["n_head"])
    w.add_rope_freq_base(ROPE_BASE)
    w.add_layer_norm_rms_eps(RMS_EPS)
    if s.get("n_expert"):
        w.add_expert_count(s["n_expert"])
        w.add_expert_used_count(2)
    add_vocab(w, TINY_TOKENIZER, s["n_vocab"], "llama")
    h = hashlib.sha256()
    for name, data, raw_dtype in _tensors(qtype, seed, embedding_only, shape, edge_rows):
        w.add_tensor(name, data, raw_dtype=raw_dtype)
        h.update(name.encode() + np.ascontiguousarray(data).tobytes())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return h.hexdigest()


def tensor_digests(path) -> dict:
    """Per tensor of a GGUF: [its type's name, the first 16 hex digits of the SHA-256 of its bytes] (how the
    goldens of llama.cpp's quantized files record them)."""
    return {t.name: [T(t.tensor_type).name, hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest()[:16]]
            for t in gguf.GGUFReader(str(path)).tensors}


def _rms_norm(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + RMS_EPS) * w


def _rope(x, pos, hd):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate adjacent pairs (2i, 2i + 1) by pos * base^(-2i / hd)."""
    theta = pos[:, None] * ROPE_BASE ** (-np.arange(0, hd, 2) / hd)            # (T, hd / 2)
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def reference_logits(path, ids) -> np.ndarray:
    """Logits at every position of `ids` (T, n_vocab), in float64 from the weights gguf-py's reader and
    dequantize give: an implementation that shares nothing with edgelm's."""
    reader = gguf.GGUFReader(str(path))
    W = {t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float64) for t in reader.tensors}
    s = SHAPE
    n_head, n_kv, hd = s["n_head"], s["n_head_kv"], s["n_embd"] // s["n_head"]
    ids = np.asarray(ids)
    n = len(ids)
    pos = np.arange(n, dtype=np.float64)
    x = W["token_embd.weight"][ids]
    mask = np.triu(np.full((n, n), -np.inf), 1)
    for il in range(s["n_layer"]):
        p = f"blk.{il}."
        h = _rms_norm(x, W[p + "attn_norm.weight"])
        q = _rope((h @ W[p + "attn_q.weight"].T).reshape(n, n_head, hd), pos, hd)
        k = _rope((h @ W[p + "attn_k.weight"].T).reshape(n, n_kv, hd), pos, hd)
        v = (h @ W[p + "attn_v.weight"].T).reshape(n, n_kv, hd)
        heads = []
        for j in range(n_head):
            kj = j // (n_head // n_kv)
            a = q[:, j] @ k[:, kj].T / np.sqrt(hd) + mask
            a = np.exp(a - a.max(-1, keepdims=True))
            heads.append((a / a.sum(-1, keepdims=True)) @ v[:, kj])
        x = x + np.concatenate(heads, -1) @ W[p + "attn_output.weight"].T
        h = _rms_norm(x, W[p + "ffn_norm.weight"])
        g = h @ W[p + "ffn_gate.weight"].T
        x = x + (g / (1 + np.exp(-g)) * (h @ W[p + "ffn_up.weight"].T)) @ W[p + "ffn_down.weight"].T
    return _rms_norm(x, W["output_norm.weight"]) @ W["output.weight"].T


def importance_case(seed: int = 5, n_rows: int = 32, n_in: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Rows for the K-quant writers with importance weights (x float32 (n_rows, n_in), weights (n_in,)):
    scales over decades, degenerate rows, and weights with zeros and a long tail, as real imatrices have."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n_rows, n_in)) * np.exp(rng.uniform(-4, 2, (n_rows, 1)))).astype(np.float32)
    x[1] = 0
    x[2] = 0.5
    x[3, ::2] = 0
    x[4] *= np.float32(1e-30)
    w = (rng.gamma(0.5, 1.0, n_in) * 3).astype(np.float32)
    w[::17] = 0
    return x, w
