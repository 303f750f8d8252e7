"""`edgelm convert HF_DIR -o OUT.gguf`: a Hugging Face checkpoint directory -> a GGUF llama.cpp can load.

Metadata keys and tensor names are gguf-py's (gguf.Keys, gguf.get_tensor_name_map); what each architecture
needs rewritten is in archs.py; the tokenizer is in vocab.py. Tensors are read from the memory-mapped
safetensors one at a time and streamed to a temporary file that is renamed into place at the end, so a
failed or interrupted conversion leaves nothing behind.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGUFValueType, GGUFWriter, LlamaFileType, RopeScalingType, get_tensor_name_map

from ...arch.traits import ARCH_TRAITS
from ...atomic import atomic_output
from ...errors import EdgeLMError, UnsupportedError
from ...quant import recipes
from ...quant.writers import encode
from ..quantize import KEEP_UNQUANTIZED
from .archs import SPECS, ConvertSpec, Source, sources
from .safetensors import Checkpoint

# --outtype -> (ggml type of weight matrices, general.file_type)  (gguf-py constants.py LlamaFileType)
OUTTYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    # the legacy types in every matrix, as convert_hf_to_gguf.py writes q8_0 (llama-quantize's mix: `quantize`)
    **{k: recipes.FILE_TYPES[k] for k in recipes.LEGACY},
    # llama-quantize's MXFP4_MOE: expert matrices in MXFP4 (how gpt-oss ships), everything else Q8_0
    "mxfp4_moe": (Q.Q8_0, LlamaFileType.MOSTLY_MXFP4_MOE),
    # llama.cpp's K-quant file types: a type per tensor (quant/recipes.py, the table `quantize` uses)
    **{k: v for k, v in recipes.FILE_TYPES.items() if k not in recipes.LEGACY},
}
_F32_VT = GGUFValueType.FLOAT32
_QUANT_VERSION = 2   # ggml GGML_QNT_VERSION, written by llama.cpp for quantized files

# Kept in float32 whatever the outtype (llama.cpp convert_hf_to_gguf.py prepare_tensors): 1-D tensors and
# biases, plus what llama.cpp never quantizes.
_F32_SUFFIXES = KEEP_UNQUANTIZED + (".bias",)


@dataclass
class HParams:
    """config.json, read with the aliases the supported families use."""
    cfg: dict
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    tied: bool
    n_expert: int

    @classmethod
    def read(cls, path: Path) -> "HParams":
        try:
            cfg = json.loads(path.read_text())
        except FileNotFoundError:
            raise EdgeLMError(f"{path}: missing (a Hugging Face checkpoint directory has a config.json)") from None
        except ValueError as e:
            raise EdgeLMError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise EdgeLMError(f"{path}: expected a JSON object")

        def get(*names, default=None, required=True):
            for n in names:
                if cfg.get(n) is not None:
                    return cfg[n]
            if required and default is None:
                raise EdgeLMError(f"{path}: key {names[0]} is missing")
            return default

        n_embd = int(get("hidden_size", "n_embd"))
        n_head = int(get("num_attention_heads", "n_head"))
        return cls(
            cfg=cfg,
            n_layer=int(get("num_hidden_layers", "n_layer")),
            n_embd=n_embd, n_head=n_head,
            n_head_kv=int(get("num_key_value_heads", default=n_head)),
            head_dim=int(get("head_dim", default=n_embd // n_head)),
            n_ff=int(get("intermediate_size", "n_inner", default=4 * n_embd)),
            n_vocab=int(get("vocab_size")),
            n_ctx=int(get("max_position_embeddings", "n_positions", "n_ctx", default=2048)),
            tied=bool(get("tie_word_embeddings", default=False, required=False)),
            n_expert=int(get("num_experts", "num_local_experts", default=0, required=False)),
        )

    def rope(self) -> tuple[dict, dict | None]:
        """(RoPE parameters of global layers, of sliding layers or None), from transformers 5's
        rope_parameters (flat, or per layer type) or the older rope_theta + rope_scaling."""
        rp = self.cfg.get("rope_parameters")
        if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
            return rp.get("full_attention") or next(iter(rp.values())), rp.get("sliding_attention")
        if isinstance(rp, dict):
            return rp, None
        legacy = dict(self.cfg.get("rope_scaling") or {})
        legacy.setdefault("rope_theta", self.cfg.get("rope_theta", 10000.0))
        local = self.cfg.get("rope_local_base_freq")
        return legacy, ({"rope_theta": local} if local else None)


def _llama3_factors(rope: dict, dim: int) -> np.ndarray:
    """Per-frequency divisors for Llama-3 RoPE scaling: llama.cpp stores them as rope_freqs.weight
    (convert_hf_to_gguf.py LlamaModel.generate_extra_tensors; transformers _compute_llama3_parameters)."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    out = []
    for f in freqs.astype(np.float64):
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _metadata(w: GGUFWriter, spec: ConvertSpec, hp: HParams, name: str, file_type: int) -> list[Source]:
    """Write the {arch}.* keys; returns extra tensors the architecture needs (RoPE factors)."""
    a, cfg = spec.arch, hp.cfg
    traits = ARCH_TRAITS[a]
    w.add_name(name)
    w.add_file_type(int(file_type))
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_vocab_size(hp.n_vocab)
    if hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if traits.norm == "layer":
        w.add_layer_norm_eps(float(cfg.get("layer_norm_epsilon", cfg.get("layer_norm_eps", 1e-5))))
    else:
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    extra: list[Source] = []
    if traits.positions == "rope":
        rope, rope_swa = hp.rope()
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        dim = int(hp.head_dim * float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))))
        w.add_rope_dimension_count(dim)
        w.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
        if rope_swa is not None:
            w.add_key_value(f"{a}.rope.freq_base_swa", float(rope_swa["rope_theta"]), _F32_VT)
        if rope_type == "linear":
            w.add_rope_scaling_type(RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(rope["factor"]))
        elif rope_type == "yarn":
            w.add_rope_scaling_type(RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(rope["factor"]))
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
            for k in ("beta_fast", "beta_slow"):
                if rope.get(k) is not None:
                    w.add_key_value(f"{a}.rope.scaling.yarn_{k}", float(rope[k]), _F32_VT)
            if rope.get("attention_factor") is not None or rope.get("mscale") is not None:
                raise UnsupportedError(f"YaRN with attention_factor/mscale is not supported ({rope})")
            if bool(rope.get("truncate", True)) != traits.yarn_truncate:
                raise UnsupportedError(f"YaRN truncate={rope.get('truncate')} differs from what {a} expects")
        elif rope_type == "llama3":
            extra.append(Source("rope_freqs.weight", (dim // 2,), lambda: _llama3_factors(rope, dim)))
        elif rope_type != "default":
            raise UnsupportedError(f"RoPE scaling type '{rope_type}' is not supported "
                                   f"(supported: default, linear, yarn, llama3)")
    window = cfg.get("sliding_window")
    if window and cfg.get("use_sliding_window", True):
        _check_layer_types(hp, traits)
        w.add_sliding_window(int(window))
    if hp.n_expert:
        w.add_expert_count(hp.n_expert)
        w.add_expert_used_count(int(cfg["num_experts_per_tok"]))
        w.add_expert_feed_forward_length(int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]))
        if "norm_topk_prob" in cfg:
            w.add_expert_weights_norm(bool(cfg["norm_topk_prob"]))
    scalar = cfg.get("query_pre_attn_scalar")
    if scalar and scalar != hp.head_dim:        # Gemma: scores scaled by query_pre_attn_scalar**-0.5
        w.add_key_value(f"{a}.attention.scale", float(scalar) ** -0.5, _F32_VT)
    for k in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(k):
            raise UnsupportedError(f"config.json: {k} is not supported")
    return extra


def _check_layer_types(hp: HParams, traits) -> None:
    """Which layers slide is fixed per architecture in GGUF (llama.cpp set_swa_pattern); refuse a config
    that says otherwise rather than run it wrong."""
    types = hp.cfg.get("layer_types")
    if not types:
        return
    p = traits.swa_pattern
    want = ["sliding_attention" if (p == 1 or (i + 1) % p != 0) else "full_attention" for i in range(hp.n_layer)]
    if list(types) != want:
        raise UnsupportedError(f"config.json: layer_types {types} differ from the {traits.name} pattern {want}")


def _tensor_type(gguf_name: str, shape: tuple[int, ...], outtype: str,
                 model: recipes.ModelShape | None = None) -> Q:
    """The ggml type a tensor is written in (llama.cpp's rules, see _F32_SUFFIXES; K-quant file types:
    recipes.tensor_type for `model`)."""
    if len(shape) == 1 or gguf_name.endswith(_F32_SUFFIXES):
        return Q.F32
    if outtype in recipes.FILE_TYPES and outtype not in recipes.LEGACY:
        return recipes.tensor_type(outtype, gguf_name, shape[-1], model)
    qtype = OUTTYPES[outtype][0]
    if outtype == "mxfp4_moe" and "_exps." in gguf_name:
        qtype = Q.MXFP4
    if qtype in (Q.F32, Q.F16, Q.BF16):
        return qtype
    return qtype if shape[-1] % 32 == 0 else Q.F16     # rows not in whole blocks: f16, as llama.cpp does


def _byte_shape(shape: tuple[int, ...], qtype: Q) -> tuple[int, ...]:
    block, size = GGML_QUANT_SIZES[qtype]
    return shape[:-1] + (shape[-1] // block * size,)


def _source_files(d: Path, out: str) -> list[Path]:
    """The checkpoint's files, which the output must not replace. Inside the checkpoint folder only a .gguf may
    be written (converters commonly put the GGUF beside the weights), never a new weights or config file."""
    real_out = Path(os.path.realpath(out))
    if real_out.parent == d.resolve() and real_out.suffix.lower() != ".gguf":
        raise EdgeLMError(f"{out}: would write into the source checkpoint {d} as {real_out.name}; "
                          f"name the output *.gguf or write it elsewhere")
    return [p for p in d.iterdir() if p.is_file() and p.suffix.lower() != ".gguf"]


def convert(hf_dir: str, out: str, outtype: str = "f16",
            progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Convert the checkpoint in `hf_dir` to the GGUF `out`. Returns {"tensors": n, "arch": ...}."""
    outtype = recipes.ALIASES.get(outtype.lower(), outtype.lower())
    if outtype not in OUTTYPES:
        raise EdgeLMError(f"unknown --outtype '{outtype}' (choose from {', '.join(OUTTYPES)})")
    d = Path(hf_dir)
    if not d.is_dir():
        raise EdgeLMError(f"{hf_dir}: not a directory")
    hp = HParams.read(d / "config.json")
    archs = hp.cfg.get("architectures") or []
    spec = next((SPECS[a] for a in archs if a in SPECS), None)
    if spec is None:
        raise UnsupportedError(f"{d / 'config.json'}: architecture {archs or '(none)'} is not supported "
                               f"(supported: {', '.join(sorted(SPECS))})")
    ckpt = Checkpoint(d)
    tmap = get_tensor_name_map(next(k for k, v in MODEL_ARCH_NAMES.items() if v == spec.arch), hp.n_layer)

    with atomic_output(out, inputs=_source_files(d, out)) as tmp:
        w = GGUFWriter(tmp, arch=spec.arch)
        extra = _metadata(w, spec, hp, d.resolve().name, OUTTYPES[outtype][1])
        from .vocab import add_vocab
        add_vocab(w, d, hp.n_vocab, spec.arch)
        plan = []
        for src in sources(spec, ckpt, hp) + extra:
            name = src.hf_name if src.hf_name == "rope_freqs.weight" else \
                tmap.get_name(src.hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                raise UnsupportedError(f"{getattr(ckpt.entries.get(src.hf_name), 'file', ckpt.dir)}: tensor {src.hf_name} has no "
                                       f"GGUF name for {spec.arch}")
            plan.append((name, src))
            if spec.duplicate_output and name == "token_embd.weight" and "lm_head.weight" not in ckpt:
                plan.append(("output.weight", src))
        seen = set()
        for name, src in plan:
            if name in seen:
                raise EdgeLMError(f"{d}: two checkpoint tensors map to {name}")
            seen.add(name)
        model = recipes.ModelShape(spec.arch, hp.n_layer, hp.n_head, hp.n_head_kv, hp.n_expert,
                                   tied_output="output.weight" not in seen,
                                   n_attn_v=sum(n.endswith(("attn_v.weight", "attn_qkv.weight")) for n in seen))
        for name, src in plan:
            qtype = _tensor_type(name, src.shape, outtype, model)
            byte_shape = _byte_shape(src.shape, qtype)
            w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        if outtype not in ("f32", "f16", "bf16"):
            w.add_quantization_version(_QUANT_VERSION)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, src) in enumerate(plan):
            a = src.load()
            if a.shape != src.shape:
                raise EdgeLMError(f"{d}: tensor {src.hf_name} has shape {list(a.shape)}, expected {list(src.shape)}")
            qtype = _tensor_type(name, src.shape, outtype, model)
            data = a if qtype == Q.F32 else encode(a, qtype)
            w.write_tensor_data(np.ascontiguousarray(data))
            if progress:
                progress(name, i + 1, len(plan))
        w.close()
    return {"tensors": len(plan), "arch": spec.arch}
