"""`edgelm info`: what a GGUF holds, read from its header (metadata and tensor inventory).

Besides the summary, the *architecture card*: the rows of the hand-drawn "GPT-2 vs Llama vs Qwen3" comparison
table (attention kind, positions, norms, activation, MLP / MoE, sliding window, sinks, biases, tying, KV-cache
size), derived from the file the way the decoder (arch/decoder.py) will run it: what the metadata says, what
ArchTraits hard-codes per family, and which tensors are present. Weights are not read, except the tiny
rope_freqs vector (its largest factor is the Llama-3 scaling factor) and, when output.weight and
token_embd.weight have the same type and shape, their bytes (to tell a stored copy of a tied matrix).

KV-cache sizes come from runtime.kv_cache.cache_bytes, the arithmetic of the factory the runtime allocates
with (make_caches): a sliding-window layer holds a ring of window + batch slots, not the whole context.
"""
from __future__ import annotations

import os
import re
from collections import Counter

import numpy as np

from ..config import ModelConfig
from ..errors import EdgeLMError, GGUFError, UnsupportedError
from ..gguf_file import GGUFFile
from ..quant.formats import dequantize, format_for


def kv_cache_sizes(cfg: ModelConfig, n_ctx: int | None = None) -> dict:
    """What the KV cache costs for a context of n_ctx tokens (default: the training context), per storage
    type (K and V of the same type; f16, the default, first): bytes at n_ctx, and bytes per token of context
    — the global layers only, since a sliding-window layer's ring stops growing at window + batch slots
    (`sliding_bytes`: what the sliding layers hold at n_ctx). A type the head size cannot be stored in (q8_0 / q4_0 need a multiple of 32) is None."""
    from ..runtime.kv_cache import CACHE_TYPES, cache_bytes, cache_bytes_per_token
    n_ctx = cfg.n_ctx_train if n_ctx is None else n_ctx
    n_sliding = sum(1 for il in range(cfg.n_layer) if cfg.is_swa_layer(il))
    types: dict[str, dict | None] = {}
    # the default first, then the compact types, f32 (for exact comparisons) last
    for name in sorted(CACHE_TYPES, key=lambda t: (t != "f16", t == "f32")):
        try:
            total, per_token = cache_bytes(cfg, n_ctx, name, name), cache_bytes_per_token(cfg, name, name)
        except UnsupportedError:
            types[name] = None
            continue
        types[name] = {"bytes": total, "bytes_per_token": per_token, "sliding_bytes": total - per_token * n_ctx}
    ring_slots = None
    if n_sliding:    # a context of 1 holds one slot in every layer: the bytes of a slot, by the factory's sums
        slot = cache_bytes(cfg, 1) // cfg.n_layer
        ring_slots = types["f16"]["sliding_bytes"] // (slot * n_sliding)
    return {"n_ctx": n_ctx, "global_layers": cfg.n_layer - n_sliding, "sliding_layers": n_sliding,
            "sliding_window": cfg.sliding_window if n_sliding else 0, "ring_slots": ring_slots, "types": types}


def describe(path: str, with_tensors: bool = True, with_card: bool = True, n_ctx: int | None = None) -> dict:
    """What `edgelm info` shows of one file, as JSON-ready values; KV-cache sizes for n_ctx tokens (default:
    the training context)."""
    g = GGUFFile(path)
    cfg = ModelConfig.from_gguf(g)     # validates every hyper-parameter against the tensors first
    _check_tensor_shapes(g, cfg)
    n_params = g.n_params
    bytes_by_type: Counter = Counter()
    params_by_type: Counter = Counter()
    for t in g.tensors.values():
        name = format_for(t.ggml_type).name
        bytes_by_type[name] += t.n_bytes
        params_by_type[name] += int(np.prod(t.shape))
    tensor_bytes = sum(bytes_by_type.values())
    meta = g.metadata
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, (list, np.ndarray)) else 0
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
        "kv_cache": kv_cache_sizes(cfg, n_ctx),
        "tokenizer": {
            "model": meta.get("tokenizer.ggml.model"),
            "pre": meta.get("tokenizer.ggml.pre"),
            "vocab_size": n_tokens,
            "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
            "add_bos": meta.get("tokenizer.ggml.add_bos_token"),
            "chat_template": meta.get("tokenizer.chat_template") is not None,
        },
    }
    if with_card:
        d["card"] = format_card(architecture_facts(g, cfg, n_ctx))
    if with_tensors:
        d["tensors"] = [{"name": t.name, "type": format_for(t.ggml_type).name, "shape": list(t.shape),
                         "bytes": t.n_bytes} for t in g.tensors.values()]
    return d


