"""Speculative decoding with prompt lookup and with a draft model (runtime/speculative.py): the output of plain
decoding, token for token at temperature 0, in distribution when sampling."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from edgelm.errors import EdgeLMError
from edgelm.runtime.sampling import Sampler, SamplingParams
from edgelm.runtime.speculative import DraftModel, PromptLookup, ProposalLength, check_vocabularies
from tests.conftest import fresh, run_cli

TEXT = ("The river runs north past the old market, under the stone bridge, and out to the winter garden. "
        "In the garden a letter waits on the bench beside the music stand.")
PROMPTS = [
    f"Repeat this sentence exactly.\n{TEXT}\nRepeated: The river runs",
    f"{TEXT}\nSummary of the text above: The river",
    "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n",
    "one two three four five one two three four five one two",
    "Write a short story about a cat.",               # little to look up: most steps propose nothing
]


def test_lookup_proposes_what_followed_the_latest_match():
    look = PromptLookup(ngram_max=2, draft_max=3, adaptive=False)
    assert look.propose([1, 2, 3, 4, 1, 2], 10) == [3, 4, 1]
    assert look.propose([1, 2, 3, 9, 2, 7, 1, 2], 10) == [3, 9, 2]      # the 2-gram [1, 2] wins over [2]
    assert look.propose([5, 2, 8, 2, 6, 7, 2], 10) == [6, 7, 2]         # the latest 1-gram match, not the first
    assert look.propose([1, 2, 3, 4, 1, 2], 2) == [3, 4]                # the room left caps it
    assert look.propose([1, 2, 3], 10) == [] and look.propose([7], 10) == []
    with pytest.raises(EdgeLMError, match="draft_max"):
        PromptLookup(2, 0)


def test_proposal_length_follows_acceptance_and_cost():
    """Long proposals while they are kept and verifying is cheap, none (but an occasional probe) while they are
    rejected, and proposals come back when copying resumes."""
    length = ProposalLength(draft_max=8)
    for _ in range(6):
        length.update(length.limit() or 1, length.limit() or 1, row_cost=0.3)
    assert length.limit() == 8
    for _ in range(30):
        length.update(0, 4, row_cost=0.3)
    probes = [length.limit() for _ in range(2 * ProposalLength.PROBE_EVERY)]
    assert probes.count(1) == 2 and probes.count(0) == len(probes) - 2
    expensive = ProposalLength(draft_max=8)
    for _ in range(6):
        expensive.update(3, 4, row_cost=0.6)                 # kept 3 of 4: a ~0.75
    assert 0 < expensive.limit() < 3
    for _ in range(20):
        length.update(1, 1)
    assert length.limit() >= 4
    look = PromptLookup(ngram_max=2, draft_max=3)
    assert look.propose([1, 2, 3, 4, 1, 2], 10) == [3]       # a prior of a = 0.5: one token to start with


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_greedy_lookup_is_plain_decoding_token_for_token(request, model_name):
    m = request.getfixturevalue(model_name)
    accepted = 0
    for prompt in PROMPTS:
        plain = fresh(m, prompt, max_tokens=40, temperature=0)
        plain_stats = m.last_stats
        fast = fresh(m, prompt, max_tokens=40, temperature=0, lookup_ngram=3, draft_max=6)
        s = m.last_stats
        assert fast == plain, prompt
        assert s.generated_tokens == plain_stats.generated_tokens and s.stop_reason == plain_stats.stop_reason
        assert s.draft_accepted <= s.draft_tokens
        accepted += s.draft_accepted
    assert accepted > 20          # the proposals were used, not only tried


def test_lookup_across_a_context_shift_and_a_stop_string(smollm2_path):
    import edgelm
    m = edgelm.load(smollm2_path, n_ctx=64)
    prompt = "one two three four five one two three four five one two"
    plain = fresh(m, prompt, max_tokens=100, temperature=0)
    shifts = m.last_stats.context_shifts
    assert shifts > 0
    assert fresh(m, prompt, max_tokens=100, temperature=0, lookup_ngram=2) == plain
    assert m.last_stats.context_shifts > 0
    stop = plain[20:26]
    want = fresh(m, prompt, max_tokens=100, temperature=0, stop=stop)
    assert fresh(m, prompt, max_tokens=100, temperature=0, stop=stop, lookup_ngram=2) == want


def test_acceptance_rule_keeps_the_sampling_distribution():
    """A proposed token kept with probability p(token), else a draw without it: the result is distributed as
    a plain draw (chi-square over 20000 draws, for a likely and an unlikely proposal)."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 2
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.95, min_p=0.02, seed=123)
    cand, probs = Sampler(params).distribution(logits, [])
    order = np.argsort(-probs)
    for proposal in (int(cand[order[0]]), int(cand[order[-1]])):
        s = Sampler(params)
        n = 20000
        draws = [proposal if s.accepts(logits, [], proposal) else s(logits, [], exclude=proposal)
                 for _ in range(n)]
        counts = np.array([draws.count(int(c)) for c in cand])
        assert counts.sum() == n                      # nothing outside the chain's candidates
        expected = probs * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        # 99.9th percentile of chi-square with len(cand) - 1 degrees of freedom (<= 19): 43.8
        assert chi2 < 43.8, (proposal, chi2)


