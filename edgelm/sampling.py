"""Token sampling with llama.cpp's parameter names, defaults and order.

Defaults: llama.cpp common/common.h (common_params_sampling): temp 0.80, top_k 40, top_p 0.95, min_p 0.05,
penalty_repeat 1.00 over the last 64 tokens. Order: llama.cpp's default sampler chain
(penalties -> top_k -> top_p -> min_p -> temperature -> dist); temp <= 0 means greedy.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None          # None or -1: a fresh random seed

    def with_(self, **kw) -> "SamplingParams":
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in kw.items() if k in known and v is not None})


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        seed = params.seed if params.seed is not None and params.seed >= 0 else None
        self.rng = np.random.default_rng(seed)

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        p = self.p
        logits = logits.astype(np.float32, copy=True)
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and history:
            recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
            ids = np.unique(np.asarray(recent, dtype=np.int64))
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        if p.temperature <= 0:
            return int(np.argmax(logits))
        cand = np.arange(logits.shape[0])
        vals = logits
        if 0 < p.top_k < len(vals):
            keep = np.argpartition(-vals, p.top_k - 1)[:p.top_k]
            cand, vals = cand[keep], vals[keep]
        order = np.argsort(-vals, kind="stable")
        cand, vals = cand[order], vals[order]
        if p.top_p < 1.0:
            probs = _softmax(vals)
            cum = np.cumsum(probs)
            n = int(np.searchsorted(cum, p.top_p) + 1)   # smallest prefix reaching top_p, at least one
            cand, vals = cand[:n], vals[:n]
        if p.min_p > 0.0:
            keep = vals >= vals[0] + np.log(p.min_p)      # p_i >= min_p * p_max, on logits
            cand, vals = cand[keep], vals[keep]
        probs = _softmax(vals / np.float32(p.temperature))
        return int(cand[self.rng.choice(len(cand), p=probs)])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp((x - x.max()).astype(np.float64))
    return e / e.sum()
