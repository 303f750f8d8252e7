"""edgelm.commands.convert.vocab: a Hugging Face tokenizer -> GGUF tokenizer metadata, checked against HF's own ids.

For every tiny checkpoint in tests/data/tiny/<name>/ (tools/make_tiny_checkpoints.py) we write a GGUF holding
only general.architecture and the vocabulary, load it with edgelm's tokenizer and compare its ids with the
ids transformers produced (tokenizer_golden.json). Hugging Face splits added/special tokens out of the text,
so encode runs with parse_special=True.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import gguf
import pytest

from edgelm.commands.convert.vocab import add_vocab, vocab_metadata
from edgelm.errors import EdgeLMError, UnsupportedError
from edgelm.gguf_file import GGUFFile
from edgelm.tokenizer import tokenizer_from_metadata

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny"
CORPUS = json.loads((ROOT / "tests" / "corpus" / "tokenizer_corpus.json").read_text(encoding="utf-8"))
DIRS = sorted(p for p in TINY.glob("*") if (p / "tokenizer_golden.json").is_file()) if TINY.is_dir() else []

K = gguf.Keys.Tokenizer
# the GGUF architecture of each tiny checkpoint (config.json "architectures" -> llama.cpp's name)
_HF_ARCH = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama",
            "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3", "Qwen3MoeForCausalLM": "qwen3moe",
            "Phi3ForCausalLM": "phi3", "Gemma3ForCausalLM": "gemma3", "GptOssForCausalLM": "gpt-oss"}


def _config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text(encoding="utf-8"))


def _arch(d: Path) -> str:
    return _HF_ARCH.get(_config(d).get("architectures", [""])[0], "llama")


def _n_vocab(d: Path) -> int:
    cfg = _config(d)
    return int(cfg.get("vocab_size") or cfg["text_config"]["vocab_size"])


def write_vocab_gguf(hf_dir: Path, out: Path, n_vocab: int | None = None, arch: str | None = None) -> Path:
    arch = arch or _arch(hf_dir)
    w = gguf.GGUFWriter(str(out), arch)
    add_vocab(w, hf_dir, n_vocab or _n_vocab(hf_dir), arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


_converted: dict[str, dict] = {}


def converted(d: Path, tmp_path_factory) -> dict:
    """The GGUF metadata add_vocab writes for a tiny checkpoint (written once per session)."""
    if d.name not in _converted:
        out = write_vocab_gguf(d, tmp_path_factory.mktemp("vocab") / f"{d.name}.gguf")
        _converted[d.name] = GGUFFile(str(out)).metadata
    return _converted[d.name]


def _cases():
    for d in DIRS:
        cases = json.loads((d / "tokenizer_golden.json").read_text(encoding="utf-8"))["cases"]
        for i, _ in enumerate(cases):
            yield pytest.param(d, i, id=f"{d.name}-{i}")


def _spm_prefix_divergence(meta: dict, tok, text: str) -> str | None:
    """Why edgelm's ids legitimately differ from transformers' for this text, if they do.

    With a SentencePiece dummy prefix, edgelm (like llama.cpp, llm_tokenizer_spm) puts a "▁" in front of the
    text and of every piece of text after a special token, also when the text already starts with a space.
    transformers' Metaspace(prepend_scheme="first") adds it only at the very start, and not when the text
    starts with a space. No GGUF key expresses that, so it is a runtime difference, not a conversion one.
    """
    if meta.get(K.MODEL) != "llama" or not tok.add_space_prefix:
        return None
    if text.startswith(" "):
        return "text starts with a space"
    specials = [tok.tokens[i] for i in range(tok.n_vocab) if tok.is_control(i)]
    if any(s and s in text for s in specials):
        return "text after a special token"
    return None


# --------------------------------------------------------------------------- tiny checkpoints vs HF ids

def test_tiny_checkpoints_present():
    assert len(DIRS) == 10, "tests/data/tiny/*/tokenizer_golden.json (tools/make_tiny_checkpoints.py)"


@pytest.mark.parametrize("d,i", list(_cases()))
def test_ids_match_transformers(d, i, tmp_path_factory):
    case = json.loads((d / "tokenizer_golden.json").read_text(encoding="utf-8"))["cases"][i]
    meta = converted(d, tmp_path_factory)
    tok = tokenizer_from_metadata(meta)
    got = tok.encode(case["text"], add_special=case["add_special"], parse_special=True)
    # SentencePiece vocabularies: the reference is the sentencepiece library's own ids, split at added tokens
    # as llama.cpp does (spm_ids); transformers' ids may differ only where _spm_prefix_divergence explains.
    want = case["spm_ids"] if meta.get(K.MODEL) == "llama" else case["ids"]
    assert got == want, f"{d.name}: {case['text']!r} add_special={case['add_special']}"
    if got != case["ids"]:
        assert _spm_prefix_divergence(meta, tok, case["text"]), f"{d.name}: {case['text']!r} unexplained"


@pytest.mark.parametrize("d,i", list(_cases()))
def test_decode_matches_transformers(d, i, tmp_path_factory):
    case = json.loads((d / "tokenizer_golden.json").read_text(encoding="utf-8"))["cases"][i]
    tok = tokenizer_from_metadata(converted(d, tmp_path_factory))
    assert tok.decode(case["ids"], skip_special=False) == case["decoded"]


@pytest.mark.parametrize("d", DIRS, ids=lambda d: d.name)
def test_decode_round_trips(d, tmp_path_factory):
    tok = tokenizer_from_metadata(converted(d, tmp_path_factory))
    cases = json.loads((d / "tokenizer_golden.json").read_text(encoding="utf-8"))["cases"]
    for text in list(CORPUS) + [c["text"] for c in cases]:
        assert tok.decode(tok.encode(text, add_special=False, parse_special=False), skip_special=False) == text


@pytest.mark.parametrize("d", DIRS, ids=lambda d: d.name)
def test_metadata_basics(d, tmp_path_factory):
    meta = converted(d, tmp_path_factory)
    n = _n_vocab(d)
    assert meta["general.architecture"] == _arch(d)
    assert len(meta[K.LIST]) == n and len(meta[K.TOKEN_TYPE]) == n
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    if (d / "tokenizer.model").is_file() or tj["model"].get("byte_fallback"):
        assert meta[K.MODEL] == "llama" and len(meta[K.SCORES]) == n
    else:
        assert meta[K.MODEL] == "gpt2" and len(meta[K.MERGES]) == len(tj["model"]["merges"])
    # every added token keeps its id; special ones are CONTROL
    for a in tj.get("added_tokens", []):
        if a["special"]:
            assert meta[K.LIST][a["id"]] == a["content"] and meta[K.TOKEN_TYPE][a["id"]] == gguf.TokenType.CONTROL
    # ids of the special tokens named in tokenizer_config.json
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    for typ, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("pad", K.PAD_ID)):
        if isinstance(cfg.get(f"{typ}_token"), str):
            assert meta[K.LIST][meta[key]] == cfg[f"{typ}_token"]
    if "chat_template" in cfg:
        assert meta[K.CHAT_TEMPLATE] == cfg["chat_template"]


@pytest.mark.parametrize("d", DIRS, ids=lambda d: d.name)
def test_gguf_reader_reads_it(d, tmp_path):
    out = write_vocab_gguf(d, tmp_path / "v.gguf")
    r = gguf.GGUFReader(str(out))
    field = r.get_field(K.LIST)
    assert len(field.data) == _n_vocab(d)
    model = r.get_field(K.MODEL)
    assert bytes(model.parts[model.data[0]]).decode() in ("gpt2", "llama")


@pytest.mark.parametrize("d", [d for d in DIRS if (d / "tokenizer.model").is_file()], ids=lambda d: d.name)
def test_tokenizer_json_alone_gives_the_same_vocabulary(d, tmp_path):
    """Without tokenizer.model the SentencePiece-style tokenizer.json is used (llama.cpp _set_vocab_llama_hf):
    same tokens and types, and scores derived from the merges that tokenize like SentencePiece's scores."""
    j = tmp_path / d.name
    shutil.copytree(d, j, ignore=shutil.ignore_patterns("tokenizer.model", "*.safetensors", "*.npz"))
    a = vocab_metadata(d, _n_vocab(d), _arch(d))
    b = vocab_metadata(j, _n_vocab(d), _arch(d))
    assert b[K.MODEL] == "llama"
    assert b[K.LIST] == a[K.LIST]
    assert b[K.TOKEN_TYPE] == a[K.TOKEN_TYPE]
    assert b.get(K.ADD_PREFIX, True) == a.get(K.ADD_PREFIX, True)
    ta, tb = tokenizer_from_metadata(a), tokenizer_from_metadata(b)
    for text in CORPUS:
        for ps in (False, True):
            assert tb.encode(text, parse_special=ps) == ta.encode(text, parse_special=ps), text


