"""Sessions: several conversations on one model, work buffers allocated once, save/load, context shift.

References are independent evaluations: a session's tokens against the same prompt run alone; a loaded
session's continuation against the uninterrupted one; a shifted cache against a fresh evaluation of the kept
tokens at their new positions (RoPE is relative, so the two agree up to rounding).
"""
from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import edgelm
from edgelm.errors import EdgeLMError
from edgelm.runtime.generate import GenerationStats

TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening to light the great lamp. Ships far out "
        "at sea watched for its beam, and on stormy nights he stayed awake until dawn, listening to the waves "
        "break against the rocks below. ")


def _greedy(session, ids, n):
    """n greedy tokens after `ids` (from a prefill), by session.decode."""
    return _continue(session, n, session.prefill(ids))


def _continue(session, n, first_logits=None):
    logits = first_logits
    out = []
    for _ in range(n):
        t = int(np.argmax(logits))
        out.append(t)
        logits = session.decode(t)
    return out


# -- several sessions ------------------------------------------------------------------------------------------
def test_interleaved_sessions_equal_each_alone(smollm2):
    a_text, b_text = "Once upon a time, in a small village,", "The three primary colours are"
    alone_a = smollm2.generate(a_text, max_tokens=12, temperature=0)
    alone_b = smollm2.generate(b_text, max_tokens=12, temperature=0)
    sa, sb = smollm2.create_session(), smollm2.create_session()
    ia = smollm2.generate(a_text, max_tokens=12, temperature=0, stream=True, session=sa)
    ib = smollm2.generate(b_text, max_tokens=12, temperature=0, stream=True, session=sb)
    pieces_a, pieces_b = [], []
    for pa, pb in zip(ia, ib):          # one step of each in turn
        pieces_a.append(pa)
        pieces_b.append(pb)
    pieces_a += list(ia)
    pieces_b += list(ib)
    assert "".join(pieces_a) == alone_a and "".join(pieces_b) == alone_b
    assert alone_a != alone_b
    # each session holds its own conversation; the default session was not touched by them
    assert sa.tokens[:len(smollm2.tokenize(a_text))] == smollm2.tokenize(a_text)
    assert sb.tokens[:len(smollm2.tokenize(b_text))] == smollm2.tokenize(b_text)
    assert smollm2.session.tokens[:len(smollm2.tokenize(b_text))] == smollm2.tokenize(b_text)


def test_chat_and_eval_logits_take_a_session(smollm2):
    s = smollm2.create_session()
    before = list(smollm2.session.tokens)
    r = smollm2.chat([{"role": "user", "content": "Say hi."}], max_tokens=4, temperature=0, session=s)
    assert r.usage.completion_tokens >= 1 and s.n_tokens > 0
    ids = smollm2.tokenize("Hello world")
    assert np.array_equal(smollm2.eval_logits(ids, session=s), smollm2.eval_logits(ids))
    assert smollm2.session.tokens == ids and s.tokens == ids and before != ids


# -- buffers allocated once ------------------------------------------------------------------------------------
def test_decode_allocates_little_per_token(smollm2):
    """tracemalloc over 100 decode steps: no growth, and the bytes allocated per step are small beside the
    ~50 KiB-per-layer arrays a step used to allocate (what remains: positions, RoPE cos/sin and temporaries)."""
    s = smollm2.create_session()
    s.prefill(smollm2.tokenize("Numbers:"))
    for t in range(5):
        s.decode(100 + t)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    for t in range(100):
        s.decode(200 + t)
    now, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    per_step_peak = peak - base
    print(f"growth over 100 steps {now - base} B, peak above start {per_step_peak} B")
    assert now - base < 64 * 1024               # tokens list and small objects only
    assert per_step_peak < 64 * 1024            # logits (192 KiB), MLP (6 KiB x 30 layers) are preallocated