def _check_tensor_shapes(g: GGUFFile, cfg: ModelConfig) -> None:
    """Every tensor the decoder reads has the shape the config implies: info refuses what load refuses. Building
    the decoder does exactly these checks (Weights._info) and reads no matrix, only views (~2 ms)."""
    from ..arch.decoder import Decoder
    Decoder(cfg, g)


def format_text(d: dict) -> str:
    """The summary: with a card, only what the card does not say (file, quant types, tokenizer) and then the
    card; without one, the hyper-parameters too. The tensor table last, in layer order."""
    tok = d["tokenizer"]
    lines = [
        f"{d['file']}",
        f"  file size      {d['file_size'] / 2**20:.1f} MiB",
        "  quant types    " + ", ".join(f"{k} ×{v['tensors']}" for k, v in d["quant_types"].items()),
        f"  tokenizer      {tok['model']} (pre: {tok['pre']}), {tok['vocab_size']} tokens, "
        f"bos {tok['bos_token_id']}, eos {tok['eos_token_id']}, chat template: {'yes' if tok['chat_template'] else 'no'}",
    ]
    if "card" in d:
        lines.append("  card")
        w = max(len(k) for k in d["card"])
        lines += [f"    {k:<{w}}  {v}" for k, v in d["card"].items()]
    else:
        lines[1:1] = _hyperparameter_lines(d)
    if "tensors" in d:
        lines += _tensor_table(d["tensors"])
    return "\n".join(lines)


def _hyperparameter_lines(d: dict) -> list[str]:
    attn = ("MHA" if d["kv_heads"] == d["heads"] else "MQA" if d["kv_heads"] == 1
            else f"GQA (group {d['heads'] // d['kv_heads']})")
    return [
        f"  name           {d['name']}",
        f"  architecture   {d['architecture']}",
        f"  parameters     {d['parameters'] / 1e6:.1f} M   ({d['bits_per_weight']:.2f} bits/weight)",
        f"  layers         {d['layers']}   embedding {d['embedding']}   feed-forward {d['feed_forward']}",
        f"  attention      {attn}: {d['heads']} heads, {d['kv_heads']} KV heads, head dim {d['head_dim']}"
        + (f", sliding window {d['sliding_window']}" if d["sliding_window"] else ""),
        f"  context        {d['context_length']} tokens   RoPE base {d['rope_base']:g}",
        f"  KV cache       {_kv_per_token_text(d['kv_cache'])}",
        f"                 {_kv_total_text(d['kv_cache'])}",
    ]


def tensor_order(name: str) -> tuple:
    """Sort key: tensors outside the layers first (embeddings, output), then blk.0, blk.1, ... blk.10 by
    number (not as text, which puts blk.10 before blk.2), names within a layer alphabetically."""
    m = _BLOCK.fullmatch(name)
    return (1, int(m.group(1)), m.group(2)) if m else (0, 0, name)


def _tensor_table(tensors: list[dict]) -> list[str]:
    if not tensors:
        return ["  tensors        none"]
    w = max(len(t["name"]) for t in tensors)
    lines = ["  tensors"]
    for t in sorted(tensors, key=lambda t: tensor_order(t["name"])):
        shape = "×".join(str(s) for s in t["shape"])
        lines.append(f"    {t['name']:<{w}}  {t['type']:<5} {shape:>14}  {t['bytes']:>11,} B")
    return lines


# -- the architecture card --------------------------------------------------------------------------

_ACTIVATIONS = {  # (traits.activation, gated) -> name
    ("silu", True): "SwiGLU", ("gelu_tanh", True): "GeGLU", ("swiglu_oai", True): "clamped SwiGLU (gpt-oss)",
    ("silu", False): "SiLU", ("gelu_tanh", False): "GELU",
}
_ROUTING = {"softmax_topk": "softmax → top-k", "topk_softmax": "top-k → softmax"}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def _blocks(g: GGUFFile) -> dict[str, set[int]]:
    """Per-layer tensor name (e.g. 'attn_q.bias') -> the layers that hold it."""
    out: dict[str, set[int]] = {}
    for name in g.tensors:
        m = _BLOCK.fullmatch(name)
        if m:
            out.setdefault(m.group(2), set()).add(int(m.group(1)))
    return out


def _n(t) -> int:
    return int(np.prod(t.shape, dtype=np.int64))


