"""Perplexity of a model on a text, and its KL divergence from a base model, by llama-perplexity's method
(llama.cpp tools/perplexity/perplexity.cpp, perplexity() and kl_divergence()), so the figures compare with
llama.cpp's:

- the text is tokenized once (with BOS where the model adds one) and cut into chunks of n_ctx tokens; the
  remainder is dropped, and at least two chunks are needed;
- each chunk is evaluated from an empty cache, its first token replaced by BOS where the model adds one;
- only the second half is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict the tokens after them
  (n_ctx - 1 - n_ctx/2 per chunk), so every scored token has at least n_ctx/2 tokens of context;
- PPL = exp(mean NLL), its uncertainty ppl * sqrt(var(NLL) / (count - 1)).

The log-softmax is taken in float64 (llama.cpp: float32 terms summed in double).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import EdgeLMError
from .logits_file import LOG_PROB_FLOOR, BaseLogits, LogitsWriter

_ROWS = 32      # log-softmax rows at a time (float64 rows of a 262k vocabulary are 2 MiB each)


def n_chunks(n_tokens: int, n_ctx: int, limit: int | None = None, source: str = "the text", need: int = 2) -> int:
    """How many chunks of n_ctx tokens to use: all whole ones (at most `limit`); at least `need` must fit
    (llama-perplexity: two; llama-imatrix: one)."""
    if n_ctx < 4:
        raise EdgeLMError(f"a context of {n_ctx} tokens is too small (at least 4)")
    if n_tokens < need * n_ctx:
        raise EdgeLMError(f"{source} tokenizes to {n_tokens} tokens; a context of {n_ctx} needs at least "
                          f"{need * n_ctx} ({need} chunk{'s' if need > 1 else ''}): give more text or a smaller -c")
    n = n_tokens // n_ctx
    return n if limit is None or limit <= 0 else min(n, limit)


def chunk_ids(model, tokens, i: int, n_ctx: int) -> np.ndarray:
    """Chunk i of `tokens` as evaluated: BOS in place of its first token where the model adds one."""
    ids = np.array(tokens[i * n_ctx:(i + 1) * n_ctx], np.int64)
    tok = model.tokenizer
    if tok.add_bos and tok.bos_id is not None:
        ids[0] = tok.bos_id
    return ids


def chunk_logits(model, tokens: np.ndarray, i: int, n_ctx: int) -> np.ndarray:
    """Chunk i evaluated from an empty cache: the logits of the scored positions n_ctx/2 .. n_ctx-2,
    (n_ctx - 1 - n_ctx/2, n_vocab) float32."""
    return model.eval_logits(chunk_ids(model, tokens, i, n_ctx), first=n_ctx // 2)[:-1]


def log_softmax_blocks(logits: np.ndarray):
    """(start, float64 log-softmax of rows start .. start + _ROWS) over the rows of `logits`."""
    for s in range(0, len(logits), _ROWS):
        x = logits[s:s + _ROWS].astype(np.float64)
        x -= x.max(-1, keepdims=True)
        x -= np.log(np.exp(x).sum(-1, keepdims=True))
        yield s, x


def _mean_and_error(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error from a sum and a sum of squares (llama.cpp's mean_and_uncertainty)."""
    if count < 1:
        return 0.0, 0.0
    mean = total / count
    var = total2 / count - mean * mean
    return mean, (math.sqrt(var / (count - 1)) if var > 0 and count > 10 else 0.0)


@dataclass
class PerplexityResult:
    n_ctx: int
    n_chunk: int
    count: int = 0
    nll: float = 0.0
    nll2: float = 0.0
    running: list[float] = field(default_factory=list)     # PPL after each chunk

    def add(self, nll: np.ndarray) -> None:
        self.count += nll.size
        self.nll += float(nll.sum())
        self.nll2 += float((nll * nll).sum())
        self.running.append(math.exp(self.nll / self.count))

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    @property
    def ppl_error(self) -> float:
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        return self.ppl * math.sqrt(var / (self.count - 1)) if var > 0 and self.count > 1 else 0.0

    def as_dict(self) -> dict:
        return dict(n_ctx=self.n_ctx, n_chunk=self.n_chunk, n_scored=self.count, ppl=self.ppl,
                    ppl_error=self.ppl_error, chunks=self.running)


