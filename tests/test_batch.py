"""Batched generation (runtime/batch.py, Session decode_many): several sequences in one forward pass per step,
each output what generating its prompt alone gives."""
from __future__ import annotations

import json

import numpy as np
import pytest

from edgelm.errors import EdgeLMError
from edgelm.quant.kernels import BATCH_ROWS
from edgelm.runtime.session import decode_many
from tests.conftest import fresh, run_cli

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the winter sea:",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "1, 2, 3, 4,",
    "Q: What colour is the sky on a clear day?\nA:",
]


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_decode_many_rows_are_decode_steps_to_the_bit(request, model_name):
    """Sessions at different lengths step together: row i is the logits sessions[i].decode gives alone."""
    m = request.getfixturevalue(model_name)
    prompts = [m.tokenize(p) for p in PROMPTS[:4]]
    alone, together = [m.create_session() for _ in prompts], [m.create_session() for _ in prompts]
    for s, t, ids in zip(alone, together, prompts):
        s.prefill(ids)
        t.prefill(ids)
    ws = m.decoder.workspace(len(prompts))
    for step in range(3):
        toks = [int(100 + 37 * i + step) for i in range(len(prompts))]
        want = np.stack([s.decode(tok).copy() for s, tok in zip(alone, toks)])
        got = decode_many(together, toks, ws)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert [t.tokens for t in together] == [s.tokens for s in alone]
    with pytest.raises(EdgeLMError, match="one token per step"):
        decode_many([together[0], together[0]], [1, 2], ws)


@pytest.mark.parametrize("model_name", ["smollm2", "gemma"])
def test_batch_is_each_prompt_alone_token_for_token(request, model_name):
    """Greedy and seeded sampling; fewer slots than prompts (a finished sequence's slot takes the next prompt);
    sequences of different lengths and stop reasons finish independently."""
    m = request.getfixturevalue(model_name)
    for kw in (dict(temperature=0), dict(temperature=0.8, seed=7, top_k=40)):
        alone = []
        for i, p in enumerate(PROMPTS):
            alone.append(fresh(m, p, max_tokens=10 + 4 * i, stop=["\n\n"], **kw))
        # max_tokens is one value for the batch: compare each prompt at its own length by running it alone too
        batch = m.generate(PROMPTS, max_tokens=30, stop=["\n\n"], n_parallel=4, **kw)
        stats = m.last_stats
        assert len(stats.sequences) == len(PROMPTS) and stats.steps > 0
        assert stats.generated_tokens == sum(s.generated_tokens for s in stats.sequences)
        for i, (a, b) in enumerate(zip(alone, batch)):
            want = fresh(m, PROMPTS[i], max_tokens=30, stop=["\n\n"], **kw)
            assert b == want, (i, kw)
            assert b.startswith(a) or a.startswith(b)


def test_batch_streams_pieces_with_their_index_and_checks_input(smollm2):
    pieces = list(smollm2.generate(PROMPTS[:3], max_tokens=8, temperature=0, stream=True, n_parallel=2))
    texts = ["", "", ""]
    for i, piece in pieces:
        texts[i] += piece
    assert texts == smollm2.generate(PROMPTS[:3], max_tokens=8, temperature=0)
    ids = smollm2.tokenize(PROMPTS[0])
    assert smollm2.generate([ids, PROMPTS[0]], max_tokens=6, temperature=0) == \
        [fresh(smollm2, ids, max_tokens=6, temperature=0)] * 2
    with pytest.raises(EdgeLMError, match="n_parallel"):
        smollm2.generate(PROMPTS[:2], n_parallel=0)
    with pytest.raises(EdgeLMError, match="without speculation"):
        smollm2.generate(PROMPTS[:2], lookup_ngram=2)
    with pytest.raises(EdgeLMError, match="token ids"):
        smollm2.generate([1, "two"])


def test_more_sequences_than_one_pass_holds(smollm2):
    """More running sequences than BATCH_ROWS: each step is split into passes of at most BATCH_ROWS rows (the
    decode kernels' bits), so the outputs stay those of plain decoding."""
    prompts = [f"Count from {i}: {i}, {i + 1}," for i in range(BATCH_ROWS + 3)]
    batch = smollm2.generate(prompts, max_tokens=5, temperature=0, n_parallel=len(prompts))
    assert batch == [fresh(smollm2, p, max_tokens=5, temperature=0) for p in prompts]


def test_cli_file_parallel(tmp_path, smollm2_path):
    one_line = [p for p in PROMPTS if "\n" not in p][:3]
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(one_line) + "\n\n")
    p = run_cli("generate", "-m", smollm2_path, "--file", str(f), "-np", "2", "-n", "8", "--temp", "0", "-v")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert len(lines) == 4 and lines[3] == ""              # one line per prompt (blank lines are not prompts)
    for prompt, line in zip(one_line, lines):
        alone = run_cli("generate", "-m", smollm2_path, prompt, "-n", "8", "--temp", "0").stdout[:-1]
        assert line == alone.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    assert "3 prompts, 2 in parallel" in p.stderr
    j = tmp_path / "prompts.jsonl"
    j.write_text(json.dumps("a\nb") + "\n" + json.dumps({"prompt": PROMPTS[0]}) + "\n")
    p = run_cli("generate", "-m", smollm2_path, "--file", str(j), "-n", "4", "--temp", "0", "--output-format", "jsonl")
    rows = [json.loads(x) for x in p.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["a\nb", PROMPTS[0]]
    for bad, rule in (('{"x": 1}\n', "prompt"), ("{oops\n", "not a JSON value"), ("\n\n", "no prompts")):
        j.write_text(bad)
        p = run_cli("generate", "-m", smollm2_path, "--file", str(j))
        assert p.returncode == 1 and p.stderr.strip().count("\n") == 0 and rule in p.stderr, p.stderr
    p = run_cli("generate", "-m", smollm2_path, "hi", "--file", str(f))
    assert p.returncode != 0 and "not both" in p.stderr
