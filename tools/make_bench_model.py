"""The 1B-class benchmark model of issue 11: llama architecture, d=2048, 16 layers, 32 heads / 8 KV heads,
ff 8192, vocabulary 49152, random weights, quantized by llama.cpp's own quantizer (Q4_K_M by default).

    ~/.cache/edgelm-reference/venv/bin/python tools/make_bench_model.py            # -> models dir
    ... tools/make_bench_model.py --ftype Q4_0 --out /tmp/bench-1b-q4_0.gguf

Needs llama-cpp-python (the reference venv of shared/tools/setup-reference.sh) for `llama_model_quantize`,
and the SmolLM2 GGUF (`edgelm pull smollm2-135m`), whose BPE tokenizer it borrows (same vocabulary size).
Never commit the output: it is ~700 MB and remade in about a minute. Weights are N(0, 0.02) float16 (norms
1.0), written by gguf-py first; a fixed seed makes the file the same on every run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPE = dict(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=8192, n_ctx=4096)
# llama.cpp's ftype numbers (include/llama.h enum llama_ftype)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18,
          "IQ4_NL": 25, "IQ4_XS": 30, "TQ1_0": 36, "TQ2_0": 37}


def _tokenizer_fields(path: str) -> list[tuple[str, object, int | None, int | None]]:
    from edgelm.gguf_file import GGUFFile
    g = GGUFFile(path)
    out = []
    for key, value in g.metadata.items():
        if key.startswith("tokenizer."):
            vtype, sub = g.value_types[key]
            out.append((key, value, vtype, sub))
    return out


def write_f16(path: str, tokenizer_gguf: str, seed: int = 0) -> None:
    import gguf
    s = SHAPE
    d, hd = s["n_embd"], s["n_embd"] // s["n_head"]
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("edgelm bench 1B (random weights)")
    w.add_context_length(s["n_ctx"])
    w.add_embedding_length(d)
    w.add_block_count(s["n_layer"])
    w.add_feed_forward_length(s["n_ff"])
    w.add_head_count(s["n_head"])
    w.add_head_count_kv(s["n_head_kv"])
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(1)                                   # MOSTLY_F16
    vocab = None
    for key, value, vtype, sub in _tokenizer_fields(tokenizer_gguf):
        vt = gguf.GGUFValueType(vtype)
        if vt == gguf.GGUFValueType.ARRAY:
            value = list(value) if not isinstance(value, np.ndarray) else value.tolist()
            w.add_key_value(key, value, vt, sub_type=gguf.GGUFValueType(sub))
            if key == "tokenizer.ggml.tokens":
                vocab = len(value)
        else:
            w.add_key_value(key, value, vt)
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    ones = np.ones(d, np.float32)
    w.add_tensor("token_embd.weight", mat(vocab, d))
    w.add_tensor("output_norm.weight", ones)
    w.add_tensor("output.weight", mat(vocab, d))
    kv = s["n_head_kv"] * hd
    for il in range(s["n_layer"]):
        p = f"blk.{il}."
        w.add_tensor(p + "attn_norm.weight", ones)
        w.add_tensor(p + "attn_q.weight", mat(d, d))
        w.add_tensor(p + "attn_k.weight", mat(kv, d))
        w.add_tensor(p + "attn_v.weight", mat(kv, d))
        w.add_tensor(p + "attn_output.weight", mat(d, d))
        w.add_tensor(p + "ffn_norm.weight", ones)
        w.add_tensor(p + "ffn_gate.weight", mat(s["n_ff"], d))
        w.add_tensor(p + "ffn_up.weight", mat(s["n_ff"], d))
        w.add_tensor(p + "ffn_down.weight", mat(d, s["n_ff"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantize(src: str, dst: str, ftype: str, threads: int) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[ftype]
    params.nthread = threads
    tmp = dst + ".partial"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed with {rc}")
    os.replace(tmp, dst)


def main(argv=None) -> int:
    from edgelm import catalog
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ftype", default="Q4_K_M", choices=sorted(FTYPES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args(argv)
    out = a.out or os.path.join(catalog.models_dir(), f"bench-1b-{a.ftype}.gguf")
    tok = str(catalog.resolve("smollm2-135m"))
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out))) as tmp:
        f16 = os.path.join(tmp, "bench-1b-f16.gguf")
        write_f16(f16, tok)
        quantize(f16, out, a.ftype, a.threads)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
