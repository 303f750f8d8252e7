"""llama.cpp's K-quant files of two small F16 models: the golden of tests/test_kquant.py.

For each model shape below, writes a random-weight F16 llama file (tests/quant_model.py, every matrix F16),
quantizes it with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize, no imatrix) to every
K-quant file type (q2_k, q3_k_s ... q6_k), and stores per file type and tensor the type llama.cpp chose and the
SHA-256 of its bytes (the first 16 hex digits), plus the digest of the F16 file's tensor data (the test checks it made the same input).
The shapes cover llama.cpp's per-layer rules (18 layers: n/16 = 1, n/8 = 2, use_more_bits) and its fallbacks
(rows of 288: no whole 256-blocks; 4 query heads per KV head: Q2_K's attn_v rule) and its 8-expert rules
(Mixtral's layout: 3-D expert tensors).  Every file type: the K-quant mixes and the legacy ones (q4_0 ... q8_0).  "importance": the rows of
tests/quant_model.importance_case quantized by ggml's own ggml_quantize_chunk (llama-cpp-python's
libggml-base) to Q2_K ... Q6_K with and without its importance weights, and to Q4_0 ... Q5_1 with them: the
hash of each row's blocks.

Regenerate (needs llama-cpp-python: the reference venv of ../shared/tools/setup-reference.sh):
    ~/.cache/edgelm-reference/venv/bin/python tools/make_kquant_golden.py
    # -> tests/golden/kquant_llamacpp.json
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from edgelm.quant.recipes import FILE_TYPES  # noqa: E402
from tests.quant_model import SHAPE, T, importance_case, tensor_digests, write_model  # noqa: E402

SHAPES = {
    "deep": dict(SHAPE, n_layer=18),
    "odd_rows": dict(SHAPE, n_layer=3, n_embd=288, n_head=4, n_head_kv=1),
    "experts8": dict(SHAPE, n_layer=9, n_expert=8, n_ff=256),       # llama.cpp's 8-expert rules
}
OUT = ROOT / "tests" / "golden" / "kquant_llamacpp.json"


def llamacpp_quantize(src: str, dst: str, file_type: str) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {file_type}")


def ggml_rows(x: np.ndarray, type_name: str, weights: np.ndarray | None) -> list[str]:
    """ggml_quantize_chunk(type, x, ..., imatrix): each row's blocks, hashed."""
    import gguf
    import llama_cpp
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    qtype = int(T[type_name])
    lib.ggml_quantize_init(qtype)
    block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
    row_bytes = x.shape[1] // block * size
    out = np.zeros((x.shape[0], row_bytes), np.uint8)
    lib.ggml_quantize_chunk(qtype, x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                            None if weights is None else weights.ctypes.data)
    return [hashlib.sha256(r.tobytes()).hexdigest()[:16] for r in out]


def main() -> int:
    x, w = importance_case()
    golden = {"importance": {f"{name}.{'imatrix' if use else 'ref'}": ggml_rows(x, name, w if use else None)
                             for name in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K") for use in (False, True)}}
    for name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):     # weighted legacy types (unweighted: gguf-py's, tested there)
        golden["importance"][f"{name}.imatrix"] = ggml_rows(x, name, w)
    with tempfile.TemporaryDirectory() as tmp:
        for label, shape in SHAPES.items():
            src = os.path.join(tmp, f"{label}-f16.gguf")
            entry = {"shape": shape, "digest": write_model(src, T.F16, shape=shape), "files": {}}
            for ft in FILE_TYPES:
                dst = os.path.join(tmp, f"{label}-{ft}.gguf")
                llamacpp_quantize(src, dst, ft)
                entry["files"][ft] = tensor_digests(dst)
                os.remove(dst)
                print(label, ft, flush=True)
            golden[label] = entry
    tmp_out = OUT.with_suffix(".partial")
    tmp_out.write_text(json.dumps(golden, sort_keys=True) + "\n")
    os.replace(tmp_out, OUT)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
