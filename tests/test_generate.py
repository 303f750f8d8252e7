"""Generation on a real model: the CLI answer, the cache, sampling rules, streaming and stop strings."""
from __future__ import annotations

import numpy as np
import pytest

from edgelm.errors import ContextError
from edgelm.runtime.generate import StopMatcher, StreamDecoder
from edgelm.runtime.sampling import Sampler, SamplingParams

from .conftest import run_cli


def test_cli_generate_says_paris(smollm2_path):
    p = run_cli("generate", "-m", smollm2_path, "The capital of France is", "-n", "16", "--temp", "0")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout


def test_cli_prompt_from_stdin_and_verbose(smollm2_path):
    p = run_cli("generate", "-m", smollm2_path, "-n", "4", "--temp", "0", "-v", input="The capital of France is")
    assert p.returncode == 0, p.stderr
    assert "Paris" in p.stdout
    assert "prompt:" in p.stderr and "peak RSS" in p.stderr


def test_cli_start_skips_numbas_blas_probe(smollm2_path):
    """Numba's first kernel load imports scipy.linalg when SciPy is installed (~0.2 s of every command); the
    CLI process has it find no BLAS instead (edgelm's kernels use none), and SciPy still imports after."""
    pytest.importorskip("scipy")
    import subprocess
    import sys
    code = ("import sys; sys.argv = ['edgelm', 'generate', '-m', sys.argv[1], '-n', '1', '--temp', '0', 'Hi']\n"
            "from edgelm.cli import main\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "import numba.np.arraymath\n"
            "print('LINALG', 'scipy.linalg' in sys.modules, numba.np.arraymath._HAVE_BLAS)\n"
            "import scipy.linalg\nprint('SCIPY', scipy.linalg.cython_blas.__name__)\n")
    p = subprocess.run([sys.executable, "-c", code, smollm2_path], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "LINALG False False" in p.stdout and "SCIPY scipy.linalg.cython_blas" in p.stdout, p.stdout


def test_prompt_longer_than_context_is_a_clean_error(smollm2_path):
    p = run_cli("generate", "-m", smollm2_path, "-c", "16", "word " * 50)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    assert "do not fit in the context of 16 tokens" in p.stderr


def test_prefix_reuse_matches_fresh_evaluation(smollm2):
    a = smollm2.tokenize("The quick brown fox jumps over the lazy dog because")
    b = a + smollm2.tokenize(" it was late", add_special=False)
    fresh = smollm2.eval_logits(b)[-1]
    smollm2.cache.clear()
    smollm2.prefill(a)
    from edgelm.runtime.generate import GenerationStats
    st = GenerationStats()
    reused = smollm2.prefill(b, st)
    assert st.prompt_evaluated == len(b) - len(a)          # only the new tokens were evaluated
    np.testing.assert_allclose(reused, fresh, atol=2e-3 * float(fresh.std()))


def test_decode_matches_batched_prefill(smollm2):
    ids = smollm2.tokenize("One two three four five six seven eight nine ten")
    full = smollm2.eval_logits(ids)
    smollm2.cache.clear()
    step = [smollm2.prefill(ids[:3])] + [smollm2.decode_one(t) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(step), full[2:], atol=2e-3 * float(full.std()))


def test_greedy_generation_is_deterministic_and_seeded_sampling_repeats(smollm2):
    g1 = smollm2.generate("Once upon a time", max_tokens=12, temperature=0)
    g2 = smollm2.generate("Once upon a time", max_tokens=12, temperature=0)
    assert g1 == g2 and len(g1) > 0
    s1 = smollm2.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    s2 = smollm2.generate("Once upon a time", max_tokens=12, temperature=1.0, seed=7)
    assert s1 == s2


def test_context_full_shifts_instead_of_stopping(smollm2_path):
    import edgelm
    m = edgelm.load(smollm2_path, n_ctx=12)
    m.generate("Count: one two three", max_tokens=100, temperature=0)
    assert m.last_stats.stop_reason == "length" and m.last_stats.generated_tokens == 100
    assert m.last_stats.context_shifts > 0 and m.session.n_tokens <= 12
    with pytest.raises(ContextError):
        m.eval_logits(list(range(13)))


def test_stop_string_is_not_emitted(smollm2):
    full = smollm2.generate("1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    assert " 7" in full
    cut = smollm2.generate("1, 2, 3, 4, 5,", max_tokens=12, temperature=0, stop=" 7")
    assert cut == full[:full.index(" 7")]
    assert smollm2.last_stats.stop_reason == "stop"


def test_stream_joins_to_the_same_text(smollm2):
    whole = smollm2.generate("The best thing about mornings is", max_tokens=16, temperature=0)
    parts = list(smollm2.generate("The best thing about mornings is", max_tokens=16, temperature=0, stream=True))
    assert "".join(parts) == whole


def test_stream_decoder_never_splits_a_character():
    data = "a😀é中".encode()
    pieces = [data[i:i + 1] for i in range(len(data))]   # one byte per "token"
    dec = StreamDecoder(lambda i: pieces[i])
    out = [dec.push(i) for i in range(len(pieces))] + [dec.flush()]
    assert "".join(out) == "a😀é中"
    assert all(p == "" or p in ("a", "😀", "é", "中") for p in out)


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["<END>"])
    assert m.push("hello <E") == ("hello ", False)
    assert m.push("N") == ("", False)
    assert m.push("D> more") == ("", True)
    m = StopMatcher(["<END>"])
    assert m.push("a <Eb") == ("a <Eb", False)


def _probs_by_sampling(logits, params, n=4000):
    s = Sampler(params)
    counts = np.bincount([s(logits, []) for _ in range(n)], minlength=len(logits))
    return counts / n


def test_sampler_rules():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.06, 0.04], np.float32))
    assert Sampler(SamplingParams(temperature=0))(logits, []) == 0
    # top_k=2 keeps only the two best, renormalised: 2/3, 1/3
    p = _probs_by_sampling(logits, SamplingParams(temperature=1, top_k=2, top_p=1, min_p=0, seed=1))
    assert p[2:].sum() == 0 and abs(p[0] - 2 / 3) < 0.04
    # top_p=0.8: smallest prefix reaching 0.8 is {0,1,2} (0.9)
    p = _probs_by_sampling(logits, SamplingParams(temperature=1, top_k=0, top_p=0.8, min_p=0, seed=2))
    assert p[3:].sum() == 0 and p[2] > 0
    # min_p=0.2: keep p >= 0.1 -> {0,1,2}
    p = _probs_by_sampling(logits, SamplingParams(temperature=1, top_k=0, top_p=1, min_p=0.2, seed=3))
    assert p[3:].sum() == 0 and p[2] > 0
    # repeat penalty 3 on token 0: logit log(.5) < 0 -> times 3 = -2.08 < log(.25) -> token 1 becomes greedy
    assert Sampler(SamplingParams(temperature=0, repeat_penalty=3.0))(logits, [0]) == 1
