"""`edgelm quantize IN.gguf OUT.gguf TYPE`: rewrite a GGUF with its weight matrices in another block format.

Blocks are made by gguf-py's reference quantizer (gguf.quants.quantize), so the output equals it byte for
byte. As in llama.cpp's quantizer (src/llama-quant.cpp), only matrices are quantized: 1-D tensors (norms,
biases) keep their type. One tensor is in memory at a time; the file is written under a temporary name and
renamed at the end, so a failure leaves nothing behind.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType, GGUFWriter, LlamaFileType
from gguf.quants import quantize as reference_quantize

from ..atomic import atomic_output
from ..config import ModelConfig
from ..errors import EdgeLMError, UnsupportedError
from ..gguf_file import GGUFFile
from ..quant.formats import dequantize, format_for

# target name -> (ggml type, general.file_type)   (gguf-py constants.py LlamaFileType)
TARGETS = {
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
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


def quantize_file(src: str, dst: str, target: str,
                  progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write `dst`: `src` with every weight matrix in `target` (q8_0, q4_0, q4_1, q5_0, q5_1).
    Returns counts of quantized / copied tensors."""
    key = target.lower()
    if key not in TARGETS:
        raise EdgeLMError(f"unknown quantization type '{target}' (choose from {', '.join(TARGETS)})")
    qtype, file_type = TARGETS[key]
    g = GGUFFile(src)
    ModelConfig.from_gguf(g)          # refuses an architecture edgelm cannot run
    tbits = bits_per_weight(qtype)
    plan = []
    for info in g.tensors.values():
        quantize = _is_matrix(info) and info.shape[0] % 32 == 0 and info.ggml_type != qtype
        if quantize and bits_per_weight(info.ggml_type) < tbits:
            raise UnsupportedError(
                f"{src}: tensor {info.name} is {format_for(info.ggml_type).name} "
                f"({bits_per_weight(info.ggml_type):.2f} bits/weight), lower precision than {qtype.name} "
                f"({tbits:.2f}): quantize from an F32/F16/BF16 or higher-precision file")
        plan.append((info, quantize))
    with atomic_output(dst, inputs=[src]) as tmp:
        w = GGUFWriter(tmp, arch=g.architecture)
        for k, v in g.metadata.items():
            if k in ("general.architecture", "general.alignment") or k.startswith("GGUF."):
                continue
            if k == "general.file_type":
                continue
            vtype, item = g.value_types[k]
            w.add_key_value(k, v.tolist() if isinstance(v, np.ndarray) else v, GGUFValueType(vtype),
                            sub_type=GGUFValueType(item) if item is not None else None)
        w.add_uint32("general.file_type", int(file_type))
        if "general.alignment" in g.metadata:
            w.add_uint32("general.alignment", int(g.metadata["general.alignment"]))
        for info, quantize in plan:
            t = qtype if quantize else info.ggml_type
            fmt = format_for(t)
            row_bytes = info.n_in // fmt.block_size * fmt.type_size
            byte_shape = tuple(reversed(info.shape[1:])) + (row_bytes,)   # numpy order, bytes per row last
            w.add_tensor_info(info.name, byte_shape, np.dtype(np.uint8), info.n_rows * row_bytes, raw_dtype=Q(t))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (info, quantize) in enumerate(plan):
            raw = g.tensor(info.name)
            if quantize:
                x = dequantize(raw, info.ggml_type, info.n_in)
                data = reference_quantize(x, qtype)
            else:
                data = np.ascontiguousarray(raw)
            w.write_tensor_data(data)
            if progress:
                progress(info.name, i + 1, len(plan))
        w.close()
    return {"quantized": sum(q for _, q in plan), "copied": sum(not q for _, q in plan)}
