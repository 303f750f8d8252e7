"""Load the GGUFs `edgelm convert` writes in llama.cpp and compare its logits with transformers' (and edgelm's).

For every tiny checkpoint in tests/data/tiny/ (tools/make_tiny_checkpoints.py), convert it (f32 and q8_0),
evaluate the stored token ids teacher-forced in llama.cpp (llama-cpp-python) and in edgelm, and print
top-1 agreement, max |diff| / std(logits) and mean KL against transformers' float32 logits.

Needs the reference venv (../shared/tools/setup-reference.sh):
    ~/.cache/edgelm-reference/venv/bin/python tools/llamacpp_check.py [--only gpt2,qwen3] [--outtype f32,q8_0]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
TINY = ROOT / "tests" / "data" / "tiny"


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(got, want) -> str:
    p = np.exp(log_softmax(want))
    kl = (p * (log_softmax(want) - log_softmax(got))).sum(-1).mean()
    top1 = (got.argmax(-1) == want.argmax(-1)).mean()
    rel = np.abs(got - want).max() / want.std()
    return f"top1 {top1:5.3f}  max|d|/std {rel:8.2e}  KL {kl:8.2e}"


def llamacpp_logits(path: Path, ids) -> np.ndarray:
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval([int(t) for t in ids])
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def edgelm_logits(path: Path, ids, kv_type: str) -> np.ndarray:
    import edgelm
    return edgelm.load(str(path), n_ctx=64, kv_type=kv_type).eval_logits(ids)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated checkpoint names")
    ap.add_argument("--outtype", default="f32,q8_0")
    a = ap.parse_args()
    from edgelm.commands.convert import convert
    names = a.only.split(",") if a.only else sorted(p.name for p in TINY.iterdir() if (p / "config.json").exists())
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            ref = np.load(TINY / name / "reference.npz")
            for outtype in a.outtype.split(","):
                path = Path(tmp) / f"{name}-{outtype}.gguf"
                convert(str(TINY / name), str(path), outtype)
                kv = "f32" if outtype == "f32" else "f16"
                print(f"{name:10s} {outtype:5s} edgelm    {agreement(edgelm_logits(path, ref['ids'], kv), ref['logits'])}",
                      flush=True)
                try:
                    got = llamacpp_logits(path, ref["ids"])
                    print(f"{name:10s} {outtype:5s} llama.cpp {agreement(got, ref['logits'])}", flush=True)
                except Exception as e:       # report and go on: one architecture failing is a result too
                    print(f"{name:10s} {outtype:5s} llama.cpp FAILED: {type(e).__name__}: {e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
