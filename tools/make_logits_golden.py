"""Golden next-token logits from transformers (float32) for the catalog models: the reference that
tests/test_fidelity.py compares edgelm against.

transformers loads the same GGUF with `from_pretrained(dir, gguf_file=...)`, dequantizing every weight to
float32, and runs its own model code: an independent implementation of the same computation.

Regenerate (needs torch + transformers, e.g. the venv of ../shared/tools/setup-reference.sh):
    python tools/make_logits_golden.py            # writes tests/golden/logits_<model>.npz
Stored per model (compact): the token ids, and per position the reference top-K logits with their ids,
the log-sum-exp of the full row, and the row's std.
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

TOP_K = 64
N_TOKENS = 256

# A text written for this file (not taken from any corpus the models or tests otherwise use).
TEXT = """The lighthouse keeper kept two logbooks. In the first he wrote the weather: wind from the south-west at \
dawn, a thin rain by noon, the barometer falling slowly through the afternoon. In the second he wrote down the \
ships he saw, their flags and their hours, and sometimes a line about the birds that rested on the railing. \
When the inspector came in March, he read both books in one evening and asked why the second one was so much \
longer. The keeper said that the weather repeats itself, but ships never pass the same way twice. The inspector \
laughed, closed the books, and asked for a cup of tea. Later that spring a storm took the roof off the boat \
house, and for three weeks the keeper had nothing to write in either book, because no ship came and the wind \
did not change. He spent those days repairing nets, counting the lamp oil, and teaching himself to draw maps of \
the coast from memory. By June the maps were good enough that a fisherman asked to borrow one, and the keeper \
realised that he had started a third logbook without noticing. Numbers matter too: 1,250 litres of oil, 48 \
wicks, 7 panes of glass, and a clock that lost 3 minutes every day."""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "tests", "golden"))
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from edgelm.catalog import resolve
    from edgelm.gguf_file import GGUFFile
    from edgelm.tokenizer import tokenizer_from_metadata

    transformers.logging.set_verbosity_error()
    for name in a.models.split(","):
        path = str(resolve(name))
        # ids from edgelm's tokenizer (itself checked against llama.cpp's ids in tests/test_tokenizer.py)
        tok = tokenizer_from_metadata(GGUFFile(path).metadata)
        ids = tok.encode(TEXT, add_special=True)[:N_TOKENS]
        d, f = os.path.split(os.path.abspath(path))
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double().numpy()
        top = np.argsort(-logits, axis=-1)[:, :TOP_K]
        lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        out = os.path.join(a.out, f"logits_{name}.npz")
        np.savez_compressed(out, ids=np.array(ids, np.int32), top_ids=top.astype(np.int32),
                            top_logits=np.take_along_axis(logits, top, -1).astype(np.float32),
                            lse=lse, std=logits.std(-1), transformers=transformers.__version__)
        print(f"{name}: {len(ids)} tokens -> {out}")


if __name__ == "__main__":
    main()
