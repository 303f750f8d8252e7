"""edgelm's logits on the real models against transformers' float32 logits on the same GGUF weights.

Golden files: tests/golden/logits_<model>.npz, made by tools/make_logits_golden.py (see its docstring).
They hold the reference top-64 logits per position and each row's log-sum-exp, so the KL divergence is
computed over those 64 tokens plus one bucket for the rest of the vocabulary (a lower bound on the full KL,
tight here: the top 64 carry almost all the probability mass).
"""
from __future__ import annotations

import os

import numpy as np
import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


def fidelity(golden: dict, logits: np.ndarray) -> dict:
    ref_top, ref_ids, ref_lse = golden["top_logits"].astype(np.float64), golden["top_ids"], golden["lse"]
    lg = logits.astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    p_ref = np.exp(ref_top - ref_lse[:, None])                          # (T, 64)
    logp_ours = np.take_along_axis(lg, ref_ids.astype(np.int64), -1) - lse[:, None]
    kl_top = (p_ref * (ref_top - ref_lse[:, None] - logp_ours)).sum(-1)
    tail_ref = np.clip(1 - p_ref.sum(-1), 1e-12, 1)
    tail_ours = np.clip(1 - np.exp(logp_ours).sum(-1), 1e-12, 1)
    kl = kl_top + tail_ref * np.log(tail_ref / tail_ours)
    rel = np.abs(np.take_along_axis(lg, ref_ids.astype(np.int64), -1) - ref_top) / golden["std"][:, None]
    return dict(top1=float((lg.argmax(-1) == ref_ids[:, 0]).mean()), mean_kl=float(kl.mean()),
                max_kl=float(kl.max()), max_rel_diff=float(rel.max()))


@pytest.mark.parametrize("model_fixture,name", [("smollm2", "smollm2-135m"), ("gemma", "gemma3-270m")])
def test_teacher_forced_logits_track_transformers(request, model_fixture, name):
    golden = dict(np.load(os.path.join(GOLDEN, f"logits_{name}.npz")))
    model = request.getfixturevalue(model_fixture)
    ids = [int(i) for i in golden["ids"]]
    f = fidelity(golden, model.eval_logits(ids))
    print(name, f)
    # The bar is top-1 >= 0.95 and mean KL <= 0.01 (llama.cpp: 0.96-0.98 and 0.003-0.006).
    # Float32 activations put us far inside it; these bounds catch any real regression.
    assert f["top1"] >= 0.98, f
    assert f["mean_kl"] <= 1e-3, f
    assert f["max_rel_diff"] <= 0.05, f
