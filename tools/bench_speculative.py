"""Issue 14's benchmark: speculative decoding and batched generation against plain decoding, in one run on one
machine (numbers for docs/benchmarks.md; run it when nothing else is running).

    python tools/bench_speculative.py [--models smollm2-135m,gemma3-270m] [--threads 2] [--rounds 2] [-n 128]

1. Exactness: 20 prompts per model at temperature 0.  Plain decoding (each prompt in a fresh session) against
   prompt lookup, a draft model (the model itself with draft_p_min 0, so that every step is verified in a
   batch: a check of the verification path, not a speed-up) and all 20 prompts as one batch (n_parallel 8):
   how many of the 20 outputs are plain decoding's, token for token.
2. Prompt lookup on input-grounded tasks: rewrite and copy-edit a ~1,000-token text (through the chat template
   where the model has one), continue a code file; tokens/s of plain decoding and of lookup (ngram 3,
   draft_max 4 and 8, the proposal length adapted to the acceptance), the proposals' acceptance.  Best of
   --rounds runs each.
3. Batched generation: 8 prompts x n tokens, one generate() each against one batch of 8: total tokens/s.

Models are catalog names or GGUF paths (fetched with edgelm's catalog when missing).
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import edgelm  # noqa: E402
from edgelm import catalog  # noqa: E402
from edgelm.model import set_threads  # noqa: E402

ROOT = os.path.join(os.path.dirname(__file__), "..")
STORY = ("The river runs north past the old market, under the stone bridge, and out to the winter garden. "
         "In the garden a letter waits on the bench beside the music stand.")
PROMPTS = [
    f"Repeat this sentence exactly.\n{STORY}\nRepeated: The river runs",
    f"{STORY}\nSummary of the text above: The river",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "one two three four five one two three four five one two",
    "Write a short story about a cat.",
    "The capital of France is",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "Q: What colour is the sky on a clear day?\nA:",
    "List five fruits:\n1.",
    "import numpy as np\n\n\ndef softmax(x):\n",
    "The three laws of thermodynamics are",
    "Dear Sir or Madam,\n\nI am writing to",
    "Translate into French: The cat sleeps on the warm windowsill.\nFrench:",
    "1, 1, 2, 3, 5, 8, 13,",
    "<html>\n<head>\n<title>My page</title>\n</head>\n<body>\n",
    "The best way to learn a new language is",
    "Recipe for pancakes:\nIngredients:\n-",
    "In 1969, the first humans",
    "SELECT name, age FROM users WHERE",
    "A haiku about autumn leaves:\n",
]


def fresh(m, prompt, **kw):
    return m.generate(prompt, session=m.create_session(), **kw)


def timed(m, prompt, rounds, **kw):
    """(output, best tokens/s over `rounds` runs, stats of that run)."""
    best = None
    for _ in range(rounds):
        out = fresh(m, prompt, **kw)
        s = m.last_stats
        if best is None or s.generate_tps > best[1]:
            best = (out, s.generate_tps, s)
    return best


def exactness(m, draft, n):
    plain = [fresh(m, p, max_tokens=n, temperature=0) for p in PROMPTS]
    look = [fresh(m, p, max_tokens=n, temperature=0, lookup_ngram=3, draft_max=6) for p in PROMPTS]
    drafted = [fresh(m, p, max_tokens=n, temperature=0, draft_model=draft, draft_max=4, draft_p_min=0.0)
               for p in PROMPTS]
    batch = m.generate(PROMPTS, max_tokens=n, temperature=0, n_parallel=8)
    same = lambda xs: sum(a == b for a, b in zip(plain, xs))  # noqa: E731
    tokens = sum(len(m.tokenize(t, add_special=False)) for t in plain)
    return same(look), same(drafted), same(batch), tokens


def grounded_prompts(m):
    text = open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8").read()
    words = text.split()
    lo, hi = 0, len(words)
    while lo < hi:                                  # the longest prefix of whole words within ~1,000 tokens
        mid = (lo + hi + 1) // 2
        if len(m.tokenize(" ".join(words[:mid]), add_special=False)) <= 1000:
            lo = mid
        else:
            hi = mid - 1
    passage = " ".join(words[:lo])

    def task(ask: str, answer: str) -> list[int]:
        if m.gguf.metadata.get("tokenizer.chat_template") is not None:
            from edgelm.chat import render_ids
            from edgelm.chat_template import template_for
            return render_ids(m, template_for(m.gguf.metadata, m.tokenizer), [{"role": "user", "content": ask}])
        return m.tokenize(ask + f"\n\n{answer}:\n")
    code = open(os.path.join(ROOT, "edgelm", "runtime", "kv_cache.py"), encoding="utf-8").read()
    cut = code.index("class LayerCache")
    return {"rewrite": task("Rewrite the following text in plain words, keeping every point:\n\n" + passage,
                            "Rewritten"),
            "copy-edit": task("Correct the spelling and grammar of the following text and return it in full:\n\n"
                              + passage, "Corrected text"),
            "code": m.tokenize(code[:cut + 2500])}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-n", type=int, default=128, help="tokens per output (default 128)")
    ap.add_argument("--skip-exactness", action="store_true")
    args = ap.parse_args()
    set_threads(args.threads)
    print(f"CPU: {platform.processor() or platform.machine()}, {args.threads} threads, edgelm {edgelm.__version__}\n")
    for name in args.models.split(","):
        path = str(catalog.resolve(name))
        m = edgelm.load(path, n_ctx=4096)
        label = os.path.basename(path)
        print(f"## {label}\n")
        if not args.skip_exactness:
            draft = edgelm.load(path, n_ctx=4096)
            t0 = time.perf_counter()
            look, drafted, batch, tokens = exactness(m, draft, min(args.n, 64))
            print(f"exactness over {len(PROMPTS)} prompts ({tokens} greedy tokens, {time.perf_counter() - t0:.0f} s): "
                  f"lookup {look}/{len(PROMPTS)}, draft model {drafted}/{len(PROMPTS)}, "
                  f"batch {batch}/{len(PROMPTS)} identical to plain decoding\n")
            del draft
        print("| task | plain t/s | lookup K=4 t/s (accepted / proposed) | lookup K=8 t/s (accepted / proposed) "
              "| K=4 / plain | K=8 / plain | same output |")
        print("|---|---|---|---|---|---|---|")
        for task, ids in grounded_prompts(m).items():
            plain, tps0, _ = timed(m, ids, args.rounds, max_tokens=args.n, temperature=0)
            cells, same = [], True
            for k in (4, 8):
                out, tps, s = timed(m, ids, args.rounds, max_tokens=args.n, temperature=0, lookup_ngram=3, draft_max=k)
                same &= out == plain
                cells.append((tps, s))
            print(f"| {task} ({len(ids)}-token prompt) | {tps0:.1f} | " +
                  " | ".join(f"{t:.1f} ({s.draft_accepted} / {s.draft_tokens})" for t, s in cells) +
                  f" | {cells[0][0] / tps0:.2f}x | {cells[1][0] / tps0:.2f}x | {'yes' if same else 'NO'} |")
        batch_prompts = PROMPTS[4:12]
        best_seq = best_batch = 0.0
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            seq = [fresh(m, p, max_tokens=args.n, temperature=0, stop=["zzzz"]) for p in batch_prompts]
            t_seq = time.perf_counter() - t0
            n_seq = sum(len(m.tokenize(t, add_special=False)) for t in seq)
            t0 = time.perf_counter()
            out = m.generate(batch_prompts, max_tokens=args.n, temperature=0, n_parallel=8, stop=["zzzz"])
            t_batch = time.perf_counter() - t0
            n_batch = m.last_stats.generated_tokens
            best_seq, best_batch = max(best_seq, n_seq / t_seq), max(best_batch, n_batch / t_batch)
        print(f"\nbatched generation, 8 prompts x {args.n} tokens (wall time, prompts included): sequential "
              f"{best_seq:.1f} t/s, one batch of 8 {best_batch:.1f} t/s = {best_batch / best_seq:.2f}x; "
              f"outputs identical: {out == seq}\n")
        del m


if __name__ == "__main__":
    main()
