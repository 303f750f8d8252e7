"""Greedy continuations of one GGUF file in edgelm, llama.cpp and transformers (float32), token by token.

Issue 13's interop check asks that a file edgelm writes gives the same greedy tokens in llama.cpp as in edgelm.
Two runtimes that compute the same function can still part ways where the top two logits are nearly tied,
so this script also runs the float32 reference (transformers, on the weights as gguf-py dequantizes them) and,
wherever a runtime leaves the reference's path, prints how close that step was: the reference's logit gap
between its own token and the runtime's, and the runtime's own logit error there against the reference.

Every backend gets the same prompt ids (llama.cpp's tokenizer, BOS first); the continuation is greedy from there.

    ~/.cache/edgelm-reference/venv/bin/python tools/greedy_interop.py FILE.gguf [FILE.gguf ...] [-n 32]
        [--prompts prompts.txt]   (one prompt per line; the default is 8 built-in prompts)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PROMPTS = [
    "The history of the city begins",
    "Once upon a time, in a small village,",
    "The main difference between a list and a tuple in Python is",
    "Water boils at",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, the first humans",
    "A good way to learn a new language is",
]


def llamacpp_greedy(path: str, prompts: list[list[int]], n: int) -> list[tuple[list[int], np.ndarray]]:
    """(tokens, logits at each generated step) per prompt."""
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        toks, logits = [], []
        for _ in range(n):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            t = int(np.argmax(row))
            toks.append(t)
            logits.append(row)
            llm.eval([t])
        out.append((toks, np.stack(logits)))
    llm.close()
    return out


def edgelm_greedy(path: str, prompts: list[list[int]], n: int) -> list[tuple[list[int], np.ndarray]]:
    import edgelm
    m = edgelm.load(path, n_ctx=256)
    out = []
    for ids in prompts:
        s = m.create_session()
        row = m.prefill(list(ids), session=s)
        toks, logits = [], []
        for _ in range(n):
            t = int(np.argmax(row))
            toks.append(t)
            logits.append(np.asarray(row, dtype=np.float32))
            row = m.decode_one(t, session=s)
        out.append((toks, np.stack(logits)))
    return out


class Reference:
    """transformers in float32 on the file's dequantized weights: greedy paths and teacher-forced logits."""

    def __init__(self, path: str):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
        transformers.logging.set_verbosity_error()
        self.torch = torch
        d, f = os.path.split(os.path.abspath(path))
        self.model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            return self.model(self.torch.tensor([ids])).logits[0].numpy().astype(np.float32)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        seq = list(ids)
        for _ in range(n):
            seq.append(int(np.argmax(self.logits(seq)[-1])))
        return seq[len(ids):]


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None


def check(path: str, prompts: list[str], n: int) -> dict:
    from llama_cpp import Llama
    vocab = Llama(model_path=path, n_ctx=64, vocab_only=True, verbose=False)
    ids = [vocab.tokenize(p.encode(), add_bos=True, special=False) for p in prompts]
    vocab.close()
    runs = {"llama.cpp": llamacpp_greedy(path, ids, n), "edgelm": edgelm_greedy(path, ids, n)}
    ref = Reference(path)
    name = os.path.basename(path)
    same_runtimes, same_ref = 0, {k: 0 for k in runs}
    departures = {k: [] for k in runs}
    for p, (prompt, pid) in enumerate(zip(prompts, ids)):
        ref_toks = ref.greedy(pid, n)
        # teacher-forced reference logits along the reference path: each runtime's step error is measured there
        ref_logits = ref.logits(pid + ref_toks)[len(pid) - 1:-1]
        ours, theirs = runs["edgelm"][p][0], runs["llama.cpp"][p][0]
        same_runtimes += ours == theirs
        line = [f"{name} prompt {p}: edgelm {'=' if ours == theirs else '≠'} llama.cpp"]
        for who, per_prompt in runs.items():
            toks, logits = per_prompt[p]
            i = first_difference(toks, ref_toks)
            if i is None:
                same_ref[who] += 1
                line.append(f"{who} = reference")
                continue
            r = ref_logits[i]
            gap = r[ref_toks[i]] - r[toks[i]]            # how far the runtime's pick was behind, in the reference
            d = logits[i] - r                            # the runtime's own logit error at that step
            rms = float(np.sqrt(np.mean((d - d.mean()) ** 2)))   # a constant shift changes no probability
            departures[who].append((gap, rms))
            line.append(f"{who} leaves the reference at token {i} (reference gap {gap:.4f}; its logit error "
                        f"there: rms {rms:.4f}, max {np.abs(d - d.mean()).max():.4f}; logit std {r.std():.2f})")
        print("; ".join(line), flush=True)
    return {"file": name, "prompts": len(prompts), "edgelm_eq_llamacpp": same_runtimes,
            **{f"{k}_eq_reference": v for k, v in same_ref.items()},
            **{f"{k}_departures": v for k, v in departures.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--prompts", help="a text file, one prompt per line")
    a = ap.parse_args(argv)
    prompts = PROMPTS
    if a.prompts:
        prompts = [line.rstrip("\n") for line in open(a.prompts, encoding="utf-8") if line.strip()]
    rows = [check(f, prompts, a.n) for f in a.files]
    print(f"| file | prompts | greedy {a.n}: edgelm = llama.cpp | edgelm = float32 reference | "
          f"llama.cpp = float32 reference | where llama.cpp departs: reference gap, max / its logit rms error, median |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for r in rows:
        dep = np.array(r["llama.cpp_departures"]).reshape(-1, 2)
        where = "-" if not len(dep) else f"{dep[:, 0].max():.3f} / {np.median(dep[:, 1]):.3f}"
        print(f"| {r['file']} | {r['prompts']} | {r['edgelm_eq_llamacpp']} | {r['edgelm_eq_reference']} | "
              f"{r['llama.cpp_eq_reference']} | {where} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
