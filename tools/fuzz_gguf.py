"""Fuzz edgelm's GGUF loading with mutated small models: every case must end in success or a clean EdgeLMError.

    python3 tools/fuzz_gguf.py                 # 10,000 mutations, seed 0; prints the outcome counts
    python3 tools/fuzz_gguf.py -n 500 --seed 7 --timeout 10
    python3 tools/fuzz_gguf.py --replay tests/data/fuzz_regressions     # run saved cases only

Seeds are tiny models built here with gguf-py's GGUFWriter (the reference writer): llama with a
SentencePiece vocabulary, gemma3 (sliding window, QK-norm, sandwich norms) and gpt2 (learned positions,
LayerNorm with biases, fused QKV) with byte-level BPE vocabularies; weights in F32, F16, Q8_0 and Q4_0; each
file well under 64 KiB. Each case applies one to three seeded mutations: structured ones on a parsed copy of
the file, re-serialised by the small writer below (metadata values of hostile size or the wrong type, NaN,
duplicate and deleted keys, nested arrays, broken vocabularies, tensor dims / types / offsets, counts), and
raw ones on the bytes (bit flips, overwritten length and count fields, truncation).

A case is: GGUFFile + describe() + format_text() + architecture_facts() (what `edgelm info` does), then
edgelm.load() and a 2-token greedy generation. They run in a worker subprocess that handles cases one after
another; the parent gives each case a time limit (a hang kills and restarts the worker), watches the worker's
resident memory, and classifies the outcome:
    ok         everything succeeded                  error    a clean one-line EdgeLMError
    traceback  any other exception                   hang     over the time limit
    crash      the worker died (signal)              memory   peak RSS of the case over --max-rss-mib
Failing cases (traceback, hang, crash, memory) are written to --save-dir (default
tests/data/fuzz_regressions/) unless --no-save.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import selectors
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REGRESSIONS = ROOT / "tests" / "data" / "fuzz_regressions"
FAILURES = ("traceback", "hang", "crash", "memory")
SELFTEST_HANG = "<hang>"
SELFTEST_COMPILE = "<compile>"
COMPILE_LIMIT_S = 600.0           # one Numba compile longer than this is a hang too

# GGUF value types (ggml docs/gguf.md, gguf-py constants.py GGUFValueType)
U8, I8, U16, I16, U32, I32, F32, BOOL, STR, ARR, U64, I64, F64 = 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12
_FMT = {U8: "B", I8: "b", U16: "H", I16: "h", U32: "I", I32: "i", F32: "f", BOOL: "B", U64: "Q", I64: "q", F64: "d"}
_INT_TYPES = (U8, I8, U16, I16, U32, I32, U64, I64)


# -- a small GGUF model: parse, edit, write ----------------------------------------------------------------

@dataclass
class KV:
    key: str
    vtype: int
    value: Any             # scalar; str (or bytes for invalid UTF-8); for ARR: (item type, list of items)


@dataclass
class TensorEntry:
    name: str
    dims: list[int]
    ttype: int
    offset: int            # relative to the data section


@dataclass
class Doc:
    version: int
    kvs: list[KV]
    tensors: list[TensorEntry]
    data: bytes
    align: int = 32
    n_tensors: int | None = None     # overrides of the header counts
    n_kv: int | None = None

    def get(self, key: str):
        for kv in self.kvs:
            if kv.key == key:
                return kv
        return None


def _read_value(buf: bytes, pos: int, vtype: int):
    if vtype == STR:
        (n,) = struct.unpack_from("<Q", buf, pos)
        return buf[pos + 8:pos + 8 + n].decode("utf-8"), pos + 8 + n
    if vtype == ARR:
        itype, n = struct.unpack_from("<IQ", buf, pos)
        pos += 12
        items = []
        for _ in range(n):
            v, pos = _read_value(buf, pos, itype)
            items.append(v)
        return (itype, items), pos
    fmt = "<" + _FMT[vtype]
    v = struct.unpack_from(fmt, buf, pos)[0]
    return (bool(v) if vtype == BOOL else v), pos + struct.calcsize(fmt)


def parse(buf: bytes) -> Doc:
    """A well-formed GGUF (our seeds) as a Doc."""
    assert buf[:4] == b"GGUF"
    version, n_t, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos, kvs = 24, []
    for _ in range(n_kv):
        key, pos = _read_value(buf, pos, STR)
        (vtype,) = struct.unpack_from("<I", buf, pos)
        value, pos = _read_value(buf, pos + 4, vtype)
        kvs.append(KV(key, vtype, value))
    tensors = []
    for _ in range(n_t):
        name, pos = _read_value(buf, pos, STR)
        (nd,) = struct.unpack_from("<I", buf, pos)
        dims = list(struct.unpack_from(f"<{nd}Q", buf, pos + 4))
        ttype, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
        pos += 4 + 8 * nd + 12
        tensors.append(TensorEntry(name, dims, ttype, off))
    align = next((kv.value for kv in kvs if kv.key == "general.alignment"), 32)
    start = (pos + align - 1) // align * align
    return Doc(version, kvs, tensors, buf[start:], align)


class _Out:
    """Bytes being written, with the position of every count/length/dim/offset field (for raw mutations)."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0
        self.fields: list[tuple[int, int, str]] = []    # (position, width, what)

    def put(self, b: bytes, what: str | None = None) -> None:
        if what:
            self.fields.append((self.size, len(b), what))
        self.parts.append(b)
        self.size += len(b)

    def bytes(self) -> bytes:
        return b"".join(self.parts)


