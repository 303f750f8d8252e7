"""Quantization quality, edgelm's quantizer next to llama.cpp's: KL divergence from the F16 model (issue 13).

For a GGUF model: write its F16 version (`edgelm quantize ... f16`: the weights as they dequantize), save the
F16 model's log-probabilities on a text (`edgelm perplexity --kl-divergence-base`), quantize the F16 file to
each file type with edgelm and with llama.cpp (llama-cpp-python's llama_model_quantize), and measure every
result against the F16 base with `edgelm perplexity --kl-divergence` (the same evaluator for both).
With --imatrix the text is split in halves: the second half is calibration text for `edgelm imatrix` on the
F16 model, the first half is scored, and each file type is also quantized by edgelm with that imatrix
(llama-cpp-python cannot pass an imatrix to llama.cpp's quantizer). Each file edgelm writes is also run in
llama.cpp: its greedy 32-token continuation of PROMPT there and in edgelm (the interop check of issue 13).

    ~/.cache/edgelm-reference/venv/bin/python tools/kquant_quality.py MODEL.gguf TEXT [--ftypes q4_k_m,q3_k_m]
        [-c 512] [--chunks 10] [--imatrix]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_kquant_golden import llamacpp_quantize  # noqa: E402


def edgelm(*args) -> str:
    p = subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    if p.returncode:
        raise SystemExit(f"edgelm {' '.join(args)}: {p.stderr.strip()[-800:]}")
    return p.stdout


PROMPT = "The history of the city begins"


def greedy_pair(path: str) -> tuple[str, str]:
    """32 greedy tokens after PROMPT: (llama.cpp's text, edgelm's text)."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=256, verbose=False)
    theirs = llm.create_completion(PROMPT, max_tokens=32, temperature=0.0, repeat_penalty=1.0)["choices"][0]["text"]
    llm.close()
    ours = edgelm("generate", "-m", path, "-n", "32", "--temp", "0", "--repeat-penalty", "1", PROMPT)
    return theirs, ours.rstrip("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--ftypes", default="q4_k_m,q3_k_m")
    ap.add_argument("-c", "--ctx", default="512")
    ap.add_argument("--chunks", default="10")
    ap.add_argument("--imatrix", action="store_true", help="also edgelm with an importance matrix")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        f16, base = os.path.join(tmp, "f16.gguf"), os.path.join(tmp, "base.kld")
        edgelm("quantize", a.model, f16, "f16")
        text = a.text
        quantizers = ["llama.cpp", "edgelm"]
        if a.imatrix:
            whole = open(a.text, encoding="utf-8").read()
            text, calib = os.path.join(tmp, "eval.txt"), os.path.join(tmp, "calibration.txt")
            open(text, "w", encoding="utf-8").write(whole[:len(whole) // 2])
            open(calib, "w", encoding="utf-8").write(whole[len(whole) // 2:])
            imat = os.path.join(tmp, "imatrix.gguf")
            edgelm("imatrix", "-m", f16, "-f", calib, "-o", imat, "-c", a.ctx)
            quantizers.append("edgelm + imatrix")
        edgelm("perplexity", "-m", f16, "-f", text, "-c", a.ctx, "--chunks", a.chunks, "--kl-divergence-base", base)
        for ft in a.ftypes.split(","):
            for who in quantizers:
                out = os.path.join(tmp, f"{ft}-{who.replace(' ', '')}.gguf")
                if who == "edgelm":
                    edgelm("quantize", f16, out, ft)
                elif who == "edgelm + imatrix":
                    edgelm("quantize", f16, out, ft, "--imatrix", imat)
                else:
                    llamacpp_quantize(f16, out, ft)
                s = json.loads(edgelm("perplexity", "-m", out, "--kl-divergence-base", base, "--kl-divergence",
                                      "-o", "json"))
                same = None
                if who.startswith("edgelm"):
                    theirs, ours = greedy_pair(out)
                    same = theirs == ours
                s["greedy_same"] = same
                rows.append((ft, who, os.path.getsize(out), s))
                print(f"{ft:7s} {who:16s} mean KL {s['kld_mean']:.6f} ± {s['kld_error']:.6f}  same top "
                      f"{100 * s['same_top']:.2f} %  PPL {s['ppl']:.4f} (F16 {s['ppl_base']:.4f})", flush=True)
                os.remove(out)
    print("| file type | quantizer | MiB | mean KL vs F16 | same top p | PPL (F16) | greedy 32 in llama.cpp = edgelm |")
    print("| --- | --- | ---: | ---: | ---: | ---: | --- |")
    for ft, who, size, s in rows:
        print(f"| {ft.upper()} | {who} | {size / 2**20:.1f} | {s['kld_mean']:.6f} ± {s['kld_error']:.6f} | "
              f"{100 * s['same_top']:.2f} % | {s['ppl']:.4f} ({s['ppl_base']:.4f}) | "
              f"{'-' if s['greedy_same'] is None else 'yes' if s['greedy_same'] else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
