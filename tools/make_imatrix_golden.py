"""llama.cpp's importance matrix of a small F16 model, in both of its file formats, and llama.cpp's quantization
with each: the golden of tests/test_imatrix.py.

The model is tests/quant_model.py's random F16 llama file (write_model(T.F16, edge_rows=False): llama.cpp's
F16 matmuls overflow on the extreme rows; the same bytes wherever it is made); the calibration text is made from a seeded word list and stored in the golden.  llama-imatrix writes
the GGUF and the legacy .dat imatrix of it (tests/golden/imatrix_llamacpp.{gguf,dat}); llama-quantize then
quantizes the F16 file with each of them to a few file types, and the golden stores, per imatrix format
and file type, the type and SHA-256 (first 16 hex digits) of every tensor it wrote.  The same for a small
8-expert model (imatrix_llamacpp_moe.gguf: one row and one count per expert; its q4_k_m with it), and the
output matrix's entry that --process-output adds.

llama-cpp-python has no imatrix or quantize-with-imatrix entry point, so this needs llama.cpp's own tools,
built from the llama.cpp that llama-cpp-python vendors (the same version as the reference venv):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp && cd /tmp/lcpp &&
      tar xzf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/vendor/llama.cpp &&
      cmake -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF $(bash ../shared/tools/llama-cmake-args.sh) &&
      cmake --build build -j2 --target llama-imatrix llama-quantize

Regenerate:
    python tools/make_imatrix_golden.py --llama-bin /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin
    # -> tests/golden/imatrix_llamacpp.{json,gguf,dat}, imatrix_llamacpp_moe.gguf
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.quant_model import SHAPE, T, tensor_digests, write_model  # noqa: E402

GOLDEN = ROOT / "tests" / "golden"
N_CTX = 32
FILE_TYPES = ["q4_k_m", "q3_k_s", "q2_k", "q5_0"]
MOE_SHAPE = {**SHAPE, "n_layer": 2, "n_expert": 8, "n_ff": 256}      # Mixtral's layout: per-expert entries
WORDS = ("the of and to in river stone light north market winter garden letter music bridge "
         "seven quiet paper window silver answer mountain").split()


def calibration_text() -> str:
    return " ".join(np.random.default_rng(11).choice(WORDS, 400))


def run(*cmd: str) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llama-bin", required=True, help="folder with llama-imatrix and llama-quantize")
    a = ap.parse_args(argv)
    text = calibration_text()
    golden = {"n_ctx": N_CTX, "text": text, "quantized": {}, "moe_shape": MOE_SHAPE}
    with tempfile.TemporaryDirectory() as tmp:
        model, text_path = os.path.join(tmp, "f16.gguf"), os.path.join(tmp, "calibration.txt")
        golden["model_digest"] = write_model(model, T.F16, edge_rows=False)
        moe = os.path.join(tmp, "moe-f16.gguf")
        golden["moe_digest"] = write_model(moe, T.F16, shape=MOE_SHAPE, edge_rows=False)
        Path(text_path).write_text(text)
        for label, src, fmt in (("", model, "gguf"), ("", model, "dat"), ("_moe", moe, "gguf")):
            out = GOLDEN / f"imatrix_llamacpp{label}.{fmt}"
            run(os.path.join(a.llama_bin, "llama-imatrix"), "-m", src, "-f", text_path, "-o", str(out),
                "-c", str(N_CTX), "--output-format", fmt, "-t", "2", "--no-ppl")
            if label == "" and fmt == "gguf":      # --process-output: the output matrix's entry as well
                po = os.path.join(tmp, "process-output.gguf")
                run(os.path.join(a.llama_bin, "llama-imatrix"), "-m", src, "-f", text_path, "-o", po,
                    "-c", str(N_CTX), "-t", "2", "--no-ppl", "--process-output")
                t = {t.name: t for t in gguf.GGUFReader(po).tensors}
                golden["process_output"] = {"in_sum2": np.asarray(t["output.weight.in_sum2"].data).tolist(),
                                            "counts": np.asarray(t["output.weight.counts"].data).tolist()}
            for ft in FILE_TYPES if not label else ["q4_k_m"]:
                q = os.path.join(tmp, f"{fmt}-{ft}.gguf")
                run(os.path.join(a.llama_bin, "llama-quantize"), "--imatrix", str(out), src, q, ft, "2")
                golden["quantized"][f"{label[1:] or fmt}/{ft}"] = tensor_digests(q)
    (GOLDEN / "imatrix_llamacpp.json").write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}/imatrix_llamacpp.{{json,gguf,dat}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
