"""llama.cpp's K-quant files of two small F16 models: the golden of tests/test_kquant.py.

For each model shape below, writes a random-weight F16 llama file (tests/quant_model.py, every matrix F16),
quantizes it with llama.cpp's own quantizer (llama-cpp-python's llama_model_quantize, no imatrix) to every
K-quant file type (q2_k, q3_k_s ... q6_k), and stores per file type and tensor the type llama.cpp chose and the
SHA-256 of its bytes (the first 16 hex digits), plus the digest of the F16 file's tensor data (the test checks it made the same input).
The shapes cover llama.cpp's per-layer rules (18 layers: n/16 = 1, n/8 = 2, use_more_bits) and its fallbacks
(rows of 288: no whole 256-blocks; 4 query heads per KV head: Q2_K's attn_v rule).

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
from tests.quant_model import SHAPE, T, write_model  # noqa: E402

SHAPES = {
    "deep": dict(SHAPE, n_layer=18),
    "odd_rows": dict(SHAPE, n_layer=3, n_embd=288, n_head=4, n_head_kv=1),
}
OUT = ROOT / "tests" / "golden" / "kquant_llamacpp.json"


def llamacpp_quantize(src: str, dst: str, file_type: str) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {src} to {file_type}")


def tensor_digests(path: str) -> dict:
    import gguf
    return {t.name: [T(t.tensor_type).name, hashlib.sha256(np.asarray(t.data).tobytes()).hexdigest()[:16]]
            for t in gguf.GGUFReader(path).tensors}


def main() -> int:
    golden = {}
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