def _pack_scalar(vtype: int, v) -> bytes:
    f = _FMT[vtype]
    if vtype in (F32, F64):
        return struct.pack("<" + f, float(v))
    bits = 8 * struct.calcsize(f)
    return struct.pack("<" + f.upper(), int(v) % (1 << bits))   # wrap, keep the bits


def _write_value(out: _Out, vtype: int, v, what: str) -> None:
    if vtype == STR:
        raw = v if isinstance(v, bytes) else str(v).encode("utf-8")
        out.put(struct.pack("<Q", len(raw)), f"length of {what}")
        out.put(raw)
    elif vtype == ARR:
        itype, items = v if isinstance(v, tuple) and len(v) == 2 and isinstance(v[1], list) else (U8, [])
        out.put(struct.pack("<I", itype % (1 << 32)), f"item type of {what}")
        out.put(struct.pack("<Q", len(items)), f"count of {what}")
        if itype in _FMT and items and not any(isinstance(x, (tuple, list, str, bytes)) for x in items[:1]):
            if itype in (F32, F64):
                out.put(np.asarray([float(x) for x in items], "<" + ("f4" if itype == F32 else "f8")).tobytes())
            else:
                out.put(b"".join(_pack_scalar(itype, x) for x in items))
        else:
            for x in items:
                _write_value(out, itype, x, what)
    elif vtype in _FMT:
        out.put(_pack_scalar(vtype, v))
    else:
        out.put(struct.pack("<Q", 0))      # an unknown type: some bytes that a reader must not trust


def serialize(doc: Doc) -> tuple[bytes, list[tuple[int, int, str]]]:
    out = _Out()
    out.put(b"GGUF")
    out.put(struct.pack("<I", doc.version), "version")
    out.put(struct.pack("<Q", (len(doc.tensors) if doc.n_tensors is None else doc.n_tensors) % (1 << 64)),
            "tensor count")
    out.put(struct.pack("<Q", (len(doc.kvs) if doc.n_kv is None else doc.n_kv) % (1 << 64)), "key count")
    for kv in doc.kvs:
        _write_value(out, STR, kv.key, "key")
        out.put(struct.pack("<I", kv.vtype % (1 << 32)), f"type of {kv.key}")
        _write_value(out, kv.vtype, kv.value, kv.key)
    for t in doc.tensors:
        _write_value(out, STR, t.name, "tensor name")
        out.put(struct.pack("<I", len(t.dims)), f"n_dims of {t.name}")
        for d in t.dims:
            out.put(struct.pack("<Q", d % (1 << 64)), f"dim of {t.name}")
        out.put(struct.pack("<I", t.ttype % (1 << 32)), f"type of {t.name}")
        out.put(struct.pack("<Q", t.offset % (1 << 64)), f"offset of {t.name}")
    pad = (-out.size) % doc.align
    out.put(b"\0" * pad)
    out.put(doc.data)
    return out.bytes(), out.fields


# -- seeds -----------------------------------------------------------------------------------------------

