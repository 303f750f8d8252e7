"""Sampling defaults per model: a GGUF's general.sampling.* keys (the names llama.cpp's gguf-py writes), else the
catalog's recommendation, else llama.cpp's defaults; explicit keywords and flags override; every value is checked
by the one set of rules in sampling.py, whichever way it comes in."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.catalog import CATALOG
from edgelm.errors import ContextError, EdgeLMError
from edgelm.runtime.sampling import SamplingParams, check_value, parse_value, recommended_sampling

from .conftest import run_cli

TINY = Path(__file__).parent / "data" / "tiny"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


# -- the rules ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(temperature=math.nan), dict(temperature=-0.1), dict(temperature=math.inf),
                                dict(top_k=-1), dict(top_k=2.5), dict(top_p=1.01), dict(min_p=-0.5),
                                dict(min_p=2), dict(repeat_penalty=0), dict(repeat_penalty=math.nan),
                                dict(repeat_last_n=-2), dict(seed=-2), dict(seed=True), dict(top_p="0.5")])
def test_bad_sampling_params_are_refused(kw):
    with pytest.raises(EdgeLMError) as e:
        SamplingParams(**kw)
    (name,) = kw
    assert str(e.value).startswith(f"{name}: expected") and "\n" not in str(e.value)


def test_boundary_values_are_accepted_and_typed():
    p = SamplingParams(temperature=0, top_k=0, top_p=1, min_p=0, repeat_penalty=1e-3, repeat_last_n=-1, seed=-1)
    assert isinstance(p.temperature, float) and isinstance(p.top_k, int)
    assert SamplingParams(top_k=np.int64(5), top_p=np.float32(0.5)).top_k == 5
    assert check_value("top_k", 3.0) == 3                  # an integral float is an integer
    assert parse_value("min_p", " 1 ") == 1.0
    for name, text in (("n_ctx", "1e11"), ("n_ctx", "0"), ("threads", "0"), ("num_predict", "-2"),
                       ("temperature", "nan"), ("top_p", "inf"), ("top_k", "ten")):
        with pytest.raises(EdgeLMError):
            parse_value(name, text)


def test_api_refuses_bad_values_before_work(smollm2):
    with pytest.raises(EdgeLMError, match="temperature"):
        smollm2.generate("Hi", temperature=float("nan"))
    with pytest.raises(EdgeLMError, match="min_p"):
        smollm2.chat(FRANCE, min_p=2)
    with pytest.raises(EdgeLMError, match="max_tokens"):
        smollm2.generate("Hi", max_tokens=-3)


# -- where the defaults come from -----------------------------------------------------------------------------
def test_recommended_sampling_precedence():
    meta = {"general.sampling.temp": 0.6000000238418579,       # 0.6 as the float32 a GGUF holds
            "general.sampling.top_k": 20, "general.sampling.penalty_last_n": np.int32(256)}
    warned = []
    p, src = recommended_sampling(meta, "m", {"temperature": 0.2, "top_p": 0.9}, warned.append)
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_last_n) == (0.6, 20, 0.9, 0.05, 256)
    assert src == {"temperature": "GGUF general.sampling.temp", "top_k": "GGUF general.sampling.top_k",
                   "top_p": "catalog m", "min_p": "llama.cpp default", "repeat_penalty": "llama.cpp default",
                   "repeat_last_n": "GGUF general.sampling.penalty_last_n"}
    assert not warned
    # a hostile recommendation is skipped with a warning, not obeyed and not fatal
    p, src = recommended_sampling({"general.sampling.min_p": float("nan"), "general.sampling.top_k": "40"}, warn=warned.append)
    assert p == SamplingParams() and len(warned) == 2 and any("general.sampling.min_p" in w for w in warned)


def test_catalog_model_by_path_gets_the_catalog_recommendation(smollm2):
    entry = CATALOG["smollm2-135m"]
    assert smollm2.sampling_defaults == SamplingParams().with_(**entry.sampling)
    assert smollm2.sampling_sources["temperature"] == "catalog smollm2-135m"
    assert smollm2.sampling_sources["top_k"] == "llama.cpp default"


def test_gguf_keys_win_over_defaults(tmp_path, monkeypatch):
    """A tiny llama converted with the general.sampling.* keys llama.cpp's converter writes
    (gguf-py GGUFWriter.add_sampling_*)."""
    import edgelm.commands.convert as conv
    original = conv._metadata

    def with_sampling(w, *a, **kw):
        w.add_sampling_temp(0.3)
        w.add_sampling_top_k(7)
        w.add_sampling_min_p(0.1)
        return original(w, *a, **kw)
    monkeypatch.setattr(conv, "_metadata", with_sampling)
    path = tmp_path / "tiny-llama.gguf"
    conv.convert(str(TINY / "llama"), str(path), "f32")
    m = edgelm.load(str(path), n_ctx=64)
    assert (m.sampling_defaults.temperature, m.sampling_defaults.top_k, m.sampling_defaults.min_p) == (0.3, 7, 0.1)
    assert m.sampling_sources["top_k"] == "GGUF general.sampling.top_k"
    assert m.sampling_sources["top_p"] == "llama.cpp default"


def test_defaults_apply_and_keywords_override(smollm2):
    d = smollm2.sampling_defaults
    explicit = dict(temperature=d.temperature, top_k=d.top_k, top_p=d.top_p, min_p=d.min_p,
                    repeat_penalty=d.repeat_penalty, repeat_last_n=d.repeat_last_n)
    for seed in (1, 2):
        assert smollm2.generate("Once upon a time", max_tokens=8, seed=seed) == \
            smollm2.generate("Once upon a time", max_tokens=8, seed=seed, **explicit)
        a = smollm2.chat(FRANCE, max_tokens=8, seed=seed).choices[0].message.content
        b = smollm2.chat(FRANCE, max_tokens=8, seed=seed, **explicit).choices[0].message.content
        assert a == b
    greedy = smollm2.generate("Once upon a time", max_tokens=8, temperature=0)
    assert greedy == smollm2.generate("Once upon a time", max_tokens=8, temperature=0, seed=99)


# -- context size -------------------------------------------------------------------------------------------------
def test_context_checks(smollm2_path, caplog, monkeypatch):
    import psutil
    with pytest.raises(EdgeLMError, match="n_ctx"):
        edgelm.load(smollm2_path, n_ctx=1e11)
    with pytest.raises(EdgeLMError, match="n_ctx"):
        edgelm.load(smollm2_path, n_ctx=0)
    # more than memory holds: refused, naming the GiB, before the cache (np.zeros) is ever asked for
    monkeypatch.setattr(np, "zeros", lambda *a, **k: pytest.fail("allocated"))
    total = psutil.virtual_memory().total
    n = total // (30 * 3 * 128 * 2) + 1                     # SmolLM2: 23040 bytes of f16 K+V per token
    with pytest.raises(ContextError, match=r"needs a [\d,.]+ GiB KV cache"):
        edgelm.load(smollm2_path, n_ctx=n)
    monkeypatch.undo()
    # above the training context: works, with one warning that API users see too
    with caplog.at_level(logging.WARNING, logger="edgelm"):
        m = edgelm.load(smollm2_path, n_ctx=8192 + 8)
    assert m.n_ctx == 8200
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "8200" in warnings[0] and "8192" in warnings[0]


def test_cli_context_warning_is_one_line(smollm2_path):
    p = run_cli("generate", "-m", smollm2_path, "-c", "9000", "-n", "1", "--temp", "0", "Hi")
    assert p.returncode == 0, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelm: context size 9000 is larger than the 8192"), p.stderr