# -- save / load -----------------------------------------------------------------------------------------------
def _save_load_continue(model, ids, n_before, n_after, tmp_path):
    whole = _greedy(model.create_session(), ids, n_before + n_after)
    s = model.create_session()
    first = _greedy(s, ids, n_before)
    path = tmp_path / "conv.session"
    s.save(path)
    loaded = model.load_session(path)
    assert loaded.tokens == s.tokens
    # the loaded session continues exactly like the uninterrupted one (greedy: the same tokens)
    logits = loaded.prefill(s.tokens)            # all held: only the last token is evaluated again
    rest = _continue(loaded, n_after, logits)
    assert first + rest == whole
    return path


def test_save_load_continue_smollm2(smollm2, tmp_path):
    path = _save_load_continue(smollm2, smollm2.tokenize(TEXT), 6, 6, tmp_path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".partial")]
    per_token = smollm2.config.n_layer * smollm2.config.n_head_kv * 2 * smollm2.config.head_dim * 2     # f16 K+V
    held = smollm2.load_session(path).n_tokens
    assert path.stat().st_size < held * per_token + 65536      # held slots only, not the 1024-token cache


@pytest.fixture(scope="module")
def gemma_ring(gemma_path):
    """Gemma 3 with 15 sliding layers as rings of 1023 slots, in a context longer than that."""
    m = edgelm.load(gemma_path, n_ctx=1280)
    assert sum(c.capacity < m.n_ctx for c in m.session.caches) == 15
    return m


def test_save_load_continue_gemma_ring(gemma_ring, tmp_path):
    ids = gemma_ring.tokenize(TEXT * 40)[:1030]          # past the ring's 1023 slots: it has wrapped
    _save_load_continue(gemma_ring, ids, 4, 4, tmp_path)


def _snapshot_restore_continue(model, ids, n_before, n_after, earlier=None):
    """A snapshot restored into another session (which held something else) continues like the original; the
    snapshot's session may have held a longer text before (slots past its tokens are not copied)."""
    whole = _greedy(model.create_session(), ids, n_before + n_after)
    s = model.create_session()
    if earlier is not None:
        s.prefill(earlier)
    first = _greedy(s, ids, n_before)
    state = s.snapshot()
    other = model.create_session()
    _greedy(other, model.tokenize("Something else entirely, to be overwritten."), 3)
    other.restore(state)
    assert other.tokens == s.tokens
    rest = _continue(other, n_after, other.prefill(s.tokens))
    assert first + rest == whole


def test_snapshot_restore_continue(smollm2, gemma_ring):
    _snapshot_restore_continue(smollm2, smollm2.tokenize(TEXT), 6, 6)
    _snapshot_restore_continue(gemma_ring, gemma_ring.tokenize(TEXT * 40)[:1030], 4, 4)   # wrapped rings
    _snapshot_restore_continue(gemma_ring, gemma_ring.tokenize(TEXT), 4, 4, earlier=gemma_ring.tokenize(TEXT * 8))
    with pytest.raises(EdgeLMError, match="another model"):
        smollm2.create_session().restore(gemma_ring.create_session().snapshot())


def test_bad_session_files_are_refused_in_one_line(smollm2, gemma, smollm2_path, tmp_path):
    s = smollm2.create_session()
    s.prefill(smollm2.tokenize("A short prompt"))
    good = tmp_path / "good.session"
    s.save(good)
    data = good.read_bytes()
    cases = {"truncated": data[:-7], "trailing": data + b"x", "empty": b"", "not a session": b"GGUF" + data[4:],
             "header cut": data[:40]}
    corrupted = bytearray(data)
    corrupted[-3] ^= 0xFF
    cases["corrupted"] = bytes(corrupted)
    for name, blob in cases.items():
        p = tmp_path / f"{name}.session"
        p.write_bytes(blob)
        with pytest.raises(EdgeLMError) as e:
            smollm2.load_session(p)
        msg = str(e.value)
        assert "\n" not in msg and str(p) in msg, (name, msg)
    # another model, other cache types, another context size
    with pytest.raises(EdgeLMError, match="another model"):
        gemma.load_session(good)
    q8 = edgelm.load(smollm2_path, n_ctx=1024, cache_type_k="q8_0")
    with pytest.raises(EdgeLMError, match="cache_type_k is f16, this model was loaded with q8_0"):
        q8.load_session(good)
    other_ctx = edgelm.load(smollm2_path, n_ctx=512)
    with pytest.raises(EdgeLMError, match="context of 1024 tokens"):
        other_ctx.load_session(good)
    with pytest.raises(EdgeLMError, match="cannot read"):
        smollm2.load_session(tmp_path / "missing.session")
    # nothing lost: the file that was refused elsewhere still loads here
    assert smollm2.load_session(good).tokens == s.tokens