# --------------------------------------------------------------------------- a real vocabulary (SmolLM2)

def _tokenizer_json_from_gguf(meta: dict) -> dict:
    """A byte-level tokenizer.json for a GGUF "gpt2" vocabulary (SmolLM2's pre-tokenizer: digits, then GPT-2)."""
    tokens, types = list(meta[K.LIST]), [int(t) for t in meta[K.TOKEN_TYPE]]
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": types[i] == gguf.TokenType.CONTROL}
             for i, t in enumerate(tokens) if types[i] in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    return {
        "version": "1.0", "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in meta[K.MERGES]]},
    }


def test_smollm2_vocabulary_round_trips(smollm2_path, tmp_path):
    """SmolLM2's GGUF vocabulary written out as HF files and converted back gives the same metadata and ids."""
    orig = GGUFFile(smollm2_path).metadata
    tokens = list(orig[K.LIST])
    d = tmp_path / "smollm2"
    d.mkdir()
    (d / "tokenizer.json").write_text(json.dumps(_tokenizer_json_from_gguf(orig), ensure_ascii=False), "utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_prefix_space": False, "bos_token": tokens[orig[K.BOS_ID]], "eos_token": tokens[orig[K.EOS_ID]],
        "unk_token": tokens[orig[K.UNK_ID]], "pad_token": tokens[orig[K.PAD_ID]],
        "chat_template": orig[K.CHAT_TEMPLATE], "clean_up_tokenization_spaces": False,
        "tokenizer_class": "GPT2Tokenizer"}), "utf-8")
    meta = GGUFFile(str(write_vocab_gguf(d, tmp_path / "v.gguf", len(tokens), "llama"))).metadata
    for key in (K.MODEL, K.PRE, K.BOS_ID, K.EOS_ID, K.UNK_ID, K.PAD_ID, K.ADD_BOS, K.ADD_PREFIX, K.CHAT_TEMPLATE):
        assert meta.get(key) == orig.get(key), key
    assert list(meta[K.LIST]) == tokens
    assert list(meta[K.MERGES]) == list(orig[K.MERGES])
    assert [int(t) for t in meta[K.TOKEN_TYPE]] == [int(t) for t in orig[K.TOKEN_TYPE]]
    a, b = tokenizer_from_metadata(orig), tokenizer_from_metadata(meta)
    for text in CORPUS:
        assert b.encode(text, parse_special=True) == a.encode(text, parse_special=True)


