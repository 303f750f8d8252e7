"""Token sampling with llama.cpp's parameter names, defaults and order, and the one set of rules that every
way in (CLI flags, `/set parameter` in the REPL, the Python API, a GGUF's recommended values) is checked by.

Defaults: llama.cpp common/common.h (common_params_sampling): temp 0.80, top_k 40, top_p 0.95, min_p 0.05,
penalty_repeat 1.00 over the last 64 tokens. Order: llama.cpp's default sampler chain
(penalties -> top_k -> top_p -> min_p -> temperature -> dist); temp <= 0 means greedy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Callable

import numpy as np

from ..errors import EdgeLMError

# -- the rules -----------------------------------------------------------------------------------------

# name -> (integer?, test, what the test asks for). Integers are refused as floats ("1e11", 2.5) so that a
# size never comes from a rounded number; floats must be finite (NaN and inf pass no comparison sensibly).
_RULES: dict[str, tuple[bool, Callable[[float], bool], str]] = {
    "temperature": (False, lambda v: v >= 0, "a finite number >= 0 (0 = greedy)"),
    "top_k": (True, lambda v: v >= 0, "an integer >= 0 (0 = off)"),
    "top_p": (False, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "min_p": (False, lambda v: 0 <= v <= 1, "a number from 0 to 1"),
    "repeat_penalty": (False, lambda v: v > 0, "a finite number > 0 (1 = off)"),
    "repeat_last_n": (True, lambda v: v >= -1, "an integer >= -1 (-1 = the whole context, 0 = off)"),
    "seed": (True, lambda v: -1 <= v < 2**64, "an integer from -1 (random) to 2^64-1"),
    "num_predict": (True, lambda v: v >= -1, "an integer >= -1 (-1 = no limit)"),
    "n_ctx": (True, lambda v: v >= 1, "an integer >= 1"),
    "threads": (True, lambda v: v >= 1, "an integer >= 1"),
    "n_parallel": (True, lambda v: v >= 1, "an integer >= 1"),
}
PARAMETER_NAMES = tuple(_RULES)


def check_value(name: str, value, label: str | None = None):
    """`value` for parameter `name`, as an int or float, or EdgeLMError (one line naming `label`, e.g. the
    flag, and the rule). bool is refused: True is not a temperature."""
    integer, ok, rule = _RULES[name]
    label = label or name
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise EdgeLMError(f"{label}: expected {rule}, got {value!r}")
    if integer:
        if isinstance(value, (float, np.floating)):
            if not (math.isfinite(value) and float(value).is_integer()):
                raise EdgeLMError(f"{label}: expected {rule}, got {value!r}")
        value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise EdgeLMError(f"{label}: expected {rule}, got {value}")
    if not ok(value):
        raise EdgeLMError(f"{label}: expected {rule}, got {value}")
    return value


def parse_value(name: str, text: str, label: str | None = None):
    """`text` (a flag or REPL argument) read as parameter `name` and checked by check_value."""
    integer, _, rule = _RULES[name]
    label = label or name
    s = text.strip()
    try:
        value = int(s) if integer else float(s)
    except ValueError:
        raise EdgeLMError(f"{label}: expected {rule}, got {text!r}") from None
    return check_value(name, value, label)


# -- the parameters --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None          # None or -1: a fresh random seed

    def __post_init__(self):
        # every way of making parameters (API keywords, with_, a saved session) passes here
        for f in fields(self):
            v = getattr(self, f.name)
            if not (f.name == "seed" and v is None):
                object.__setattr__(self, f.name, check_value(f.name, v))

    def with_(self, **kw) -> "SamplingParams":
        known = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in kw.items() if k in known and v is not None})


LLAMA_CPP_DEFAULTS = SamplingParams()

# Recommended sampling a GGUF may carry: llama.cpp gguf-py/gguf/constants.py (Keys.General.SAMPLING_*), read by
# common/common.cpp through llama_model_meta_key_str (src/llama-model.cpp). general.sampling.sequence (the
# sampler order) and the xtc/mirostat samplers have no counterpart here and are not read.
GGUF_SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repeat_penalty",
    "general.sampling.penalty_last_n": "repeat_last_n",
}
SOURCE_DEFAULT = "llama.cpp default"


def recommended_sampling(metadata: dict, catalog_name: str | None = None, catalog_values: dict | None = None,
                         warn: Callable[[str], None] | None = None) -> tuple[SamplingParams, dict[str, str]]:
    """The model's default sampling and where each value came from: a GGUF general.sampling.* key, else the
    catalog entry's recommendation, else llama.cpp's default. A key with a value the rules refuse is skipped
    (with `warn`): a recommendation is not worth refusing the model for."""
    values: dict = {}
    sources = {f.name: SOURCE_DEFAULT for f in fields(SamplingParams) if f.name != "seed"}
    for name, value in (catalog_values or {}).items():
        values[name] = check_value(name, value, f"catalog {catalog_name}: {name}")
        sources[name] = f"catalog {catalog_name}"
    for key, name in GGUF_SAMPLING_KEYS.items():
        if key not in metadata:
            continue
        try:
            values[name] = check_value(name, _scalar(metadata[key]), key)
        except EdgeLMError as e:
            if warn:
                warn(f"{e}; ignored")
            continue
        sources[name] = f"GGUF {key}"
    return LLAMA_CPP_DEFAULTS.with_(**values), sources


def _scalar(v):
    """A metadata value as a plain number. GGUF stores these as float32: 0.6 reads back as 0.6000000238, so a
    float that float32 holds exactly is shown by its shortest float32 spelling."""
    v = v.item() if isinstance(v, np.generic) else v
    if isinstance(v, float) and math.isfinite(v) and float(np.float32(v)) == v:
        return float(str(np.float32(v)))
    return v


# -- sampling --------------------------------------------------------------------------------------------

class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        seed = params.seed if params.seed is not None and params.seed >= 0 else None
        self.rng = np.random.default_rng(seed)

    @property
    def greedy(self) -> bool:
        return self.p.temperature <= 0

    def __call__(self, logits: np.ndarray, history: list[int], exclude: int | None = None) -> int:
        """The next token. exclude: sample as if that token's probability were 0 (speculative sampling's
        residual distribution after a rejected draft token: p with the draft's share taken out)."""
        if self.greedy:
            return int(np.argmax(self._penalised(logits, history)))
        cand, probs = self.distribution(logits, history)
        if exclude is not None:
            probs = np.where(cand == exclude, 0.0, probs)
            total = probs.sum()
            if total <= 0:                  # all mass was on the excluded token: it cannot be rejected
                return int(exclude)
            probs = probs / total
        return int(cand[self.rng.choice(len(cand), p=probs)])

    def accepts(self, logits: np.ndarray, history: list[int], token: int) -> bool:
        """Speculative sampling's test for a proposed token (a deterministic draft: q is one-hot): keep it
        with probability p(token); greedy: keep it when it is the argmax."""
        if self.greedy:
            return int(np.argmax(self._penalised(logits, history))) == token
        cand, probs = self.distribution(logits, history)
        p_tok = float(probs[cand == token].sum())
        return p_tok > 0 and self.rng.random() < p_tok

    def _penalised(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self.p
        logits = logits.astype(np.float32, copy=True)
        if p.repeat_penalty != 1.0 and p.repeat_last_n != 0 and history:
            recent = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
            ids = np.unique(np.asarray(recent, dtype=np.int64))
            vals = logits[ids]
            logits[ids] = np.where(vals > 0, vals / p.repeat_penalty, vals * p.repeat_penalty)
        return logits

    def distribution(self, logits: np.ndarray, history: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(candidate ids, their probabilities): what the chain leaves to draw from (temperature > 0)."""
        p = self.p
        logits = self._penalised(logits, history)
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
        return cand, _softmax(vals, p.temperature)


def _softmax(x: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    # shift first, then scale: a tiny temperature sends the others to exp(-inf) = 0, never inf - inf = NaN
    with np.errstate(over="ignore"):
        e = np.exp((x - x.max()).astype(np.float64) / temperature)
    return e / e.sum()