def _byte_chars() -> list[str]:
    """GPT-2's bytes_to_unicode: the printable character standing for each byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


_WORDS = "the and of to in is it that was he for on are as with his they at be this from have or by one had".split()


def _bpe_vocab() -> dict:
    chars = _byte_chars()
    tokens, merges = list(chars), []
    for w in _WORDS:                           # merge each word left to right: "Ġ t", "Ġt h", "Ġth e"
        s = [chars[b] for b in (" " + w).encode()]
        cur = s[0]
        for c in s[1:]:
            merges.append(f"{cur} {c}")
            cur += c
            if cur not in tokens:
                tokens.append(cur)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = list(dict.fromkeys(merges))
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens + specials, "merges": merges,
            "types": [1] * len(tokens) + [3] * len(specials), "scores": None,
            "bos": len(tokens), "eos": len(tokens) + 2}


def _spm_vocab() -> dict:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["\u2581" + w for w in _WORDS]
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return {"model": "llama", "pre": "default", "tokens": tokens + pieces, "types": types + [1] * len(pieces),
            "scores": scores, "merges": None, "bos": 1, "eos": 2}


def _quantized(rng: np.random.Generator, shape_out_in: tuple[int, int], qtype):
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize
    w = (rng.standard_normal(shape_out_in) * 0.2).astype(np.float32)
    if qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return quantize(w, qtype), qtype


def build_seed(kind: str, path: str | Path) -> str:
    """A tiny model of `kind` (llama | gemma3 | gpt2) written with gguf-py's GGUFWriter."""
    from gguf import GGMLQuantizationType as Q, GGUFWriter
    rng = np.random.default_rng({"llama": 1, "gemma3": 2, "gpt2": 3}[kind])
    arch = kind
    d, ff, n_head, n_kv, hd, L = 32, 64, 4, 2, 8, 2
    vocab = _spm_vocab() if kind == "llama" else _bpe_vocab()
    nv = len(vocab["tokens"])
    w = GGUFWriter(str(path), arch=arch)
    w.add_name(f"fuzz-{kind}")
    w.add_block_count(L)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(ff)
    w.add_head_count(n_head)
    if kind == "gpt2":
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_head_count_kv(n_kv)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(10000.0)
    if kind == "llama":
        w.add_rope_dimension_count(hd)
    if kind == "gemma3":
        w.add_key_length(hd)
        w.add_value_length(hd)
        w.add_sliding_window(4)
    w.add_tokenizer_model(vocab["model"])
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    if vocab["scores"] is not None:
        w.add_token_scores(vocab["scores"])
    if vocab["merges"] is not None:
        w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}")
    mats = [Q.Q8_0, Q.Q4_0, Q.F16, Q.F32]

    def mat(name, n_out, n_in, qtype=None):
        arr, raw = _quantized(rng, (n_out, n_in), qtype if qtype is not None else mats[len(name) % 4])
        w.add_tensor(name, arr, raw_dtype=raw)

    def vec(name, n, center=1.0):
        w.add_tensor(name, (center + 0.1 * rng.standard_normal(n)).astype(np.float32))

    mat("token_embd.weight", nv, d, Q.Q8_0)
    vec("output_norm.weight", d)
    if kind == "gpt2":
        vec("output_norm.bias", d, 0.0)
        mat("position_embd.weight", 64, d, Q.F16)
    for il in range(L):
        p = f"blk.{il}."
        vec(p + "attn_norm.weight", d)
        vec(p + "ffn_norm.weight", d)
        if kind == "gpt2":
            for n in ("attn_norm", "ffn_norm"):
                vec(p + n + ".bias", d, 0.0)
            mat(p + "attn_qkv.weight", 3 * d, d)
            vec(p + "attn_qkv.bias", 3 * d, 0.0)
            mat(p + "attn_output.weight", d, d)
            mat(p + "ffn_up.weight", ff, d)
            mat(p + "ffn_down.weight", d, ff)
            continue
        mat(p + "attn_q.weight", n_head * hd, d)
        mat(p + "attn_k.weight", n_kv * hd, d)
        mat(p + "attn_v.weight", n_kv * hd, d)
        mat(p + "attn_output.weight", d, n_head * hd)
        mat(p + "ffn_gate.weight", ff, d)
        mat(p + "ffn_up.weight", ff, d)
        mat(p + "ffn_down.weight", d, ff)
        if kind == "gemma3":
            vec(p + "attn_q_norm.weight", hd)
            vec(p + "attn_k_norm.weight", hd)
            vec(p + "post_attention_norm.weight", d)
            vec(p + "post_ffw_norm.weight", d)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


SEED_KINDS = ("llama", "gemma3", "gpt2")


def build_seeds(directory: str | Path) -> dict[str, bytes]:
    out = {}
    for kind in SEED_KINDS:
        p = Path(directory) / f"seed_{kind}.gguf"
        build_seed(kind, p)
        out[kind] = p.read_bytes()
    return out


# -- mutations -------------------------------------------------------------------------------------------

HOSTILE_INTS = [0, 1, -1, 2, 3, 7, 63, 65, 100000, 0x7FFFFFFF, 0xFFFFFFFF, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
                10**9, -(2**31)]
HOSTILE_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, 1e-45, 1e38, 1e9, 3.5]
HYPER = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
         "attention.head_count_kv", "attention.key_length", "attention.value_length", "rope.dimension_count",
         "rope.freq_base", "rope.freq_base_swa", "attention.sliding_window", "attention.layer_norm_rms_epsilon",
         "attention.layer_norm_epsilon", "attention.scale", "expert_count", "expert_used_count",
         "expert_feed_forward_length", "rope.scaling.type", "rope.scaling.factor",
         "rope.scaling.original_context_length", "vocab_size", "rope.scaling.yarn_beta_fast"]
TOKENIZER_IDS = ["bos_token_id", "eos_token_id", "eot_token_id", "unknown_token_id", "padding_token_id",
                 "fim_pre_token_id", "prefix_token_id"]


