"""`edgelm info`: what a GGUF holds, read from its header alone (no weights are touched)."""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from .config import ModelConfig
from .gguf_file import GGUFFile
from .quant.formats import format_for


def describe(path: str, with_tensors: bool = True) -> dict:
    g = GGUFFile(path)
    cfg = ModelConfig.from_gguf(g)
    n_params = g.n_params
    bytes_by_type: Counter = Counter()
    params_by_type: Counter = Counter()
    for t in g.tensors.values():
        name = format_for(t.ggml_type).name
        bytes_by_type[name] += t.n_bytes
        params_by_type[name] += int(np.prod(t.shape))
    tensor_bytes = sum(bytes_by_type.values())
    meta = g.metadata
    tokens = meta.get("tokenizer.ggml.tokens") or []
    d = {
        "file": os.path.abspath(path),
        "file_size": g.file_size,
        "name": meta.get("general.name"),
        "architecture": cfg.arch,
        "parameters": n_params,
        "bits_per_weight": round(8 * tensor_bytes / max(n_params, 1), 3),
        "quant_types": {k: {"tensors": sum(1 for t in g.tensors.values() if format_for(t.ggml_type).name == k),
                            "parameters": params_by_type[k], "bytes": bytes_by_type[k]} for k in bytes_by_type},
        "context_length": cfg.n_ctx_train,
        "layers": cfg.n_layer,
        "embedding": cfg.n_embd,
        "feed_forward": cfg.n_ff,
        "heads": cfg.n_head,
        "kv_heads": cfg.n_head_kv,
        "head_dim": cfg.head_dim,
        "rope_base": cfg.rope_base,
        "sliding_window": cfg.sliding_window or None,
        "kv_bytes_per_token_f16": cfg.kv_bytes_per_token,
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "vocab_size": len(tokens),
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
            "chat_template": meta.get("tokenizer.chat_template") is not None,
        },
    }
    if with_tensors:
        d["tensors"] = [{"name": t.name, "type": format_for(t.ggml_type).name, "shape": list(t.shape),
                         "bytes": t.n_bytes} for t in g.tensors.values()]
    return d


def format_text(d: dict) -> str:
    tok = d["tokenizer"]
    attn = ("MHA" if d["kv_heads"] == d["heads"] else "MQA" if d["kv_heads"] == 1
            else f"GQA (group {d['heads'] // d['kv_heads']})")
    lines = [
        f"{d['file']}",
        f"  name           {d['name']}",
        f"  architecture   {d['architecture']}",
        f"  parameters     {d['parameters'] / 1e6:.1f} M   ({d['bits_per_weight']:.2f} bits/weight, "
        f"{d['file_size'] / 2**20:.1f} MiB)",
        "  quant types    " + ", ".join(f"{k} ×{v['tensors']}" for k, v in d["quant_types"].items()),
        f"  layers         {d['layers']}   embedding {d['embedding']}   feed-forward {d['feed_forward']}",
        f"  attention      {attn}: {d['heads']} heads, {d['kv_heads']} KV heads, head dim {d['head_dim']}"
        + (f", sliding window {d['sliding_window']}" if d["sliding_window"] else ""),
        f"  context        {d['context_length']} tokens   RoPE base {d['rope_base']:g}   "
        f"KV cache {d['kv_bytes_per_token_f16'] / 1024:.1f} KiB/token (f16)",
        f"  tokenizer      {tok['model']} (pre: {tok['pre']}), {tok['vocab_size']} tokens, "
        f"bos {tok['bos_token_id']}, eos {tok['eos_token_id']}, chat template: {'yes' if tok['chat_template'] else 'no'}",
    ]
    if "tensors" in d:
        lines.append("  tensors")
        w = max(len(t["name"]) for t in d["tensors"])
        for t in d["tensors"]:
            shape = "×".join(str(s) for s in t["shape"])
            lines.append(f"    {t['name']:<{w}}  {t['type']:<5} {shape:>14}  {t['bytes']:>11,} B")
    return "\n".join(lines)