# --------------------------------------------------------------------------- synthetic checkpoints

def _bpe_dir(tmp_path: Path, **changes) -> Path:
    """A copy of the tiny gpt2 checkpoint's tokenizer files, with tokenizer.json fields replaced."""
    src = TINY / "gpt2"
    d = tmp_path / "bpe"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(src / name, d / name)
    tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    model = changes.pop("model", None)
    if model:
        tj["model"].update(model)
    tj.update(changes)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), "utf-8")
    return d


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


_BYTELEVEL_NO_REGEX = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
_HF_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_HF_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_HF_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
             r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
             r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre_tokenizer,model,want", [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, {}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "use_regex": True}]}, {}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [_split(_HF_LLAMA3), _BYTELEVEL_NO_REGEX]}, {"ignore_merges": True},
     "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [_split(_HF_LLAMA3), _BYTELEVEL_NO_REGEX]}, {}, "smaug-bpe"),
    ({"type": "Sequence", "pretokenizers": [_split(_HF_QWEN2), _BYTELEVEL_NO_REGEX]}, {}, "qwen2"),
    ({"type": "Sequence", "pretokenizers": [_split(_HF_GPT4O), _BYTELEVEL_NO_REGEX]}, {}, "gpt-4o"),
], ids=["gpt-2", "smollm", "llama-bpe", "smaug-bpe", "qwen2", "gpt-4o"])
def test_pre_tokenizer_is_identified(tmp_path, pre_tokenizer, model, want):
    d = _bpe_dir(tmp_path, pre_tokenizer=pre_tokenizer, model=model)
    assert vocab_metadata(d, 512, "llama")[K.PRE] == want


