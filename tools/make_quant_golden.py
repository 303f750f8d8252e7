"""llama.cpp's logits on the quant-check files of tests/quant_model.py: the golden of tests/test_quant_files.py.

For every quant type of issue 12 (and Q4_K as a control) it writes two small random-block llama files of that
type (tests/quant_model.py): "model", every matrix of the type, and "probe", only the token embeddings (the
layers add nothing, so the logits depend on llama.cpp's decode of the type alone, not on its int8 activations).
It evaluates fixed token ids teacher-forced in llama.cpp (llama-cpp-python) and stores per type and file the
digest of the tensor data (the test checks it made the same file), llama.cpp's top-8 logits and ids per
position and each row's std.  --compare also prints edgelm's and the float64 NumPy reference's agreement.

Regenerate (needs llama-cpp-python: the reference venv of ../shared/tools/setup-reference.sh):
    ~/.cache/edgelm-reference/venv/bin/python tools/make_quant_golden.py [--compare]
    # -> tests/golden/quant_files_llamacpp.npz
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.quant_model import SHAPE, T, reference_logits, write_model  # noqa: E402

TYPES = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M",
         "TQ1_0", "TQ2_0", "Q4_K"]
N_TOKENS = 64
TOP = 8
OUT = ROOT / "tests" / "golden" / "quant_files_llamacpp.npz"


def token_ids() -> np.ndarray:
    return np.random.default_rng(12).integers(0, SHAPE["n_vocab"], N_TOKENS)


def llamacpp_logits(path: str, ids) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=2 * N_TOKENS, n_batch=N_TOKENS, logits_all=True, verbose=False, n_threads=2)
    llm.eval([int(t) for t in ids])
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--compare", action="store_true", help="also run edgelm and the NumPy reference")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--decode-probe", action="store_true",
                    help="only compare llama.cpp's decode of each type with gguf-py's (see quant_model._tensors); "
                         "writes no golden")
    a = ap.parse_args(argv)
    ids = token_ids()
    if a.decode_probe:
        with tempfile.TemporaryDirectory() as tmp:
            for name in a.types.split(","):
                path = os.path.join(tmp, f"{name}.gguf")
                write_model(path, T[name], embedding_only=True)
                lc, ref = llamacpp_logits(path, ids), reference_logits(path, ids)
                print(f"{name:8s} llama.cpp vs gguf-py decode: max |diff| / std "
                      f"{np.max(np.abs(lc - ref) / ref.std(-1, keepdims=True)):.2e}", flush=True)
        return 0
    golden = {"ids": ids.astype(np.int32)}
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.types.split(","):
            logits = {}
            for kind, embedding_only in (("model", False), ("probe", True)):
                path = os.path.join(tmp, f"{name}-{kind}.gguf")
                digest = write_model(path, T[name], embedding_only=embedding_only)
                lc = logits[kind] = llamacpp_logits(path, ids)
                top = np.argsort(-lc, -1)[:, :TOP]
                golden[f"{name}.{kind}.digest"] = np.array(digest)
                golden[f"{name}.{kind}.top_ids"] = top.astype(np.int16)
                golden[f"{name}.{kind}.top_logits"] = np.take_along_axis(lc, top, -1)
                golden[f"{name}.{kind}.std"] = lc.std(-1)
            path, lc = os.path.join(tmp, f"{name}-model.gguf"), logits["model"]
            line = f"{name:8s} llama.cpp done"
            if a.compare:
                import edgelm
                m = edgelm.load(path, n_ctx=2 * N_TOKENS, cache_type_k="f32", cache_type_v="f32")
                ours = m.eval_logits([int(t) for t in ids])
                ref = reference_logits(path, ids)
                std = ref.std(-1, keepdims=True)
                line = (f"{name:8s} top-1 edgelm/llama.cpp {np.mean(ours.argmax(-1) == lc.argmax(-1)):.3f}  "
                        f"edgelm/NumPy {np.mean(ours.argmax(-1) == ref.argmax(-1)):.3f}  "
                        f"llama.cpp/NumPy {np.mean(lc.argmax(-1) == ref.argmax(-1)):.3f}  "
                        f"max|diff|/std edgelm {np.max(np.abs(ours - ref) / std):.2e}  "
                        f"llama.cpp {np.max(np.abs(lc - ref) / std):.2e}")
            print(line, flush=True)
    tmp_out = OUT.with_suffix(".partial.npz")
    np.savez_compressed(tmp_out, **golden)
    os.replace(tmp_out, OUT)
    print(OUT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
