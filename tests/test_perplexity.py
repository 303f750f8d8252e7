"""`edgelm perplexity` and --kl-divergence against a float64 NumPy computation of llama-perplexity's
definitions (llama.cpp tools/perplexity/perplexity.cpp) over the weights as gguf-py decodes them
(tests/quant_model.py), on small random-block llama files the test writes itself."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

import edgelm
from edgelm.evaluate import logits_file
from tests.conftest import run_cli
from tests.quant_model import T, reference_logits, write_model

N_CTX = 64
WORDS = ("the of and to in is was for on that with as by at from his her they have this which one "
         "river stone light north market winter garden letter music bridge").split()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppl")
    rng = np.random.default_rng(7)
    text = " ".join(rng.choice(WORDS, 700)) + "."
    (d / "text.txt").write_text(text)
    paths = {}
    for name in ("Q8_0", "Q4_0"):
        paths[name] = d / f"{name}.gguf"
        write_model(paths[name], T[name])
    return d, paths, text


def _tokens(path, text):
    m = edgelm.load(str(path), n_ctx=N_CTX)
    return m, np.array(m.tokenize(text, add_special=True))


def _reference_log_probs(path, model, tokens, n_chunk):
    """Per chunk: float64 log-softmax at the scored positions and the tokens they predict."""
    first, out = N_CTX // 2, []
    for i in range(n_chunk):
        ids = tokens[i * N_CTX:(i + 1) * N_CTX].copy()
        if model.tokenizer.add_bos:
            ids[0] = model.tokenizer.bos_id
        z = reference_logits(path, ids)[first:N_CTX - 1]
        z = z - z.max(-1, keepdims=True)
        out.append((z - np.log(np.exp(z).sum(-1, keepdims=True)), tokens[i * N_CTX + first + 1:(i + 1) * N_CTX]))
    return out


def test_perplexity_equals_numpy_definition(files):
    d, paths, text = files
    p = run_cli("perplexity", "-m", str(paths["Q8_0"]), "-f", str(d / "text.txt"), "-c", str(N_CTX), "-o", "json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    model, tokens = _tokens(paths["Q8_0"], text)
    n_chunk = len(tokens) // N_CTX
    assert n_chunk >= 3 and got["n_chunk"] == n_chunk and got["n_tokens"] == len(tokens)
    nll = np.concatenate([-lp[np.arange(len(t)), t] for lp, t in _reference_log_probs(paths["Q8_0"], model,
                                                                                      tokens, n_chunk)])
    assert got["n_scored"] == nll.size == n_chunk * (N_CTX - 1 - N_CTX // 2)
    ppl = math.exp(nll.mean())
    err = ppl * math.sqrt(nll.var() / (nll.size - 1))
    assert got["ppl"] == pytest.approx(ppl, rel=1e-4) and got["ppl_error"] == pytest.approx(err, rel=1e-3)
    running = [math.exp(nll[:(k + 1) * (N_CTX - 1 - N_CTX // 2)].mean()) for k in range(n_chunk)]
    assert np.allclose(got["chunks"], running, rtol=1e-4)

    # the text output: llama-perplexity's running line and final estimate, the same numbers
    p = run_cli("perplexity", "-m", str(paths["Q8_0"]), "-f", str(d / "text.txt"), "-c", str(N_CTX),
                "--chunks", "2")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert re.fullmatch(r"\[1\]\d+\.\d{4},\[2\]\d+\.\d{4},", lines[0]), lines
    m = re.fullmatch(r"Final estimate: PPL = (\d+\.\d{4}) \+/- (\d+\.\d{5})", lines[1])
    assert m and float(m.group(1)) == pytest.approx(running[1], rel=1e-4), lines


def test_kl_divergence_equals_numpy_definition(files, tmp_path):
    d, paths, text = files
    base = tmp_path / "base.kld"
    p = run_cli("perplexity", "-m", str(paths["Q8_0"]), "-f", str(d / "text.txt"), "-c", str(N_CTX),
                "--kl-divergence-base", str(base), "-o", "json")
    assert p.returncode == 0, p.stderr
    ppl_base = json.loads(p.stdout)["ppl"]
    p = run_cli("perplexity", "-m", str(paths["Q4_0"]), "--kl-divergence-base", str(base), "--kl-divergence",
                "-o", "json")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)

    model, tokens = _tokens(paths["Q8_0"], text)
    n_chunk = len(tokens) // N_CTX
    kld, same, nll = [], 0, []
    for (lb, t), (lq, _) in zip(_reference_log_probs(paths["Q8_0"], model, tokens, n_chunk),
                                _reference_log_probs(paths["Q4_0"], model, tokens, n_chunk)):
        kept = lb > -16                      # llama.cpp keeps the base's log-probabilities above -16
        kld.append(np.where(kept, np.exp(lb) * (lb - lq), 0).sum(-1))
        same += int((lb.argmax(-1) == lq.argmax(-1)).sum())
        nll.append(-lq[np.arange(len(t)), t])
    kld, nll = np.concatenate(kld), np.concatenate(nll)
    assert got["n_scored"] == kld.size
    assert kld.mean() > 0.05               # different weights: a divergence to measure
    assert got["kld_mean"] == pytest.approx(kld.mean(), rel=2e-3, abs=1e-4)
    assert got["kld_percentiles"]["max"] == pytest.approx(kld.max(), rel=2e-3, abs=1e-4)
    assert abs(got["same_top"] * kld.size - same) <= 1
    assert got["ppl"] == pytest.approx(math.exp(nll.mean()), rel=1e-4)
    assert got["ppl_base"] == pytest.approx(ppl_base, rel=1e-3)   # from the file's 16-bit codes

    # a model against its own saved logits: only the 16-bit coding remains
    p = run_cli("perplexity", "-m", str(paths["Q8_0"]), "--kl-divergence-base", str(base), "--kl-divergence")
    assert p.returncode == 0, p.stderr
    assert "Same top p: 100.000" in p.stdout and re.search(r"Mean    KLD:\s+-?0\.0000\d\d ", p.stdout), p.stdout


def test_log_prob_coding_round_trip():
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 301)) * 6).astype(np.float32)
    logits[1] = 3.0                                    # a flat row: scale 0
    words = logits_file.encode_rows(logits)
    assert words.shape == (5, logits_file.row_words(301)) == (5, 306)
    got = logits_file.decode_rows(words, 301)
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    want = z - np.log(np.exp(z).sum(-1, keepdims=True))
    kept = z > -16
    step = (logits.max(-1) - np.maximum(logits.min(-1), logits.max(-1) - 16)) / 65535
    assert np.all(np.abs(got - want)[kept] <= (step[:, None] * 0.51 + 1e-5).repeat(301, 1)[kept])
    assert np.allclose(got[1], -math.log(301), atol=1e-5)


@pytest.mark.parametrize("damage, rule", [
    (lambda b: b"_LOGITS_" + b[8:], "not a base-logits file"),
    (lambda b: b[:-2], "bytes, but its header"),
    (lambda b: b + b"\0\0", "bytes, but its header"),
    (lambda b: b[:8] + (1 << 30).to_bytes(4, "little") + b[12:], "header out of range"),
])
def test_damaged_base_file_is_named(files, tmp_path, damage, rule):
    d, paths, _ = files
    good = tmp_path / "good.kld"
    assert run_cli("perplexity", "-m", str(paths["Q8_0"]), "-f", str(d / "text.txt"), "-c", str(N_CTX),
                   "--chunks", "2", "--kl-divergence-base", str(good)).returncode == 0
    bad = tmp_path / "bad.kld"
    bad.write_bytes(damage(good.read_bytes()))
    p = run_cli("perplexity", "-m", str(paths["Q4_0"]), "--kl-divergence-base", str(bad), "--kl-divergence")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and str(bad) in p.stderr and rule in p.stderr, p.stderr


def test_bad_input_one_line_and_no_file_left(files, tmp_path):
    d, paths, _ = files
    m = str(paths["Q8_0"])
    short = tmp_path / "short.txt"
    short.write_text("the river and the stone")
    out = tmp_path / "out.kld"
    cases = [
        (["-f", str(short), "-c", str(N_CTX), "--kl-divergence-base", str(out)], "needs at least 128"),
        (["-f", str(d / "text.txt"), "-c", "2"], "-c"),
        (["-f", str(d / "text.txt"), "-o", "yaml"], "unknown output format"),
        (["--kl-divergence"], "needs --kl-divergence-base"),
        ([], "needs -f TEXT"),
    ]
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 300)
    cases.append((["-f", str(latin1)], "not UTF-8 text (byte 0xe9 at offset 3)"))
    for flags, rule in cases:
        p = run_cli("perplexity", "-m", m, *flags)
        assert p.returncode != 0 and p.stderr.count("\n") == 1 and rule in p.stderr, (flags, p.stderr)
        assert "Traceback" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["latin1.txt", "short.txt"]   # no (partial) output


def test_base_file_from_another_vocabulary_is_refused(files, tmp_path, smollm2_path):
    d, paths, _ = files
    base = tmp_path / "base.kld"
    assert run_cli("perplexity", "-m", str(paths["Q8_0"]), "-f", str(d / "text.txt"), "-c", str(N_CTX),
                   "--chunks", "2", "--kl-divergence-base", str(base)).returncode == 0
    p = run_cli("perplexity", "-m", smollm2_path, "--kl-divergence-base", str(base), "--kl-divergence")
    assert p.returncode == 1 and "vocabulary of 512 tokens" in p.stderr and "49152" in p.stderr, p.stderr