def perplexity(model, tokens, n_ctx: int, n_chunk: int, writer: LogitsWriter | None = None,
               on_chunk: Callable[[int, PerplexityResult], None] | None = None) -> PerplexityResult:
    """PPL over the first n_chunk chunks of `tokens`; `writer` also saves each chunk's log-probabilities (the
    base file of a later --kl-divergence run)."""
    tokens = np.asarray(tokens)
    first = n_ctx // 2
    result = PerplexityResult(n_ctx, n_chunk)
    for i in range(n_chunk):
        logits = chunk_logits(model, tokens, i, n_ctx)
        targets = tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        nll = np.empty(len(targets))
        for s, lp in log_softmax_blocks(logits):
            nll[s:s + len(lp)] = -lp[np.arange(len(lp)), targets[s:s + len(lp)]]
        if writer is not None:
            writer.chunk(logits)
        result.add(nll)
        if on_chunk is not None:
            on_chunk(i, result)
    return result


@dataclass
class KLResult:
    """llama.cpp's kl_divergence_result, plus every token's KL and Δp for the percentiles."""
    n_ctx: int
    n_chunk: int
    sums: dict = field(default_factory=lambda: dict.fromkeys(
        ("nll", "nll2", "nll_base", "nll_base2", "nll_nll_base", "kld", "kld2", "p_diff", "p_diff2", "p_diff4"), 0.0))
    count: int = 0
    same_top: int = 0
    kld_values: list = field(default_factory=list)
    p_diff_values: list = field(default_factory=list)

    def add(self, nll, nll_base, kld, p_diff, same_top: int) -> None:
        s = self.sums
        for name, v in (("nll", nll), ("nll_base", nll_base), ("kld", kld)):
            s[name] += float(v.sum())
            s[name + "2"] += float((v * v).sum())
        s["nll_nll_base"] += float((nll * nll_base).sum())
        s["p_diff"] += float(p_diff.sum())
        s["p_diff2"] += float((p_diff ** 2).sum())
        s["p_diff4"] += float((p_diff ** 4).sum())
        self.count += nll.size
        self.same_top += same_top
        self.kld_values.append(kld)
        self.p_diff_values.append(p_diff)

    # -- the statistics llama-perplexity prints ---------------------------------------------------------------
    def _log_ppl(self, base: bool = False):
        key = "nll_base" if base else "nll"
        return _mean_and_error(self.sums[key], self.sums[key + "2"], self.count)

    def _log_ppl_cov(self) -> float:
        n = self.count
        if n < 10:
            return 0.0
        s = self.sums
        return (s["nll_nll_base"] / n - (s["nll"] / n) * (s["nll_base"] / n)) / (n - 1)

    def summary(self) -> dict:
        (lp, dlp), (lb, dlb) = self._log_ppl(), self._log_ppl(base=True)
        cov = self._log_ppl_cov()
        ratio_err = math.sqrt(max(dlp * dlp + dlb * dlb - 2 * cov, 0.0))
        kld, dkld = _mean_and_error(self.sums["kld"], self.sums["kld2"], self.count)
        mse, dmse = _mean_and_error(self.sums["p_diff2"], self.sums["p_diff4"], self.count)
        p_diff, dp_diff = _mean_and_error(self.sums["p_diff"], self.sums["p_diff2"], self.count)
        top = self.same_top / self.count
        rms = math.sqrt(mse)
        return dict(n_ctx=self.n_ctx, n_chunk=self.n_chunk, n_scored=self.count,
                    ppl=math.exp(lp), ppl_error=math.exp(lp) * dlp,
                    ppl_base=math.exp(lb), ppl_base_error=math.exp(lb) * dlb,
                    ln_ppl_ratio=lp - lb, ln_ppl_ratio_error=ratio_err,
                    kld_mean=kld, kld_error=dkld, kld_percentiles=self._percentiles(self.kld_values),
                    p_diff_mean=p_diff, p_diff_error=dp_diff, p_diff_percentiles=self._percentiles(self.p_diff_values),
                    p_diff_rms=rms, p_diff_rms_error=0.5 / rms * dmse if rms > 0 else 0.0,
                    same_top=top, same_top_error=math.sqrt(top * (1 - top) / (self.count - 1)) if self.count > 1 else 0.0)

    @staticmethod
    def _percentiles(parts) -> dict:
        """max, 99.9 ... 0.1, min, median: linear between order statistics (llama.cpp's `percentile`)."""
        v = np.sort(np.concatenate(parts)) if parts else np.zeros(1)
        out = {"max": float(v[-1])}
        for q in (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1):
            p = q / 100 * (len(v) - 1)
            i = int(p)
            out[f"{q:g}"] = float((1 - (p - i)) * v[i] + (p - i) * v[min(i + 1, len(v) - 1)])
        out["min"] = float(v[0])
        return out

    def chunk_line(self, i: int) -> str:
        s = self.summary()
        return (f"{i + 1:4d}    {s['ppl']:9.4f} ± {s['ppl_error']:9.4f}    {s['ln_ppl_ratio']:10.5f} ± "
                f"{s['ln_ppl_ratio_error']:10.5f}    {s['kld_mean']:10.5f} ± {s['kld_error']:10.5f}    "
                f"{100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_error']:6.3f} %    "
                f"{100 * s['same_top']:6.3f} ± {100 * s['same_top_error']:6.3f} %")