def _stored_copy(g: GGUFFile) -> bool:
    """output.weight holds the same bytes as token_embd.weight (a tied matrix written twice, as llama.cpp's
    converter does for GPT-2). The first row decides for all but identical matrices."""
    out, emb = g.tensors.get("output.weight"), g.tensors.get("token_embd.weight")
    if out is None or emb is None or out.ggml_type != emb.ggml_type or tuple(out.shape) != tuple(emb.shape):
        return False
    a, b = g.tensor("output.weight"), g.tensor("token_embd.weight")
    return bool(np.array_equal(a[:1], b[:1]) and np.array_equal(a, b))


def _rope_freqs_factor(g: GGUFFile) -> float | None:
    """The largest Llama-3 frequency divisor in rope_freqs.weight (= rope_scaling.factor), or None."""
    t = g.tensors.get("rope_freqs.weight")
    if t is None:
        return None
    n = _n(t)
    raw = g.tensor(t.name)
    v = raw.view(np.float32).reshape(n) if t.ggml_type == 0 else dequantize(raw, t.ggml_type, n).reshape(n)
    return float(v.max())


def architecture_facts(model: str | os.PathLike | GGUFFile, cfg: ModelConfig | None = None,
                       n_ctx: int | None = None) -> dict:
    """The architecture card as values (JSON-serialisable): see format_card for the rows. KV-cache sizes are
    for n_ctx tokens (default: the training context)."""
    g = model if isinstance(model, GGUFFile) else GGUFFile(model)
    try:
        cfg = cfg or ModelConfig.from_gguf(g)
        _check_tensor_shapes(g, cfg)
        return _facts(g, cfg, n_ctx)
    except EdgeLMError as e:
        raise e if g.path in str(e) else type(e)(f"{g.path}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise GGUFError(f"{g.path}: cannot derive the architecture card ({type(e).__name__}: {e})") from None


def _facts(g: GGUFFile, cfg: ModelConfig, n_ctx_kv: int | None = None) -> dict:
    t = cfg.traits
    blk = _blocks(g)
    L = cfg.n_layer

    def has(name: str) -> bool:       # in any layer
        return bool(blk.get(name))

    # parameters: what the file stores, less a byte-identical copy of a tied embedding matrix
    copy = _stored_copy(g)
    total = g.n_params - (_n(g.tensors["output.weight"]) if copy else 0)
    expert_params = sum(_n(ti) for name, ti in g.tensors.items() if "_exps." in name)
    moe_layers = len(blk.get("ffn_gate_inp.weight", ()))
    E, k = cfg.n_expert, cfg.n_expert_used
    active = total - (expert_params * (E - k) // E if moe_layers and E else 0)

    # attention
    h, hkv = cfg.n_head, cfg.n_head_kv
    kind = "MHA" if hkv == h else "MQA" if hkv == 1 else "GQA"

    # positions
    learned = t.positions == "learned" or "position_embd.weight" in g.tensors
    freqs_factor = None if learned else _rope_freqs_factor(g)
    if learned:
        scaling, factor = "none", 1.0
    elif freqs_factor is not None:
        scaling, factor = "llama3", freqs_factor
    else:
        scaling, factor = cfg.rope_scaling, cfg.rope_factor
    swa_layers = [il for il in range(L) if cfg.is_swa_layer(il)]
    local_base = cfg.rope_base_swa if swa_layers and not learned and cfg.rope_base_swa != cfg.rope_base else None

    # norms, activation, MLP
    sandwich = t.sandwich_norm or has("post_ffw_norm.weight")
    qk_norm = t.qk_norm or has("attn_q_norm.weight")
    gated = t.gated_mlp

    # biases, by where they sit
    biases = []
    for label, stems in (("qkv", ("attn_q", "attn_k", "attn_v", "attn_qkv")), ("attn out", ("attn_output",)),
                         ("mlp", ("ffn_gate", "ffn_up", "ffn_down", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")),
                         ("router", ("ffn_gate_inp",)),
                         ("norms", ("attn_norm", "ffn_norm", "post_attention_norm", "post_ffw_norm"))):
        if any(has(s + ".bias") for s in stems):
            biases.append(label)
    if "output.bias" in g.tensors:
        biases.append("lm head")

    # weights
    params_by_type: Counter = Counter()
    tensor_bytes = 0
    for ti in g.tensors.values():
        params_by_type[format_for(ti.ggml_type).name] += _n(ti)
        tensor_bytes += ti.n_bytes
    dominant, dominant_params = params_by_type.most_common(1)[0] if params_by_type else ("-", 0)

    n_ctx = cfg.n_ctx_train
    kv = kv_cache_sizes(cfg, n_ctx_kv)

    return {
        "file": os.path.abspath(g.path),
        "name": g.metadata.get("general.name"),
        "architecture": cfg.arch,
        "parameters": total,
        "parameters_active": active,
        "output_is_stored_copy": copy,
        "layers": L,
        "embedding": cfg.n_embd,
        "vocab": cfg.n_vocab,
        "attention": kind,
        "group_size": h // hkv,
        "heads": h,
        "kv_heads": hkv,
        "head_dim": cfg.head_dim,
        "head_dim_v": cfg.head_dim_v,
        "fused_qkv": has("attn_qkv.weight"),
        "positions": "learned" if learned else "rope",
        "max_positions": g.tensors["position_embd.weight"].shape[1]
        if "position_embd.weight" in g.tensors else None,
        "rope_base": None if learned else cfg.rope_base,
        "rope_dim": None if learned else cfg.rope_dim,
        "rope_scaling": scaling,
        "rope_factor": factor,
        "rope_orig_ctx": cfg.rope_orig_ctx if scaling == "yarn" else None,
        "rope_base_local": local_base,
        "norm": "LayerNorm" if t.norm == "layer" else "RMSNorm",
        "norm_placement": "sandwich" if sandwich else "pre",
        "qk_norm": qk_norm,
        "activation": _ACTIVATIONS.get((t.activation, gated), t.activation),
        "gated": gated,
        "fused_gate_up": gated and has("ffn_up.weight") and not has("ffn_gate.weight") and not moe_layers,
        "mlp": "moe" if moe_layers else "dense",
        "ffn": cfg.n_ff if moe_layers < L else None,
        "experts": E if moe_layers else 0,
        "experts_used": k if moe_layers else 0,
        "expert_ffn": cfg.n_ff_exp if moe_layers else None,
        "moe_layers": moe_layers,
        "routing": t.moe_routing if moe_layers else None,
        "routing_renormalised": cfg.expert_weights_norm if moe_layers and t.moe_routing == "softmax_topk" else None,
        "sliding_window": cfg.sliding_window if swa_layers else 0,
        "sliding_layers": len(swa_layers),
        "swa_pattern": t.swa_pattern if swa_layers else None,
        "attn_sinks": has("attn_sinks.weight"),
        "biases": biases,
        "tied_embeddings": "output.weight" not in g.tensors or copy,
        "context_length": n_ctx,
        "bits_per_weight": 8 * tensor_bytes / max(g.n_params, 1),
        "dominant_type": dominant,
        "dominant_share": dominant_params / max(g.n_params, 1),
        "kv_cache": kv,
        # the default cache type's numbers, for scripts that read one figure
        "kv_bytes_per_token": kv["types"]["f16"]["bytes_per_token"],
        "kv_bytes_full_context": kv["types"]["f16"]["bytes"],
    }


def _count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.{2 if unit == 'B' else 1}f} {unit}"
    return str(n)


def _bytes(n: float) -> str:
    for div, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def format_card(f: dict) -> dict[str, str]:
    """The card's rows as text, in table order."""
    L = f["layers"]
    if f["mlp"] == "moe":
        share = f["parameters_active"] / max(f["parameters"], 1)
        active = f"{_count(f['parameters_active'])} ({share:.0%})"
    else:
        active = f"{_count(f['parameters_active'])} (all)"

    attention = f["attention"] + (f" (group size {f['group_size']})" if f["attention"] == "GQA" else "")
    heads = f"{f['heads']} / {f['kv_heads']} / {f['head_dim']}"
    if f["head_dim_v"] != f["head_dim"]:
        heads += f" (v {f['head_dim_v']})"

    if f["positions"] == "learned":
        pos = "learned absolute" + (f" ({f['max_positions']})" if f["max_positions"] else "")
    else:
        pos = f"RoPE base {_num(f['rope_base'])}"
        if f["rope_dim"] and f["rope_dim"] < f["head_dim"]:
            pos += f" on {f['rope_dim']}/{f['head_dim']} dims"
        if f["rope_scaling"] == "llama3":
            pos += f", llama3 ×{_num(f['rope_factor'])} (rope_freqs)"
        elif f["rope_scaling"] == "yarn":
            pos += f", YaRN ×{_num(f['rope_factor'])}" + (f" from {f['rope_orig_ctx']}" if f["rope_orig_ctx"] else "")
        elif f["rope_scaling"] == "linear":
            pos += f", linear ×{_num(f['rope_factor'])}"
        if f["rope_base_local"] is not None:
            pos += f"; local {_num(f['rope_base_local'])}"

    norm = f"{f['norm']}, " + ("sandwich (pre + post)" if f["norm_placement"] == "sandwich" else "pre")
    if f["qk_norm"]:
        norm += ", QK-norm"

    act = f"{f['activation']}, {'gated' if f['gated'] else 'not gated'}"

    if f["mlp"] == "moe":
        mlp = (f"MoE: {f['experts']} experts, {f['experts_used']} active, width {f['expert_ffn']}, "
               f"{_ROUTING.get(f['routing'], f['routing'])}")
        if f["routing_renormalised"]:
            mlp += ", renormalised"
        if f["moe_layers"] < L:
            mlp += f"; on {f['moe_layers']} of {L} layers, dense width {f['ffn']} elsewhere"
    else:
        mlp = f"dense, width {f['ffn']}"

    W, n = f["sliding_window"], f["sliding_layers"]
    if not W:
        swa = "none"
    elif n == L:
        swa = f"{W} on all {L} layers"
    else:
        p = f["swa_pattern"]
        swa = f"{W} on {n} of {L} layers" + (f" ({p - 1} local : 1 global)" if p and p > 1 else "")

    tied = "yes" if f["tied_embeddings"] else "no"
    if f["output_is_stored_copy"]:
        tied += " (output.weight is a stored copy)"


    return {
        "name": f["name"] or "—",
        "architecture": f["architecture"],
        "parameters": _count(f["parameters"]),
        "active per token": active,
        "layers": str(L),
        "embedding width": str(f["embedding"]),
        "vocabulary": str(f["vocab"]),
        "attention": attention,
        "heads / KV / head dim": heads,
        "positions": pos,
        "norm": norm,
        "activation": act,
        "MLP": mlp,
        "sliding window": swa,
        "attention sinks": "yes" if f["attn_sinks"] else "no",
        "biases": ", ".join(f["biases"]) or "none",
        "tied embeddings": tied,
        "context length": str(f["context_length"]),
        "weights": f"{f['bits_per_weight']:.2f} bits/weight, mostly {f['dominant_type']} ({f['dominant_share']:.0%})",
        "KV cache / token": _kv_per_token_text(f["kv_cache"]),
        "KV cache, full ctx": _kv_total_text(f["kv_cache"]),
    }


def _per_type(kv: dict, key: str) -> str:
    """"22.5 KiB (f16), 12.0 KiB (q8_0), ..."; types the head size cannot be stored in named once at the end."""
    parts = [f"{_bytes(v[key])} ({name})" for name, v in kv["types"].items() if v is not None]
    missing = [name for name, v in kv["types"].items() if v is None]
    if missing:
        parts.append(f"no {'/'.join(missing)} (head size not a multiple of 32)")
    return ", ".join(parts)


def _kv_per_token_text(kv: dict) -> str:
    """Bytes one more token of context costs; with sliding-window layers, only the global layers grow."""
    text = _per_type(kv, "bytes_per_token")
    n_global, n_sliding = kv["global_layers"], kv["sliding_layers"]
    if n_sliding:
        rings = f"{kv['ring_slots']} slots each ({_bytes(kv['types']['f16']['sliding_bytes'])} f16)"
        if n_global:
            text += (f"; {n_global} global layer{'s' if n_global > 1 else ''} only, the {n_sliding} sliding "
                     f"ones keep {rings}")
        else:
            text += f"; every layer sliding: {rings}"
    return text


def _kv_total_text(kv: dict) -> str:
    return f"{_per_type(kv, 'bytes')} at {kv['n_ctx']} tokens"


def architecture_card(path: str | os.PathLike) -> dict[str, str]:
    """The architecture card of a GGUF file: row label -> text (see format_card)."""
    return format_card(architecture_facts(path))


def column_header(path: str | os.PathLike) -> str:
    base = os.path.basename(os.fspath(path))
    return base[:-5] if base.lower().endswith(".gguf") else base


def format_compare(columns: list[tuple[str, dict[str, str]]]) -> str:
    """Cards side by side: one row per fact, one column per (header, card), padded to align."""
    labels: list[str] = []
    for _, card in columns:
        labels += [k for k in card if k not in labels]
    rows = [[""] + [h for h, _ in columns]]
    rows += [[k] + [card.get(k, "—") for _, card in columns] for k in labels]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]

    def line(cells):
        return "   ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    rule = "   ".join("-" * w for w in widths)
    return "\n".join([line(rows[0]), rule] + [line(r) for r in rows[1:]])