def test_unknown_pre_tokenizer_regex(tmp_path):
    d = _bpe_dir(tmp_path, pre_tokenizer={"type": "Sequence", "pretokenizers": [
        _split(r"[a-z]+|[0-9]{1,7}"), _BYTELEVEL_NO_REGEX]})
    with pytest.raises(UnsupportedError) as e:
        vocab_metadata(d, 512, "llama")
    msg = str(e.value)
    assert "tokenizer.json" in msg and "unrecognised BPE pre-tokenizer" in msg and "[a-z]+|[0-9]{1,7}" in msg
    assert "\n" not in msg


def test_padding_to_n_vocab(tmp_path):
    d = _bpe_dir(tmp_path)
    meta = vocab_metadata(d, 520, "gpt2")
    assert len(meta[K.LIST]) == 520
    assert meta[K.LIST][512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert meta[K.TOKEN_TYPE][512:] == [gguf.TokenType.UNUSED] * 8
    tok = tokenizer_from_metadata(meta)  # still loads
    assert tok.n_vocab == 520


def test_vocabulary_larger_than_the_embedding(tmp_path):
    d = _bpe_dir(tmp_path)
    with pytest.raises(EdgeLMError, match=r"tokenizer\.json: token id 511 .* does not fit the model's 500"):
        vocab_metadata(d, 500, "gpt2")


def test_added_token_types(tmp_path):
    d = _bpe_dir(tmp_path, added_tokens=[
        {"id": 509, "content": "<|im_start|>", "special": False},   # looks special -> CONTROL
        {"id": 510, "content": "<think>", "special": False},        # USER_DEFINED
        {"id": 511, "content": "<|endoftext|>", "special": True}])  # CONTROL
    meta = vocab_metadata(d, 512, "qwen3")
    assert meta[K.TOKEN_TYPE][509:] == [gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED, gguf.TokenType.CONTROL]
    assert meta[K.LIST][509:] == ["<|im_start|>", "<think>", "<|endoftext|>"]


def test_special_ids_from_config_and_generation_config(tmp_path):
    d = _bpe_dir(tmp_path)
    (d / "tokenizer_config.json").write_text("{}", "utf-8")
    (d / "config.json").write_text(json.dumps({"bos_token_id": 511, "eos_token_id": [511, 3]}), "utf-8")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [511, 3], "pad_token_id": 2}), "utf-8")
    meta = vocab_metadata(d, 512, "gpt2")
    assert meta[K.BOS_ID] == 511      # config.json
    assert meta[K.EOS_ID] == 511      # config.json's list is ignored (SpecialVocab); generation_config's first
    assert meta[K.PAD_ID] == 2


def test_special_tokens_map_and_added_token_dicts(tmp_path):
    d = _bpe_dir(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True}}), "utf-8")
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<|endoftext|>"}), "utf-8")
    meta = vocab_metadata(d, 512, "gpt2")
    assert meta[K.EOS_ID] == 511 and meta[K.PAD_ID] == 511