# -- context shift ---------------------------------------------------------------------------------------------
def _rope_complex(k: np.ndarray, delta: int, inv_freq: np.ndarray, style: str) -> np.ndarray:
    """Reference RoPE by `delta` positions: each rotated pair as a complex number times e^(i delta f), in
    float64 (independent of blocks.Rope)."""
    half = len(inv_freq)
    k = k.astype(np.float64)
    if style == "neox":
        z = k[..., :half] + 1j * k[..., half:2 * half]
    else:
        z = k[..., 0:2 * half:2] + 1j * k[..., 1:2 * half:2]
    z = z * np.exp(1j * delta * inv_freq.astype(np.float64))
    out = k.copy()
    if style == "neox":
        out[..., :half], out[..., half:2 * half] = z.real, z.imag
    else:
        out[..., 0:2 * half:2], out[..., 1:2 * half:2] = z.real, z.imag
    return out


def _check_shift(model, ids, n_keep, n_discard):
    """Shift a session holding `ids`; every layer's kept K rows must equal the reference rotation of the
    rows held before, V rows must be moved unchanged, and layer 0's keys (which depend on nothing but the
    token and its position) must equal a fresh evaluation of the kept tokens."""
    s = model.create_session()
    s.prefill(ids)
    n = len(ids)
    lo = [max(n_keep + n_discard, c.oldest_kept(n)) for c in s.caches]
    before = [(c.rows_f32("k", np.arange(a, n)), c.rows_f32("v", np.arange(a, n))) for c, a in zip(s.caches, lo)]
    s.shift(n_keep, n_discard)
    kept = ids[:n_keep] + ids[n_keep + n_discard:]
    assert s.tokens == kept
    for L, c, a, (k0, v0) in zip(model.decoder.layers, s.caches, lo, before):
        new = np.arange(a, n) - n_discard
        want = _rope_complex(k0, -n_discard, L.rope.inv_freq, L.rope.style)
        got = c.rows_f32("k", new)
        assert np.abs(got - want).max() <= 2e-5 * np.abs(want).max() + 1e-6
        assert np.array_equal(c.rows_f32("v", new), v0)
    fresh = model.create_session()
    fresh.prefill(kept)
    c, f = s.caches[0], fresh.caches[0]
    pos = np.arange(lo[0] - n_discard, len(kept))
    want = f.rows_f32("k", pos)
    np.testing.assert_allclose(c.rows_f32("k", pos), want, atol=1e-4 * np.abs(want).max())
    return s, kept


def test_shift_moves_and_re_rotates_the_kept_keys(smollm2_path):
    m = edgelm.load(smollm2_path, n_ctx=256, kv_type="f32")      # llama: adjacent pairs rotate
    s, kept = _check_shift(m, m.tokenize(TEXT * 4)[:200], 1, 99)
    # and the shifted session goes on: the next greedy tokens continue the text sensibly
    assert len(set(_continue(s, 12, s.prefill(kept)))) > 4


def test_shift_on_ring_caches(gemma_path):
    m = edgelm.load(gemma_path, n_ctx=1280, kv_type="f32")      # neox pairs, two RoPE bases, 15 rings wrapped
    _check_shift(m, m.tokenize(TEXT * 40)[:1100], 1, 500)