def _hostile_value(rng: random.Random, like: KV | None) -> tuple[int, Any]:
    """A (type, value) pair: usually the same type with a hostile number, sometimes another type."""
    r = rng.random()
    if like is not None and r < 0.55 and like.vtype in _INT_TYPES:
        base = like.value if isinstance(like.value, int) else 0
        return like.vtype, rng.choice(HOSTILE_INTS + [base + 1, base - 1, base * 2, base // 2, base * 1000])
    if like is not None and r < 0.55 and like.vtype in (F32, F64):
        return like.vtype, rng.choice(HOSTILE_FLOATS)
    choice = rng.randrange(9)
    if choice == 0:
        return STR, rng.choice(["", "x", "yarn", "linear", "none", "1e9", "\x00"])
    if choice == 1:
        return BOOL, rng.choice([0, 1, 2, 255])
    if choice == 2:
        return F32, rng.choice(HOSTILE_FLOATS)
    if choice == 3:
        return F64, rng.choice(HOSTILE_FLOATS + [64.0, 2.0])
    if choice == 4:
        return ARR, (U32, [rng.choice(HOSTILE_INTS) for _ in range(rng.randrange(4))])
    if choice == 5:
        return ARR, (STR, ["a", "b"])
    return rng.choice(_INT_TYPES), rng.choice(HOSTILE_INTS)


def _arch(doc: Doc) -> str:
    kv = doc.get("general.architecture")
    return kv.value if kv is not None and isinstance(kv.value, str) else "llama"


def m_set_hyper(rng, doc):
    key = f"{_arch(doc)}.{rng.choice(HYPER)}"
    kv = doc.get(key)
    vtype, value = _hostile_value(rng, kv)
    if kv is None:
        doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), KV(key, vtype, value))
    else:
        kv.vtype, kv.value = vtype, value
    return f"set {key} = {value!r} (type {vtype})"


def m_set_any(rng, doc):
    kv = rng.choice(doc.kvs)
    kv.vtype, kv.value = _hostile_value(rng, kv)
    return f"set {kv.key} = {kv.value!r:.80} (type {kv.vtype})"


def m_duplicate_key(rng, doc):
    kv = rng.choice([k for k in doc.kvs if k.vtype != ARR] or doc.kvs)
    if rng.random() < 0.5:
        kv = doc.get(f"{_arch(doc)}.block_count") or kv
    vtype, value = _hostile_value(rng, kv)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), KV(kv.key, vtype, value))
    return f"duplicate {kv.key} with {value!r:.60} (type {vtype})"


def m_delete_key(rng, doc):
    kv = doc.kvs.pop(rng.randrange(len(doc.kvs)))
    return f"delete {kv.key}"


def m_nested_array(rng, doc):
    depth = rng.choice([2, 3, 4, 10, 100, 500])
    value: Any = (U8, [1, 2])
    for _ in range(depth - 1):
        value = (ARR, [value])
    key = rng.choice(["general.nested", "tokenizer.ggml.scores", "tokenizer.ggml.tokens", f"{_arch(doc)}.block_count"])
    kv = doc.get(key)
    if kv is None:
        doc.kvs.append(KV(key, ARR, value))
    else:
        kv.vtype, kv.value = ARR, value
    return f"nested array of depth {depth} at {key}"


def m_vocab(rng, doc):
    keys = [k for k in ("tokens", "scores", "token_type", "merges") if doc.get("tokenizer.ggml." + k)]
    kv = doc.get("tokenizer.ggml." + rng.choice(keys))
    itype, items = kv.value
    what = rng.randrange(7)
    if what == 0:                                 # shorter
        kv.value = (itype, items[:rng.randrange(len(items) + 1)])
        return f"{kv.key} cut to {len(kv.value[1])}"
    if what == 1:                                 # the whole vocabulary shorter than the embedding table
        n = rng.randrange(1, len(doc.get("tokenizer.ggml.tokens").value[1]))
        for k in ("tokens", "scores", "token_type"):
            other = doc.get("tokenizer.ggml." + k)
            if other is not None:
                other.value = (other.value[0], other.value[1][:n])
        return f"vocabulary cut to {n} tokens"
    if what == 2:                                 # elements of another type
        new = rng.choice([(STR, [str(x) + "x" for x in items]), (F32, [float(i) for i in range(len(items))]),
                          (I32, [rng.choice(HOSTILE_INTS) for _ in items]), (BOOL, [1] * len(items))])
        kv.value = new
        return f"{kv.key} items as type {new[0]}"
    if what == 3:                                 # hostile elements of the same type
        items = list(items)
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(len(items))
            if itype == STR:
                items[i] = rng.choice(["", items[0], "\u2581", "<|im_end|>", "a b c", "x" * 300, "<0xZZ>"])
            elif itype in (F32, F64):
                items[i] = rng.choice(HOSTILE_FLOATS)
            else:
                items[i] = rng.choice(HOSTILE_INTS)
        kv.value = (itype, items)
        return f"{kv.key} with hostile items"
    if what == 4:
        kv.value = (itype, [])
        return f"{kv.key} empty"
    if what == 5:
        kv.vtype, kv.value = _hostile_value(rng, None)
        return f"{kv.key} replaced by a scalar"
    kv.value = (itype, list(items) + list(items[:rng.randrange(1, 5)]))
    return f"{kv.key} longer"