def test_cli_lookup_flags_and_stats(smollm2_path):
    p = run_cli("generate", "-m", smollm2_path, PROMPTS[3], "-n", "16", "--temp", "0", "--lookup-ngram", "3",
                "--draft-max", "4", "--verbose")
    assert p.returncode == 0, p.stderr
    plain = run_cli("generate", "-m", smollm2_path, PROMPTS[3], "-n", "16", "--temp", "0")
    assert p.stdout == plain.stdout
    assert "accepted" in p.stderr
    bad = run_cli("generate", "-m", smollm2_path, "hi", "--lookup-ngram", "0")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0


# -- a draft model ----------------------------------------------------------------------------------------------

def test_greedy_draft_model_is_plain_decoding_token_for_token(smollm2, smollm2_path):
    """SmolLM2 drafting for itself (every proposal right) and with llama.cpp's p_min: the output of plain decoding,
    and a self-draft's proposals are all accepted (its logits are the target's, to the bit)."""
    import edgelm
    from edgelm.runtime.generate import GenerationStats, stream_tokens
    draft = edgelm.load(smollm2_path)
    for prompt in PROMPTS[:3]:
        plain = fresh(smollm2, prompt, max_tokens=32, temperature=0)
        assert fresh(smollm2, prompt, max_tokens=32, temperature=0, draft_model=draft, draft_max=4) == plain
        s = smollm2.last_stats
        assert s.draft_accepted <= s.draft_tokens
    drafter = DraftModel(smollm2, draft, draft_max=5, p_min=0.0)
    stats = GenerationStats()
    ids = smollm2.tokenize(PROMPTS[0])
    text = "".join(stream_tokens(smollm2, smollm2.create_session(), ids, 32, SamplingParams(temperature=0), [],
                                 stats, drafter=drafter))
    assert text == fresh(smollm2, PROMPTS[0], max_tokens=32, temperature=0)
    assert stats.draft_tokens > 0
    # every proposal is kept; one that ends in an end token stops there, the rest of it unverified
    assert stats.draft_tokens - stats.draft_accepted <= (4 if stats.stop_reason == "eos" else 0)


def test_draft_model_vocabulary_must_match(smollm2, gemma):
    with pytest.raises(EdgeLMError, match="does not share the vocabulary.*tokenizer is spm"):
        smollm2.generate("hi", max_tokens=2, draft_model=gemma)

    def fake(tokens, kind="bpe", bos=1, eos=2):
        tok = SimpleNamespace(kind=kind, n_vocab=len(tokens), tokens=tokens, bos_id=bos, eos_id=eos, add_bos=True)
        return SimpleNamespace(tokenizer=tok, path=f"{kind}-{len(tokens)}.gguf")
    words = [f"w{i}" for i in range(300)]
    check_vocabularies(fake(words), fake(list(words)))
    check_vocabularies(fake(words), fake(words[:200]))                 # within llama.cpp's 128-token slack
    with pytest.raises(EdgeLMError, match="token 7 is 'x'"):
        check_vocabularies(fake(words), fake(words[:7] + ["x"] + words[8:]))
    with pytest.raises(EdgeLMError, match="vocabulary has 150 tokens"):
        check_vocabularies(fake(words), fake(words[:150]))
    with pytest.raises(EdgeLMError, match="BOS/EOS"):
        check_vocabularies(fake(words), fake(words, eos=3))


def test_cli_model_draft(smollm2_path, gemma_path):
    prompt = PROMPTS[0]
    plain = run_cli("generate", "-m", smollm2_path, prompt, "-n", "12", "--temp", "0")
    p = run_cli("generate", "-m", smollm2_path, prompt, "-n", "12", "--temp", "0", "--model-draft", smollm2_path,
                "--draft-max", "3", "-v")
    assert p.returncode == 0, p.stderr
    assert p.stdout == plain.stdout and "draft model:" in p.stderr
    bad = run_cli("generate", "-m", smollm2_path, "hi", "--model-draft", gemma_path)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "vocabulary" in bad.stderr


def test_chat_takes_speculation(smollm2, smollm2_path):
    import edgelm
    msgs = [{"role": "user", "content": f"Repeat exactly: {TEXT}"}]
    plain = smollm2.chat(msgs, max_tokens=24, temperature=0, session=smollm2.create_session())
    for kw in (dict(lookup_ngram=3), dict(draft_model=edgelm.load(smollm2_path), draft_max=3)):
        r = smollm2.chat(msgs, max_tokens=24, temperature=0, session=smollm2.create_session(), **kw)
        assert r.choices[0].message.content == plain.choices[0].message.content
        assert smollm2.last_stats.draft_batches > 0
    with pytest.raises(EdgeLMError, match="one kind of speculation"):
        smollm2.chat(msgs, lookup_ngram=2, draft_model=smollm2)
