"""Teacher-forced fidelity of edgelm's DECODE path (one token per step: the matvec kernels) against
transformers' float32 logits, using ../shared/tools/fidelity.py for the reference and the metrics.

    ~/.cache/edgelm-reference/venv/bin/python tools/decode_fidelity.py MODEL.gguf TEXT [--n 256]
    EDGELM_MATVEC_PASSES=1 ... tools/decode_fidelity.py ...      # the single-pass integer dot

fidelity.py's own edgelm backend evaluates the text in one prompt batch (the matmul kernels); this feeds
the same ids one at a time through Session.decode, as generation does. Set FIDELITY_CACHE to a directory
to keep the transformers logits between runs.
"""
import argparse
import json
import os
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("text")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--fidelity-py", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                          "tools", "fidelity.py"))
    a = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(a.fidelity_py)))
    import fidelity  # noqa: E402  (the shared reference tool)
    import edgelm
    from edgelm.quant import kernels

    ids = fidelity.llamacpp_tokens(a.model, open(a.text, encoding="utf-8").read(), a.n)
    cache_dir = os.environ.get("FIDELITY_CACHE")
    import hashlib
    key = hashlib.sha1((os.path.basename(a.model) + repr(ids)).encode()).hexdigest()[:16]
    cp = cache_dir and os.path.join(cache_dir, f"hf-{key}.npy")
    if cp and os.path.exists(cp):
        ref = np.load(cp)
    else:
        ref = fidelity.hf_logits(a.model, ids)
        if cp:
            os.makedirs(cache_dir, exist_ok=True)
            np.save(cp, ref)
    s = edgelm.load(a.model).create_session()
    out = np.empty_like(ref)
    out[0] = s.prefill(ids[:1])
    for i, t in enumerate(ids[1:], 1):
        out[i] = s.decode(t)
    res = {"model": os.path.basename(a.model), "n_tokens": len(ids), "matvec_passes": kernels._PASSES[0],
           "edgelm_decode": fidelity.compare(ref, out, ids), "ppl_ref": round(fidelity.ppl(ref, ids), 4),
           "ppl_edgelm": round(fidelity.ppl(out, ids), 4)}
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
