"""`edgelm quantize IN.gguf OUT.gguf TYPE`: rewrite a GGUF with its weight matrices in another block format.

TYPE is one of llama.cpp's file types, legacy (q4_0 ... q8_0) or K-quant (q2_k, q3_k_s ... q6_k), each the
per-tensor mix of quant/recipes.py as llama-quantize makes it (--pure: the type in every matrix), or f16/f32. Blocks equal llama.cpp's reference quantizers
byte for byte (quant/writers.py). As in llama.cpp's quantizer (src/llama-quant.cpp), only matrices are
quantized: 1-D tensors (norms, biases) keep their type. One tensor is in memory at a time; the file is
written under a temporary name and renamed at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter, LlamaFileType

from ..atomic import atomic_output
from ..config import ModelConfig
from ..errors import EdgeLMError, UnsupportedError
from ..gguf_file import GGUFFile
from ..quant import recipes
from ..quant.formats import dequantize, format_for
from ..quant.writers import encode

# float targets -> (ggml type, general.file_type)   (gguf-py constants.py LlamaFileType); the quantized file
# types (legacy and K-quant) are llama.cpp's per-tensor mixes of quant/recipes.py
TARGETS = {
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),      # e.g. a quantized file back to floats (a KL base)
    "f32": (Q.F32, LlamaFileType.ALL_F32),
}


def bits_per_weight(ggml_type: int) -> float:
    f = format_for(ggml_type)
    return 8.0 * f.type_size / f.block_size


# Never quantized, as in llama.cpp's quantizer (src/llama-quant.cpp: norms, the MoE router, position
# embeddings, RoPE factors, attention sinks are kept as they are).
KEEP_UNQUANTIZED = ("_norm.weight", "ffn_gate_inp.weight", "position_embd.weight", "rope_freqs.weight",
                  "attn_sinks.weight")


def _is_matrix(info) -> bool:
    return len(info.shape) >= 2 and info.name.endswith(".weight") and not info.name.endswith(KEEP_UNQUANTIZED)


def _n_mat(info) -> int:
    """The matrices a tensor stacks (its experts; 1 for a plain matrix): shape is ggml's (n_in, rows, ...)."""
    return int(np.prod(info.shape[2:], dtype=np.int64))


def target_names() -> list[str]:
    return [*TARGETS, *recipes.FILE_TYPES]


def model_shape(g: GGUFFile, config: ModelConfig) -> recipes.ModelShape:
    """What llama.cpp's per-tensor rules read from a model (quant/recipes.py)."""
    names = g.tensors.keys()
    n_attn_v = sum(1 for n in names if n.endswith(("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")))
    return recipes.ModelShape(g.architecture, config.n_layer, config.n_head, config.n_head_kv, config.n_expert,
                              tied_output="output.weight" not in names, n_attn_v=n_attn_v)


def _plan_type(key: str, info, shape: recipes.ModelShape | None, has_imatrix: bool, pure: bool):
    """The type matrix `info` is written in, or None to copy it as it is."""
    if not _is_matrix(info):
        return None
    if key in TARGETS:
        return TARGETS[key][0]
    return recipes.tensor_type(key, info.name, info.n_in, shape, has_imatrix, pure)


