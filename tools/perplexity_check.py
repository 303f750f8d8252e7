"""`edgelm perplexity` next to the same method on llama.cpp's logits (issue 13's check: within 0.5 %).

llama.cpp side (llama-cpp-python, no edgelm code): tokenize the text with BOS as the model asks, cut it into
chunks of n_ctx, put BOS first in each chunk, evaluate each from an empty cache with all logits, score the
positions n_ctx/2 .. n_ctx-2 against the next token, PPL = exp(mean NLL) (llama.cpp tools/perplexity/
perplexity.cpp, perplexity()). edgelm side: `edgelm perplexity -o json` in its own process. With --kld it
also saves llama.cpp's log-probabilities as a base file and runs `edgelm perplexity --kl-divergence` on it:
KL(llama.cpp || edgelm) and top-1 agreement per scored token. With --hf, transformers' float32 forward pass
over the same GGUF (the exact reference for edgelm's outputs) scores the same chunks too.

Run with a Python that has llama-cpp-python (the reference venv of ../shared/tools/setup-reference.sh):
    ~/.cache/edgelm-reference/venv/bin/python tools/perplexity_check.py MODEL.gguf TEXT [-c 512] [--chunks 8]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def llamacpp_perplexity(model: str, text: str, n_ctx: int, chunks: int, threads: int, save=None):
    from llama_cpp import Llama
    llm = Llama(model_path=model, n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                n_threads=threads, n_threads_batch=threads)
    add_bos = llm._model.add_bos_token() if hasattr(llm._model, "add_bos_token") else True
    tokens = llm.tokenize(text.encode(), add_bos=add_bos, special=False)
    n_chunk = min(len(tokens) // n_ctx, chunks) if chunks else len(tokens) // n_ctx
    first, nll, rows = n_ctx // 2, [], []
    for i in range(n_chunk):
        ids = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if add_bos:
            ids[0] = llm.token_bos()
        llm.reset()
        llm.eval(ids)
        logits = np.array(llm.scores[first:n_ctx - 1], np.float64)
        lp = logits - logits.max(-1, keepdims=True)
        lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        nll.extend(-lp[np.arange(len(targets)), targets])
        rows.append(logits.astype(np.float32))
    bos = llm.token_bos() if add_bos else None
    llm.close()
    if save is not None:
        sys.path.insert(0, str(ROOT))
        from edgelm.evaluate.logits_file import LogitsWriter
        with open(save, "wb") as f:
            w = LogitsWriter(f, n_ctx, rows[0].shape[1], n_chunk, np.asarray(tokens))
            for r in rows:
                w.chunk(r)
    return math.exp(float(np.mean(nll))), tokens, n_chunk, bos


def hf_perplexity(model: str, tokens, n_ctx: int, n_chunk: int, bos: int | None) -> float:
    """The same chunks and scoring on transformers' float32 logits (its GGUF loader dequantizes the weights)."""
    import torch
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(os.path.dirname(os.path.abspath(model)),
                                             gguf_file=os.path.basename(model), dtype=torch.float32)
    first, nll = n_ctx // 2, []
    for i in range(n_chunk):
        ids = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            ids[0] = bos
        with torch.no_grad():
            z = m(torch.tensor([ids])).logits[0, first:n_ctx - 1].double()
        lp = torch.log_softmax(z, -1).numpy()
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        nll.extend(-lp[np.arange(len(targets)), targets])
    return math.exp(float(np.mean(nll)))


def edgelm(*args) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    p = subprocess.run([sys.executable, "-m", "edgelm", "perplexity", *args, "-o", "json"],
                       capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise SystemExit(f"edgelm perplexity failed: {p.stderr.strip()[-800:]}")
    return json.loads(p.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=0)
    ap.add_argument("-t", "--threads", type=int, default=os.cpu_count())
    ap.add_argument("--kld", action="store_true", help="also KL(llama.cpp || edgelm) through a base file")
    ap.add_argument("--hf", action="store_true", help="also transformers' PPL on the same chunks")
    a = ap.parse_args(argv)
    text = Path(a.text).read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory() as tmp:
        base = os.path.join(tmp, "llamacpp.kld") if a.kld else None
        ref, tokens, n_chunk, bos = llamacpp_perplexity(a.model, text, a.ctx, a.chunks, a.threads, base)
        flags = ["-m", a.model, "-c", str(a.ctx), "-t", str(a.threads)] + (["--chunks", str(a.chunks)] if a.chunks else [])
        ours = edgelm(*flags, "-f", a.text)
        out = dict(model=os.path.basename(a.model), n_ctx=a.ctx, n_chunk=n_chunk, n_tokens_llamacpp=len(tokens),
                   n_tokens_edgelm=ours["n_tokens"], ppl_llamacpp=ref, ppl_edgelm=ours["ppl"],
                   rel_diff=ours["ppl"] / ref - 1)
        if a.hf:
            hf = hf_perplexity(a.model, tokens, a.ctx, n_chunk, bos)
            out.update(ppl_hf=hf, rel_diff_edgelm_hf=ours["ppl"] / hf - 1, rel_diff_llamacpp_hf=ref / hf - 1)
        if base:
            kl = edgelm(*flags, "--kl-divergence-base", base, "--kl-divergence")
            out.update(kld_mean=kl["kld_mean"], kld_max=kl["kld_percentiles"]["max"], same_top=kl["same_top"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