def m_token_id(rng, doc):
    key = "tokenizer.ggml." + rng.choice(TOKENIZER_IDS)
    kv = doc.get(key)
    vtype, value = _hostile_value(rng, kv or KV(key, U32, 0))
    if kv is None:
        doc.kvs.append(KV(key, vtype, value))
    else:
        kv.vtype, kv.value = vtype, value
    return f"set {key} = {value!r:.60} (type {vtype})"


def m_tensor_dims(rng, doc):
    t = rng.choice(doc.tensors)
    what = rng.randrange(4)
    if what == 0:
        i = rng.randrange(len(t.dims))
        t.dims[i] = rng.choice([0, 1, 31, 33, t.dims[i] * 2, t.dims[i] // 2, 2**32 - 1, 2**63, 2**64 - 1, 2**31])
    elif what == 1:
        t.dims.reverse()
    elif what == 2:
        t.dims.append(rng.choice([1, 2, 2**40]))
    else:
        t.dims = t.dims[:-1] or [0]
    return f"tensor {t.name} dims {t.dims}"


def m_tensor_type(rng, doc):
    t = rng.choice(doc.tensors)
    t.ttype = rng.choice([0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30, 39, 40, 99, 2**31, 2**32 - 1])
    return f"tensor {t.name} type {t.ttype}"


def m_tensor_offset(rng, doc):
    t = rng.choice(doc.tensors)
    t.offset = rng.choice([t.offset + 1, t.offset + doc.align, len(doc.data), len(doc.data) - doc.align,
                           2**63, 2**64 - 32, 2**64 - 1, 0, (2**64 - t.offset) % 2**64])
    return f"tensor {t.name} offset {t.offset}"


def m_tensor_list(rng, doc):
    what = rng.randrange(4)
    if what == 0:
        t = doc.tensors.pop(rng.randrange(len(doc.tensors)))
        return f"remove tensor {t.name}"
    t = rng.choice(doc.tensors)
    if what == 1:
        doc.tensors.append(TensorEntry(t.name, list(t.dims), t.ttype, t.offset))
        return f"duplicate tensor {t.name}"
    if what == 2:
        new = rng.choice(["blk.7.attn_q.weight", "blk.4294967295.attn_norm.weight", "blk.-1.x", "blk.2.ffn_up.weight",
                          "rope_freqs.weight", "output.weight", "position_embd.weight", "blk.0.ffn_gate_inp.weight",
                          "blk.0.attn_sinks.weight", "blk.99999999999999999999.attn_k.weight"])
        old, t.name = t.name, new
        return f"rename tensor {old} -> {new}"
    t.name = t.name.replace(".", "..", 1)
    return f"mangle tensor name {t.name}"


def m_counts(rng, doc):
    if rng.random() < 0.5:
        doc.n_tensors = rng.choice([0, len(doc.tensors) + 1, len(doc.tensors) - 1, 2**32, 2**63, 2**64 - 1])
        return f"tensor count {doc.n_tensors}"
    doc.n_kv = rng.choice([0, len(doc.kvs) + 1, len(doc.kvs) - 1, 2**32, 2**63, 2**64 - 1])
    return f"key count {doc.n_kv}"


def m_version_align(rng, doc):
    if rng.random() < 0.3:
        doc.version = rng.choice([0, 1, 2, 4, 2**32 - 1])
        return f"version {doc.version}"
    vtype, value = rng.choice([(U32, 0), (U32, 3), (U32, 64), (U32, 2**31), (F32, 32.0), (STR, "32"), (BOOL, 1),
                               (U64, 2**64 - 1), (I32, -32)])
    kv = doc.get("general.alignment")
    if kv is None:
        doc.kvs.append(KV("general.alignment", vtype, value))
    else:
        kv.vtype, kv.value = vtype, value
    return f"general.alignment = {value!r} (type {vtype})"


def m_data(rng, doc):
    n = len(doc.data)
    cut = rng.randrange(n)
    doc.data = doc.data[:cut]
    return f"tensor data cut to {cut} bytes"


STRUCTURED = [(m_set_hyper, 6), (m_set_any, 2), (m_duplicate_key, 2), (m_delete_key, 2), (m_nested_array, 1),
              (m_vocab, 3), (m_token_id, 2), (m_tensor_dims, 2), (m_tensor_type, 1), (m_tensor_offset, 1),
              (m_tensor_list, 2), (m_counts, 1), (m_version_align, 1), (m_data, 1)]
_STRUCT_FNS, _STRUCT_WEIGHTS = zip(*STRUCTURED)


def raw_mutation(rng: random.Random, data: bytearray, fields, header_end: int) -> tuple[bytearray, str]:
    what = rng.randrange(5)
    if what == 0 and fields:                      # a length / count / dim / offset field gets a hostile value
        pos, width, name = rng.choice(fields)
        v = rng.choice(HOSTILE_INTS + [int.from_bytes(data[pos:pos + width], "little") + rng.choice([-1, 1, 8])])
        data[pos:pos + width] = (v % (1 << (8 * width))).to_bytes(width, "little")
        return data, f"field {name} at {pos} = {v}"
    if what == 1:                                 # bit flips, mostly in the header
        flips = []
        for _ in range(rng.randrange(1, 9)):
            pos = rng.randrange(header_end if rng.random() < 0.85 else len(data))
            data[pos] ^= 1 << rng.randrange(8)
            flips.append(pos)
        return data, f"bit flips at {flips}"
    if what == 2:
        pos = rng.randrange(header_end)
        n = rng.choice([1, 2, 4, 8])
        data[pos:pos + n] = bytes([rng.choice([0, 0xFF, 0x7F, 0x80])]) * n
        return data, f"{n} bytes overwritten at {pos}"
    if what == 3:
        cut = rng.randrange(len(data))
        return data[:cut], f"truncated to {cut} bytes"
    pos = rng.randrange(header_end)
    if rng.random() < 0.5:
        n = rng.randrange(1, 9)
        del data[pos:pos + n]
        return data, f"deleted {n} bytes at {pos}"
    ins = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    data[pos:pos] = ins
    return data, f"inserted {ins.hex()} at {pos}"


def make_case(seeds: dict[str, bytes], seed: int, index: int) -> tuple[bytes, str]:
    """Case `index` of run `seed`: (file bytes, description). Deterministic, independent of other cases."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choice(sorted(seeds))
    doc = parse(seeds[kind])
    steps = [kind]
    mode = rng.random()
    if mode < 0.75:
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            fn = rng.choices(_STRUCT_FNS, _STRUCT_WEIGHTS)[0]
            try:
                steps.append(fn(rng, doc))
            except (ValueError, IndexError, AttributeError, TypeError, KeyError):
                steps.append(f"{fn.__name__}: not applicable")
    data, fields = serialize(doc)
    header_end = len(data) - len(doc.data)
    if mode >= 0.6:
        buf = bytearray(data)
        for _ in range(rng.choice([1, 1, 2])):
            if not buf:
                break
            buf, what = raw_mutation(rng, buf, fields, max(1, min(header_end, len(buf))))
            steps.append(what)
        data = bytes(buf)
    return data, "; ".join(steps)


# -- one case, in the worker ---------------------------------------------------------------------------------

def _peak_rss_reset() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")             # resets VmHWM (Linux >= 4.0)
    except OSError:
        pass


def _peak_rss_mib() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(path: str) -> dict:
    """What `edgelm info PATH` and a short generation do, with the outcome: ok | error | traceback."""
    import traceback
    import edgelm
    from edgelm.commands.describe import architecture_facts, describe, format_card, format_text
    from edgelm.errors import EdgeLMError
    errors, outcome = [], "ok"
    steps = (
        ("info", lambda: format_text(describe(path))),
        ("card", lambda: json.dumps(format_card(architecture_facts(path)))),
        ("load", lambda: edgelm.load(path).generate("Hello the world", max_tokens=2, temperature=0)),
    )
    for name, fn in steps:
        try:
            fn()
        except EdgeLMError as e:
            msg = str(e)
            if "\n" in msg or not msg:
                outcome = "traceback"
                errors.append(f"{name}: EdgeLMError message is not one line: {msg!r:.300}")
            else:
                outcome = outcome if outcome == "traceback" else "error"
                errors.append(f"{name}: {msg[:300]}")
        except BaseException as e:       # noqa: BLE001  (anything else is what we are looking for)
            if isinstance(e, KeyboardInterrupt):
                raise
            outcome = "traceback"
            tb = traceback.format_exc(limit=-4)
            errors.append(f"{name}: {type(e).__name__}: {str(e)[:200]}\n{tb}")
    return {"outcome": outcome, "errors": errors}


class _CompileNotices:
    """Tells the parent when Numba starts and stops compiling, so that its hang timer stops meanwhile.

    A case can be the first to reach a kernel for some type signature; compiling it takes seconds, and far more
    on a loaded 2-core machine, which is not a hang (numba.core.event's "numba:compile" events)."""

    def __init__(self, proto):
        self.proto, self.depth, self.seconds, self._t0 = proto, 0, 0.0, 0.0
        from numba.core import event
        outer = self

        class _Listener(event.Listener):
            def on_start(self, ev):
                outer.start()

            def on_end(self, ev):
                outer.end()
        event.register("numba:compile", _Listener())

    def start(self) -> None:
        self.depth += 1
        if self.depth == 1:
            self._t0 = time.perf_counter()
            self.proto.write(json.dumps({"compiling": True}) + "\n")

    def end(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self._t0
            self.proto.write(json.dumps({"compiling": False}) + "\n")

    @contextlib.contextmanager
    def span(self):
        self.start()
        try:
            yield
        finally:
            self.end()


def worker_main() -> None:
    import logging
    logging.disable(logging.CRITICAL)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)                      # stray prints must not corrupt the protocol
    import edgelm  # noqa: F401  (imports before the first case's timer)
    import edgelm.commands.describe  # noqa: F401
    compiling = _CompileNotices(proto)
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        path = line.rstrip("\n")
        if path == SELFTEST_HANG:         # lets the tests check that the parent notices a hang
            time.sleep(3600)
        _peak_rss_reset()
        t0, c0 = time.perf_counter(), compiling.seconds
        if path == SELFTEST_COMPILE:      # ... and that a long compile is not taken for one
            with compiling.span():
                time.sleep(2.0)
        r = run_case(path)
        r["compile_seconds"] = compiling.seconds - c0
        r["seconds"] = time.perf_counter() - t0 - r["compile_seconds"]
        r["peak_rss_mib"] = _peak_rss_mib()
        proto.write(json.dumps(r) + "\n")


# -- the parent: worker process, timeouts, memory watch ---------------------------------------------------------

class Worker:
    def __init__(self, max_rss_mib: float, startup_timeout: float = 120.0):
        self.max_rss_mib = max_rss_mib
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.setdefault("NUMBA_NUM_THREADS", "2")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, cwd=str(ROOT))
        self._buf = b""
        ready = self._read_line(startup_timeout)
        if ready is None:
            self.kill()
            raise RuntimeError("the fuzz worker did not start")

    def _read_line(self, timeout: float) -> dict | None:
        """The next JSON line, or None on timeout / exit / memory over the limit (self.why says which).

        The worker's compile notices stop the clock: a compile gets up to COMPILE_LIMIT_S of its own, then the
        case has what was left of `timeout`."""
        import psutil
        fd = self.proc.stdout.fileno()
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        paused_left = None               # seconds the case had left when a compile began
        self.why, self.rss_seen = None, 0.0
        try:
            ps = psutil.Process(self.proc.pid)
        except psutil.Error:
            ps = None
        try:
            while True:
                while b"\n" in self._buf:
                    line, self._buf = self._buf.split(b"\n", 1)
                    msg = json.loads(line)
                    if "compiling" not in msg:
                        return msg
                    now = time.monotonic()
                    if msg["compiling"]:
                        paused_left, deadline = max(0.0, deadline - now), now + COMPILE_LIMIT_S
                    elif paused_left is not None:
                        deadline, paused_left = now + paused_left, None
                left = deadline - time.monotonic()
                if left <= 0:
                    self.why = "hang"
                    return None
                if sel.select(min(left, 0.05)):
                    chunk = os.read(fd, 1 << 16)
                    if not chunk:
                        self.why = "crash"
                        return None
                    self._buf += chunk
                elif ps is not None:
                    try:
                        rss = ps.memory_info().rss / 2**20
                    except psutil.Error:
                        rss = 0.0
                    self.rss_seen = max(self.rss_seen, rss)
                    if rss > self.max_rss_mib:
                        self.why = "memory"
                        return None
        finally:
            sel.close()

    def run(self, path: str, timeout: float) -> dict:
        try:
            self.proc.stdin.write((path + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self.why = "crash"
            return {"outcome": "crash", "errors": ["worker pipe closed"]}
        r = self._read_line(timeout)
        if r is not None:
            if r.get("peak_rss_mib", 0) > self.max_rss_mib:
                r["outcome"] = "memory"
            return r
        why = self.why
        self.kill()
        detail = {"hang": f"no answer within {timeout:g} s", "memory": f"RSS passed {self.max_rss_mib:g} MiB",
                  "crash": f"worker exited with status {self.proc.returncode}"}[why]
        return {"outcome": why, "errors": [detail], "peak_rss_mib": self.rss_seen}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.kill()


@dataclass
class Report:
    counts: Counter = field(default_factory=Counter)
    failures: list[tuple[str, dict, str]] = field(default_factory=list)   # (description, result, saved path)
    peak_rss_mib: float = 0.0
    slowest_s: float = 0.0
    compiles: list[tuple[str, float]] = field(default_factory=list)    # (case, seconds spent compiling kernels)
    errors_seen: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        order = ["ok", "error", "traceback", "hang", "crash", "memory"]
        total = sum(self.counts.values())
        parts = ", ".join(f"{k} {self.counts.get(k, 0)}" for k in order)
        return (f"{total} cases: {parts}; peak RSS {self.peak_rss_mib:.0f} MiB; "
                f"slowest case {self.slowest_s:.2f} s"
                + (f"; {len(self.compiles)} cases compiled kernels first "
                   f"({sum(t for _, t in self.compiles):.1f} s, not counted)" if self.compiles else ""))


class Runner:
    """Runs cases through a worker, restarting it after a hang, crash or memory kill."""

    def __init__(self, timeout: float = 10.0, max_rss_mib: float = 1024.0):
        self.timeout, self.max_rss_mib = timeout, max_rss_mib
        self.worker: Worker | None = None

    def run(self, path: str) -> dict:
        if self.worker is None or not self.worker.alive():
            self.worker = Worker(self.max_rss_mib)
        r = self.worker.run(path, self.timeout)
        if r["outcome"] in ("hang", "crash", "memory"):
            self.worker = None
        return r

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()


def record(report: Report, r: dict, desc: str, data: bytes | None, save_dir: Path | None) -> None:
    report.counts[r["outcome"]] += 1
    report.peak_rss_mib = max(report.peak_rss_mib, r.get("peak_rss_mib", 0.0))
    report.slowest_s = max(report.slowest_s, r.get("seconds", 0.0))
    if r.get("compile_seconds", 0.0) > 0.0:
        report.compiles.append((desc, r["compile_seconds"]))
    for e in r.get("errors", []):
        report.errors_seen[e.split(":")[0]] += 1
    if r["outcome"] in FAILURES:
        saved = ""
        if save_dir is not None and data is not None and len(data) <= 64 * 1024:
            save_dir.mkdir(parents=True, exist_ok=True)
            import hashlib
            name = hashlib.sha256(data).hexdigest()[:16]
            p = save_dir / f"{name}.gguf"
            p.write_bytes(data)
            (save_dir / f"{name}.txt").write_text(desc + "\n" + "\n".join(r.get("errors", [])) + "\n")
            saved = str(p)
        report.failures.append((desc, r, saved))


def fuzz(n: int, seed: int = 0, timeout: float = 10.0, max_rss_mib: float = 1024.0, save_dir: Path | None = None,
         progress_every: int = 0, start: int = 0) -> Report:
    report = Report()
    runner = Runner(timeout, max_rss_mib)
    with tempfile.TemporaryDirectory(prefix="edgelm-fuzz-") as tmp:
        seeds = build_seeds(tmp)
        case_path = os.path.join(tmp, "case.gguf")
        t0 = time.time()
        try:
            for i in range(start, start + n):
                data, desc = make_case(seeds, seed, i)
                with open(case_path, "wb") as f:
                    f.write(data)
                r = runner.run(case_path)
                record(report, r, f"case {seed}:{i}: {desc}", data, save_dir)
                if r["outcome"] in FAILURES:
                    print(f"FAIL {r['outcome']} case {seed}:{i}: {desc}\n  " + "\n  ".join(r.get("errors", []))[:2000],
                          flush=True)
                if progress_every and (i - start + 1) % progress_every == 0:
                    print(f"[{i - start + 1}/{n} {time.time() - t0:.0f} s] {report.summary()}", flush=True)
        finally:
            runner.close()
    return report


def replay(paths: list[Path], timeout: float = 10.0, max_rss_mib: float = 1024.0) -> Report:
    report = Report()
    runner = Runner(timeout, max_rss_mib)
    try:
        for p in paths:
            r = runner.run(str(p))
            record(report, r, str(p), None, None)
    finally:
        runner.close()
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=10000, help="number of mutations (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first case index (to resume a run)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--max-rss-mib", type=float, default=1024.0, help="peak RSS per case before it counts as a failure")
    ap.add_argument("--save-dir", type=Path, default=REGRESSIONS)
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--replay", type=Path, help="run the .gguf files of this directory instead of mutations")
    ap.add_argument("--progress", type=int, default=500, help="print the counts every N cases")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker_main()
        return 0
    if a.replay:
        rep = replay(sorted(a.replay.glob("*.gguf")), a.timeout, a.max_rss_mib)
    else:
        rep = fuzz(a.n, a.seed, a.timeout, a.max_rss_mib, None if a.no_save else a.save_dir, a.progress, a.start)
    print(rep.summary())
    for desc, r, saved in rep.failures[:50]:
        print(f"  {r['outcome']}: {desc}" + (f" -> {saved}" if saved else ""))
    return 1 if any(rep.counts.get(k) for k in FAILURES) else 0


if __name__ == "__main__":
    sys.exit(main())