KL_HEADER = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              "
             "Δp RMS            Same top p")


def kl_divergence(model, base: BaseLogits, n_chunk: int,
                  on_chunk: Callable[[int, KLResult], None] | None = None) -> KLResult:
    """KL(base || model) per scored token over the base file's chunks (its tokens, its n_ctx)."""
    n_ctx, first = base.n_ctx, base.n_ctx // 2
    result = KLResult(n_ctx, n_chunk)
    for i in range(n_chunk):
        logits = chunk_logits(model, base.tokens, i, n_ctx)
        base_lp = base.log_probs(i)
        targets = base.tokens[i * n_ctx + first + 1:(i + 1) * n_ctx]
        for s, lq in log_softmax_blocks(logits):
            rows = np.arange(len(lq))
            t = targets[s:s + len(lq)]
            lb = base_lp[s:s + len(lq)].astype(np.float64)
            nll, nll_base = -lq[rows, t], -lb[rows, t]
            kept = lb > -LOG_PROB_FLOOR            # llama.cpp sums only the base's kept log-probabilities
            kld = np.where(kept, np.exp(lb) * (lb - lq), 0.0).sum(-1)
            same = int((logits[s:s + len(lq)].argmax(-1) == lb.argmax(-1)).sum())
            result.add(nll, nll_base, kld, np.exp(-nll) - np.exp(-nll_base), same)
        if on_chunk is not None:
            on_chunk(i, result)
    return result


def format_kl_summary(s: dict) -> str:
    """The statistics block llama-perplexity prints at the end of --kl-divergence."""
    k, p = s["kld_percentiles"], s["p_diff_percentiles"]
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_error']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_error']:10.6f}",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ppl_ratio']:10.6f} ± {s['ln_ppl_ratio_error']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {math.exp(s['ln_ppl_ratio']):10.6f} ± "
             f"{math.exp(s['ln_ppl_ratio']) * s['ln_ppl_ratio_error']:10.6f}",
             "", "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld_mean']:10.6f} ± {s['kld_error']:10.6f}",
             f"Maximum KLD: {k['max']:10.6f}"]
    lines += [f"{q:>5}%   KLD: {k[q]:10.6f}" if q != "50" else f"Median  KLD: {k[q]:10.6f}"
              for q in ("99.9", "99", "95", "90", "50", "10", "5", "1", "0.1")]
    lines += [f"Minimum KLD: {k['min']:10.6f}", "", "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['p_diff_mean']:6.3f} ± {100 * s['p_diff_error']:5.3f} %",
              f"Maximum Δp: {100 * p['max']:6.3f}%"]
    lines += [f"{q:>5}%   Δp: {100 * p[q]:6.3f}%" if q != "50" else f"Median  Δp: {100 * p[q]:6.3f}%"
              for q in ("99.9", "99", "95", "90", "75", "50", "25", "10", "5", "1", "0.1")]
    lines += [f"Minimum Δp: {100 * p['min']:6.3f}%",
              f"RMS Δp    : {100 * s['p_diff_rms']:6.3f} ± {100 * s['p_diff_rms_error']:5.3f} %",
              f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_error']:5.3f} %"]
    return "\n".join(lines)
