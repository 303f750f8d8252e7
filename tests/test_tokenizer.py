"""Tokenizers against llama.cpp: ids for every corpus text and mode must equal the golden ids.

Golden files: tests/golden/tokenizer_*.json, made by tools/make_tokenizer_golden.py with llama-cpp-python.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import pytest

from edgelm.errors import GGUFError, UnsupportedError
from edgelm.tokenizer import tokenizer_from_metadata

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = sorted(p for p in (ROOT / "tests" / "golden").glob("tokenizer_*.json") if p.name != "tokenizer_fuzz.json")
FUZZ = ROOT / "tests" / "golden" / "tokenizer_fuzz.json"
CORPUS = json.loads((ROOT / "tests" / "corpus" / "tokenizer_corpus.json").read_text(encoding="utf-8"))

MODEL_FILES = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}
MODES = [(False, False), (False, True), (True, False), (True, True)]  # (add_special, parse_special)


def model_path(name: str) -> Path:
    """The real model file, fetched through edgelm's catalog when missing."""
    from edgelm.catalog import resolve

    return resolve({"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}[name])


@functools.lru_cache(maxsize=None)
def metadata(name: str) -> dict:
    from edgelm.gguf_file import read_metadata

    return read_metadata(model_path(name))


@functools.lru_cache(maxsize=None)
def tokenizer(label: str):
    """'smollm2', 'gemma3', or 'smollm2-pre-<pre>' (SmolLM2's vocabulary with another pre-tokenizer)."""
    if label.startswith("smollm2-pre-"):
        meta = dict(metadata("smollm2"))
        meta["tokenizer.ggml.pre"] = label[len("smollm2-pre-"):]
        return tokenizer_from_metadata(meta)
    return tokenizer_from_metadata(metadata(label))


@functools.lru_cache(maxsize=None)
def golden(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _label(path: Path) -> str:
    return path.stem[len("tokenizer_"):]


def _first_diff(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def test_golden_files_exist():
    labels = {_label(p) for p in GOLDEN}
    assert {"smollm2", "gemma3", "smollm2-pre-llama-bpe", "smollm2-pre-qwen2", "smollm2-pre-gpt-2",
            "smollm2-pre-default"} <= labels


@pytest.mark.parametrize("path", GOLDEN, ids=_label)
def test_golden_texts_are_the_corpus(path):
    assert [c["text"] for c in golden(path)["cases"]] == CORPUS, \
        "corpus changed: regenerate with tools/make_tokenizer_golden.py"


@pytest.mark.parametrize("path", GOLDEN, ids=_label)
def test_ids_match_llama_cpp(path):
    g = golden(path)
    tok = tokenizer(_label(path))
    failures = []
    n = 0
    modes = [tuple(m) for m in g["modes"]]
    for case in g["cases"]:
        for (add, sp), want in zip(modes, case["ids"]):
            got = tok.encode(case["text"], add_special=add, parse_special=sp)
            n += 1
            if got != want:
                i = _first_diff(got, want)
                failures.append(
                    f"text={case['text']!r} add_special={add} parse_special={sp}: first difference at {i}: "
                    f"edgelm {got[i:i + 6]} vs llama.cpp {want[i:i + 6]} (lengths {len(got)} / {len(want)})")
    assert not failures, f"{len(failures)}/{n} differ from llama.cpp:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("label", ["smollm2", "gemma3", "smollm2-pre-llama-bpe", "smollm2-pre-qwen2"])
def test_fuzz_ids_match_llama_cpp(label):
    """Seeded random texts glued from awkward pieces (see FUZZ_ATOMS in the golden tool)."""
    g = golden(FUZZ)
    tok = tokenizer(label)
    modes = [tuple(m) for m in g["modes"]]
    failures = []
    for text, ids in zip(g["texts"], g["ids"][label]):
        for (add, sp), want in zip(modes, ids):
            got = tok.encode(text, add_special=add, parse_special=sp)
            if got != want:
                i = _first_diff(got, want)
                failures.append(f"text={text!r} add_special={add} parse_special={sp}: first difference at {i}: "
                                f"edgelm {got[i:i + 6]} vs llama.cpp {want[i:i + 6]}")
    assert not failures, f"{len(failures)} differ from llama.cpp:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("path", GOLDEN, ids=_label)
def test_vocab_facts_match_llama_cpp(path):
    g = golden(path)
    tok = tokenizer(_label(path))
    assert tok.n_vocab == g["n_vocab"]
    assert (tok.bos_id, tok.eos_id) == (g["bos_id"], g["eos_id"])
    assert (tok.add_bos, tok.add_eos) == (g["add_bos"], g["add_eos"])
    assert sorted(tok.end_of_generation_ids) == g["eog_ids"]
    control = [i for i in range(tok.n_vocab) if tok.is_control(i)]
    want_control = [i for a, b in g["control_ids"] for i in range(a, b + 1)]
    assert control == want_control


@pytest.mark.parametrize("label", sorted(MODEL_FILES))
@pytest.mark.parametrize("special", [False, True])
def test_token_bytes_match_llama_cpp_pieces(label, special):
    """token_bytes over the whole vocabulary hashes like llama_token_to_piece's pieces."""
    tok = tokenizer(label)
    g = golden(ROOT / "tests" / "golden" / f"tokenizer_{label}.json")
    h = hashlib.sha256()
    for tid in range(tok.n_vocab):
        p = tok.token_bytes(tid, special=special)
        h.update(len(p).to_bytes(4, "little") + p)
    assert h.hexdigest() == g["pieces_sha256"][f"special={special}"]


@pytest.mark.parametrize("label", sorted(MODEL_FILES))
def test_decode_matches_llama_cpp_detokenize(label):
    g = golden(ROOT / "tests" / "golden" / f"tokenizer_{label}.json")
    tok = tokenizer(label)
    bad = [(c["text"], tok.decode(c["ids"][0])) for c in g["cases"] if tok.decode(c["ids"][0]) != c["detok"]]
    assert not bad, bad[:5]


@pytest.mark.parametrize("label", sorted(MODEL_FILES))
def test_round_trip(label):
    tok = tokenizer(label)
    bad = []
    for text in CORPUS:
        for add, sp in MODES:
            ids = tok.encode(text, add_special=add, parse_special=sp)
            # control tokens parsed from the text come back only when asked for
            back = tok.decode(ids, skip_special=not sp)
            if sp and add and tok.add_bos:
                back = back[len(tok.token_text(tok.bos_id)):]  # the BOS that add_special put in front
            if back != text:
                bad.append((text, add, sp, back))
    assert not bad, bad[:5]


@pytest.mark.parametrize("label", sorted(MODEL_FILES))
def test_token_bytes_concatenate_to_the_text(label):
    tok = tokenizer(label)
    for text in CORPUS:
        ids = tok.encode(text, add_special=True)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8"), text
        ids = tok.encode(text, add_special=False, parse_special=True)
        assert b"".join(tok.token_bytes(i, special=True) for i in ids) == text.encode("utf-8"), text


def test_special_token_handling_gemma():
    tok = tokenizer("gemma3")
    sot = tok.token_to_id["<start_of_turn>"]
    assert tok.is_control(sot)
    assert sot not in tok.encode("<start_of_turn>user", add_special=False)
    assert tok.encode("<start_of_turn>user", add_special=False, parse_special=True)[0] == sot
    # user-defined tokens ("\n\n", runs of spaces) are matched whole even without parse_special
    nn = tok.token_to_id["\n\n"]
    assert tok.encode("a\n\nb", add_special=False)[1] == nn
    assert tok.encode("x") == [tok.bos_id, tok.token_to_id["x"]]
    assert tok.token_to_id["<end_of_turn>"] in tok.end_of_generation_ids
    assert tok.eos_id in tok.end_of_generation_ids
    assert tok.token_bytes(tok.token_to_id["<0x41>"]) == b"A"
    assert tok.token_bytes(sot) == b"" and tok.token_bytes(sot, special=True) == b"<start_of_turn>"


def test_special_token_handling_smollm():
    tok = tokenizer("smollm2")
    im_end = tok.token_to_id["<|im_end|>"]
    assert im_end in tok.end_of_generation_ids
    assert tok.encode("<|im_end|>", parse_special=True) == [im_end]
    assert im_end not in tok.encode("<|im_end|>")
    assert tok.token_text(tok.encode(" hello")[0]) == "\u0120hello"  # byte-level "Ġhello"
    assert tok.decode([im_end]) == "" and tok.decode([im_end], skip_special=False) == "<|im_end|>"


def test_decode_invalid_utf8_is_replaced():
    tok = tokenizer("gemma3")
    ids = tok.encode("\u00e9", add_special=False)  # a byte-fallback or whole token; cut its bytes
    b = b"".join(tok.token_bytes(i) for i in ids)
    assert tok.decode(ids) == "\u00e9" and len(b) == 2
    half = tok.token_to_id["<0xC3>"]
    assert tok.decode([half]) == "\ufffd"


def _tok_meta(**over):
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.token_type": [1, 1, 1],
    }
    meta.update(over)
    return {k: v for k, v in meta.items() if v is not None}


def test_errors_name_the_key():
    assert tokenizer_from_metadata(_tok_meta()).encode("abab", add_special=False) == [2, 2]
    with pytest.raises(GGUFError, match="tokenizer.ggml.model"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.model": None}))
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.model"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.model": "t5"}))
    with pytest.raises(UnsupportedError, match="tokenizer.ggml.pre"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.pre": "no-such-pre"}))
    with pytest.raises(GGUFError, match="tokenizer.ggml.merges"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.merges": None}))
    with pytest.raises(GGUFError, match="tokenizer.ggml.tokens"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.tokens": None}))
    with pytest.raises(GGUFError, match="tokenizer.ggml.token_type"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.token_type": [1]}))
    with pytest.raises(GGUFError, match="duplicate"):
        tokenizer_from_metadata(_tok_meta(**{"tokenizer.ggml.tokens": ["a", "b", "a"]}))
