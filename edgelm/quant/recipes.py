"""llama.cpp's file types (`llama-quantize ... Q4_K_M`): which block type each tensor of a model gets.

The rules are llama.cpp's, restated as data (src/llama-quant.cpp, llama_tensor_get_type and
tensor_type_fallback): every matrix starts at the file type's default type; the output matrix
(and the token embeddings when the output reuses them) gets Q6_K (Q8_0 stays Q8_0); attn_v, ffn_down and
attn_output get more bits in some layers; a row length that the chosen block does not divide falls back to a
legacy type (Q8_0 for the output), then to F16.  Models of exactly 8 experts (Mixtral's shape) get Q8_0
attn_k/attn_v and a Q5_K attn_output in the low mixes; the rules read a layer's index from the tensor name, so
expert tensors (ffn_down_exps ...) follow their layer's ffn_down rule.  1-D tensors (norms) and what llama.cpp never quantizes keep their type.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as FT

from ..errors import UnsupportedError

# file type name -> (default type, general.file_type)   (llama_ftype_get_default_type)
FILE_TYPES = {
    "q2_k": (Q.Q2_K, FT.MOSTLY_Q2_K),
    "q3_k_s": (Q.Q3_K, FT.MOSTLY_Q3_K_S),
    "q3_k_m": (Q.Q3_K, FT.MOSTLY_Q3_K_M),
    "q3_k_l": (Q.Q3_K, FT.MOSTLY_Q3_K_L),
    "q4_k_s": (Q.Q4_K, FT.MOSTLY_Q4_K_S),
    "q4_k_m": (Q.Q4_K, FT.MOSTLY_Q4_K_M),
    "q5_k_s": (Q.Q5_K, FT.MOSTLY_Q5_K_S),
    "q5_k_m": (Q.Q5_K, FT.MOSTLY_Q5_K_M),
    "q6_k": (Q.Q6_K, FT.MOSTLY_Q6_K),
    # the legacy file types: their type everywhere but the output matrix (Q6_K), and, with an importance
    # matrix, Q4_1/Q5_1 for the first eighth of Q4_0/Q5_0's ffn_down
    "q4_0": (Q.Q4_0, FT.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, FT.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, FT.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, FT.MOSTLY_Q5_1),
    "q8_0": (Q.Q8_0, FT.MOSTLY_Q8_0),
}
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
ALIASES = {"q3_k": "q3_k_m", "q4_k": "q4_k_m", "q5_k": "q5_k_m"}     # llama-quantize's


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# Per-layer rules: file type -> function (layer, n) -> type, for attn_v and ffn_down (attn_output: a type).
_ATTN_V = {
    "q3_k_m": lambda i, n: Q.Q5_K if i < 2 else Q.Q4_K,
    "q3_k_l": lambda i, n: Q.Q5_K,
    "q4_k_m": lambda i, n: Q.Q6_K if _more_bits(i, n) else Q.Q4_K,
    "q5_k_m": lambda i, n: Q.Q6_K if _more_bits(i, n) else Q.Q5_K,
    "q4_k_s": lambda i, n: Q.Q5_K if i < 4 else Q.Q4_K,
}
_FFN_DOWN = {
    "q2_k": lambda i, n: Q.Q3_K,
    "q3_k_m": lambda i, n: Q.Q5_K if i < n // 16 else Q.Q4_K,
    "q3_k_l": lambda i, n: Q.Q5_K,
    "q4_k_m": lambda i, n: Q.Q6_K if _more_bits(i, n) else Q.Q4_K,
    "q5_k_m": lambda i, n: Q.Q6_K if _more_bits(i, n) else Q.Q5_K,
    "q4_k_s": lambda i, n: Q.Q5_K if i < n // 8 else Q.Q4_K,
}
_ATTN_OUTPUT = {"q2_k": Q.Q3_K, "q3_k_m": Q.Q4_K, "q3_k_l": Q.Q5_K}
_ATTN_OUTPUT_8_EXPERTS = ("q2_k", "q3_k_s", "q3_k_m", "q4_k_s", "q4_k_m")      # these get Q5_K there

# A row length the 256-block does not divide (tensor_type_fallback, newest llama.cpp): then F16 if 32 does not.
_FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}
_LAYER = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class ModelShape:
    """What the rules read from a model: its layer count, attention heads, experts, and whether the output
    matrix is its own tensor (else the token embeddings serve as output: "tied")."""
    arch: str
    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int
    tied_output: bool
    n_attn_v: int


def resolve(name: str) -> str:
    key = name.lower()
    key = ALIASES.get(key, key)
    if key not in FILE_TYPES:
        raise UnsupportedError(f"unknown file type '{name}'")
    return key


def tensor_type(file_type: str, name: str, n_in: int, shape: ModelShape, has_imatrix: bool = False,
                pure: bool = False) -> Q:
    """The type llama.cpp's quantizer gives matrix `name` (rows of n_in values) for this file type, with or
    without an importance matrix; pure: the file type's type for every matrix (llama-quantize --pure), but
    for the fallbacks of rows it does not fit."""
    default = FILE_TYPES[file_type][0]
    m = _LAYER.match(name)
    layer = int(m.group(1)) if m else -1
    t = default
    if pure:
        pass
    elif name == "output.weight" or (name == "token_embd.weight" and shape.tied_output):
        t = default if default == Q.Q8_0 else Q.Q6_K
        if n_in % 256:
            t = Q.Q8_0
    elif name == "token_embd.weight":
        pass
    elif any(k in name for k in ("attn_qkv.weight", "attn_kv_b.weight", "attn_v.weight")):
        if file_type == "q2_k":
            t = Q.Q4_K if shape.n_head_kv and shape.n_head // shape.n_head_kv >= 4 else Q.Q3_K
        elif file_type in _ATTN_V:
            t = _ATTN_V[file_type](layer, shape.n_attn_v)
        if shape.arch == "llama" and shape.n_layer == 80 and t in (Q.Q3_K, Q.Q4_K):   # llama.cpp's 70B rule
            t = Q.Q5_K
        if shape.n_expert == 8:          # llama.cpp: "for the 8-expert model, bumping this to Q8_0"
            t = Q.Q8_0
    elif "attn_k.weight" in name:
        if shape.n_expert == 8:
            t = Q.Q8_0
    elif "attn_output.weight" in name:
        if shape.n_expert == 8:
            t = Q.Q5_K if file_type in _ATTN_OUTPUT_8_EXPERTS else default
        else:
            t = _ATTN_OUTPUT.get(file_type, default)
    elif "ffn_down" in name and file_type in _FFN_DOWN:
        t = _FFN_DOWN[file_type](layer, shape.n_layer)
    elif "ffn_down" in name and file_type in ("q4_0", "q5_0") and has_imatrix and layer < shape.n_layer // 8:
        t = Q.Q4_1 if file_type == "q4_0" else Q.Q5_1
    if n_in % 256:
        t = _FALLBACK.get(t, t)
    return t if n_in % 32 == 0 else Q.F16