def quantize_file(src: str, dst: str, target: str,
                  progress: Callable[[str, int, int], None] | None = None, imatrix: str | None = None,
                  pure: bool = False) -> dict:
    """Write `dst`: `src` with its weight matrices in llama.cpp's file type `target` (q8_0, q4_0, q4_1, q5_0,
    q5_1, q2_k, q3_k_s/m/l, q4_k_s/m, q5_k_s/m, q6_k: llama-quantize's per-tensor mix, or with `pure` that type
    in every matrix) or in f16/f32. `imatrix`: an importance matrix file (llama.cpp's imatrix GGUF or .dat)
    whose entries weigh the block searches of their tensors. Returns counts of quantized / copied tensors and
    each tensor's type."""
    key = target.lower()
    key = recipes.ALIASES.get(key, key)
    if key not in TARGETS and key not in recipes.FILE_TYPES:
        raise EdgeLMError(f"unknown quantization type '{target}' (choose from {', '.join(target_names())})")
    file_type = (TARGETS[key] if key in TARGETS else recipes.FILE_TYPES[key])[1]
    g = GGUFFile(src)
    config = ModelConfig.from_gguf(g)          # refuses an architecture edgelm cannot run
    shape = model_shape(g, config) if key in recipes.FILE_TYPES else None
    imat = None
    if imatrix is not None:
        from ..evaluate.imatrix import read as read_imatrix
        imat = read_imatrix(imatrix)
        if not any(name in g.tensors for name in imat.values):
            raise EdgeLMError(f"{imatrix}: none of its {len(imat.values)} entries names a tensor of {src}: "
                              "an importance matrix of another model?")
    plan = []
    for info in g.tensors.values():
        qtype = _plan_type(key, info, shape, imatrix is not None, pure)
        lossy = qtype is not None and qtype not in (Q.F16, Q.F32)      # to floats: the decoded weights themselves
        if lossy and qtype != info.ggml_type and bits_per_weight(info.ggml_type) < bits_per_weight(qtype):
            raise UnsupportedError(
                f"{src}: tensor {info.name} is {format_for(info.ggml_type).name} "
                f"({bits_per_weight(info.ggml_type):.2f} bits/weight), lower precision than {Q(qtype).name} "
                f"({bits_per_weight(qtype):.2f}): quantize from an F32/F16/BF16 or higher-precision file")
        plan.append((info, qtype if qtype != info.ggml_type else None))
        if imat is not None:
            imat.for_tensor(info.name, info.n_in, _n_mat(info))     # checked before anything is written
    with atomic_output(dst, inputs=[src]) as tmp:
        w = GGUFWriter(tmp, arch=g.architecture)
        for k, v in g.metadata.items():
            if k in ("general.architecture", "general.alignment") or k.startswith("GGUF."):
                continue
            if k == "general.file_type" or (imat is not None and k.startswith("quantize.imatrix.")):
                continue
            vtype, item = g.value_types[k]
            w.add_key_value(k, v.tolist() if isinstance(v, np.ndarray) else v, GGUFValueType(vtype),
                            sub_type=GGUFValueType(item) if item is not None else None)
        w.add_uint32("general.file_type", int(file_type))
        if "general.alignment" in g.metadata:
            w.add_uint32("general.alignment", int(g.metadata["general.alignment"]))
        if imat is not None:      # llama.cpp's quantize.imatrix.* keys (tools/quantize/quantize.cpp)
            w.add_string("quantize.imatrix.file", os.path.basename(imatrix))
            if imat.dataset:
                w.add_string("quantize.imatrix.dataset", imat.dataset)
            w.add_int32("quantize.imatrix.entries_count", len(imat.values))
            if imat.n_chunk is not None:
                w.add_int32("quantize.imatrix.chunks_count", int(imat.n_chunk))
        for info, qtype in plan:
            t = qtype if qtype is not None else info.ggml_type
            fmt = format_for(t)
            row_bytes = info.n_in // fmt.block_size * fmt.type_size
            byte_shape = tuple(reversed(info.shape[1:])) + (row_bytes,)   # numpy order, bytes per row last
            w.add_tensor_info(info.name, byte_shape, np.dtype(np.uint8), info.n_rows * row_bytes, raw_dtype=Q(t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (info, qtype) in enumerate(plan):
            raw = g.tensor(info.name)
            if qtype is not None:
                x = dequantize(raw, info.ggml_type, info.n_in)
                weights = imat.for_tensor(info.name, info.n_in, _n_mat(info)) if imat is not None else None
                if weights is None:
                    data = encode(x, qtype)
                else:                         # each matrix (expert) with its own weights, as llama.cpp
                    x = x.reshape(len(weights), -1, info.n_in)
                    data = np.stack([encode(x[e], qtype, weights[e]) for e in range(len(weights))])
            else:
                data = np.ascontiguousarray(raw)
            w.write_tensor_data(data)
            if progress:
                progress(info.name, i + 1, len(plan))
        w.close()
    return {"quantized": sum(q is not None for _, q in plan), "copied": sum(q is None for _, q in plan),
            "types": {info.name: Q(q if q is not None else info.ggml_type).name for info, q in plan}}