def test_generate_past_the_context_shifts_and_keeps_making_sense(smollm2_path):
    m = edgelm.load(smollm2_path, n_ctx=128)
    prompt = "Here is a story about a dragon who learned to bake bread."
    text = m.generate(prompt, max_tokens=400, temperature=0, repeat_penalty=1.1, n_keep=4)
    st = m.last_stats
    assert st.generated_tokens == 400 and st.context_shifts >= 3 and st.stop_reason == "length"
    ids = m.tokenize(text, add_special=False)
    tail = ids[-150:]
    assert len(set(tail)) > 40, text            # not one token or a short loop over and over
    assert m.session.n_tokens <= 128 and m.session.tokens[:4] == m.tokenize(prompt)[:4]     # n_keep kept
    m.session.truncate(m.session.n_tokens - 3)
    assert all(np.isfinite(m.session.decode(t)).all() for t in ids[-3:])
    # (that the shifted keys are exactly the re-rotated ones is checked by the two tests above; agreement of
    # greedy tokens with a fresh evaluation is no test here: the kept K/V still carry the dropped context)


def test_learned_positions_re_evaluate_on_shift(tmp_path):
    from edgelm.commands.convert import convert
    out = tmp_path / "gpt2.gguf"
    convert(str(Path(__file__).parent / "data" / "tiny" / "gpt2"), str(out), "f32")
    m = edgelm.load(str(out), n_ctx=32, kv_type="f32")
    ids = [int(t) for t in np.arange(5, 35) % m.config.n_vocab]
    s = m.create_session()
    s.prefill(ids)
    s.shift(2, 10)                               # learned positions: the kept tokens are evaluated again
    kept = ids[:2] + ids[12:]
    assert s.tokens == kept
    shifted = s.decode(7).copy()
    fresh = m.eval_logits(kept + [7], session=m.create_session())[-1]
    np.testing.assert_allclose(shifted, fresh, atol=1e-4 * float(fresh.std()))
    text = m.generate([int(t) for t in ids[:10]], max_tokens=60, temperature=0)   # past n_ctx 32: no error
    assert m.last_stats.generated_tokens == 60 and m.last_stats.context_shifts >= 1 and text is not None


def test_prefix_reuse_on_wrapped_rings_is_exact(gemma_ring):
    """A prompt sharing a prefix with a held sequence whose rings have wrapped: reused only where every ring
    still holds the window, and the logits equal a fresh evaluation either way."""
    m = gemma_ring
    ids = m.tokenize(TEXT * 40)[:1200]
    s = m.create_session()
    s.prefill(ids)
    st = GenerationStats()
    late = ids[:1150] + [236764]                 # diverges after 1150: the rings still hold 1150-511..
    got = s.prefill(late, st).copy()
    assert st.prompt_evaluated == 1
    fresh = m.eval_logits(late, session=m.create_session())[-1]
    np.testing.assert_allclose(got, fresh, atol=0.02 * float(fresh.std()))
    early = ids[:300] + [236764]                 # position 300's window was overwritten: evaluated again
    got = s.prefill(early, st).copy()
    assert st.prompt_evaluated == len(early)
    fresh = m.eval_logits(early, session=m.create_session())[-1]
    np.testing.assert_allclose(got, fresh, atol=0.02 * float(fresh.std()))


def test_conversation_reuses_the_cache_after_dropping_turns(smollm2_path):
    from edgelm.chat import Conversation
    from edgelm.runtime.sampling import SamplingParams
    m = edgelm.load(smollm2_path, n_ctx=200)
    conv = Conversation(m, system="You are terse.", params=SamplingParams(temperature=0), max_tokens=8)
    dropped = 0
    for i in range(6):
        "".join(conv.send(f"Note {i}: remember the colours red, green, blue, cyan, magenta and yellow."))
        last = conv.last
        if last.dropped_messages:
            dropped += 1
            # the kept turns were moved down in the cache, not evaluated again
            assert last.stats.prompt_evaluated < last.stats.prompt_tokens / 2, last.stats
    assert dropped >= 2


def test_model_chat_drops_oldest_turns_instead_of_failing(smollm2_path):
    m = edgelm.load(smollm2_path, n_ctx=160)
    msgs = [{"role": "system", "content": "You are terse."}]
    for i in range(12):
        msgs.append({"role": "user", "content": f"Item {i}: a long sentence about nothing in particular at all."})
        r = m.chat(msgs, max_tokens=6, temperature=0)
        msgs.append({"role": "assistant", "content": r.choices[0].message.content})
        assert r.usage.prompt_tokens + 6 <= m.n_ctx