@pytest.mark.parametrize("how", ["string", "list", "jinja", "jinja+additional"])
def test_chat_template_forms(tmp_path, how):
    d = _bpe_dir(tmp_path)
    cfg = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg.pop("chat_template", None)
    if how == "string":
        cfg["chat_template"] = "{{ messages }}"
    elif how == "list":
        cfg["chat_template"] = [{"name": "default", "template": "{{ a }}"}, {"name": "tool_use", "template": "{{ b }}"}]
    else:
        (d / "chat_template.jinja").write_text("{{ c }}", "utf-8")
        if how == "jinja+additional":
            (d / "additional_chat_templates").mkdir()
            (d / "additional_chat_templates" / "rag.jinja").write_text("{{ r }}", "utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), "utf-8")
    meta = GGUFFile(str(write_vocab_gguf(d, tmp_path / "v.gguf", 512, "gpt2"))).metadata
    want = {"string": "{{ messages }}", "list": "{{ a }}", "jinja": "{{ c }}", "jinja+additional": "{{ c }}"}[how]
    assert meta[K.CHAT_TEMPLATE] == want
    if how == "list":
        assert meta["tokenizer.chat_template.tool_use"] == "{{ b }}"
        assert list(meta[K.CHAT_TEMPLATES]) == ["tool_use"]
    if how == "jinja+additional":
        assert meta["tokenizer.chat_template.rag"] == "{{ r }}"


# --------------------------------------------------------------------------- errors

def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}", "utf-8")
    with pytest.raises(EdgeLMError) as e:
        vocab_metadata(tmp_path, 512, "llama")
    assert "no tokenizer.json or tokenizer.model" in _one_line(e)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled"

    class Boom:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("pytorch_model.bin", "tokenizer.bin", "tokenizer.pkl"):
        (tmp_path / name).write_bytes(pickle.dumps(Boom()))
    with pytest.raises(EdgeLMError) as e:
        vocab_metadata(tmp_path, 512, "llama")
    assert "no tokenizer.json or tokenizer.model" in _one_line(e)
    assert not marker.exists()


def test_malformed_json(tmp_path):
    d = _bpe_dir(tmp_path)
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE", ', "utf-8")
    with pytest.raises(EdgeLMError) as e:
        vocab_metadata(d, 512, "gpt2")
    msg = _one_line(e)
    assert "tokenizer.json" in msg and "malformed JSON" in msg


def test_malformed_tokenizer_config(tmp_path):
    d = _bpe_dir(tmp_path)
    (d / "tokenizer_config.json").write_text("{'bos_token': 1}", "utf-8")
    with pytest.raises(EdgeLMError) as e:
        vocab_metadata(d, 512, "gpt2")
    assert "tokenizer_config.json" in _one_line(e)


@pytest.mark.parametrize("mtype,hint", [("WordPiece", "WordPiece"), ("Unigram", "tokenizer.model")])
def test_unsupported_model_type(tmp_path, mtype, hint):
    d = _bpe_dir(tmp_path, model={"type": mtype})
    with pytest.raises(UnsupportedError) as e:
        vocab_metadata(d, 512, "llama")
    msg = _one_line(e)
    assert "tokenizer.json" in msg and hint in msg


def test_corrupt_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00not a sentencepiece model\xff" * 4)
    with pytest.raises(EdgeLMError) as e:
        vocab_metadata(tmp_path, 512, "llama")
    assert "tokenizer.model" in _one_line(e)


def test_corrupt_tokenizer_model_next_to_tokenizer_json(tmp_path):
    """A tokenizer.model that is not SentencePiece (e.g. tiktoken) is skipped when tokenizer.json is there."""
    d = _bpe_dir(tmp_path)
    (d / "tokenizer.model").write_bytes(b"IQ== 0\nIg== 1\n")
    assert vocab_metadata(d, 512, "llama")[K.MODEL] == "gpt2"
