"""A Hugging Face checkpoint's tokenizer -> GGUF `tokenizer.*` metadata, as llama.cpp's converter writes it.

    add_vocab(writer, hf_dir, n_vocab, arch)    # writer: gguf.GGUFWriter
    vocab_metadata(hf_dir, n_vocab, arch)       # the same, as {GGUF key: value}

Sources, in llama.cpp's order of preference (convert_hf_to_gguf.py, LlamaModel.set_vocab / Gemma3Model.set_vocab):
  - tokenizer.model (SentencePiece, read with the `sentencepiece` package) -> "llama", as
    TextModel._create_vocab_sentencepiece / _set_vocab_sentencepiece do it;
  - tokenizer.json with a byte-level BPE model -> "gpt2", as TextModel.get_vocab_base / _set_vocab_gpt2;
  - tokenizer.json with a SentencePiece-style BPE (byte_fallback, "▁" for spaces) -> "llama", as
    TextModel._set_vocab_llama_hf (gguf-py vocab.py LlamaHfVocab), except for the scores (see _llama_hf).
Special token ids, add_bos/add_eos/add_sep and the chat template follow gguf-py's gguf/vocab.py SpecialVocab;
key names are gguf-py's constants (Keys.Tokenizer).

Where llama.cpp needs the `transformers`/`tokenizers` libraries we read the JSON files ourselves:
  - tokenizer.ggml.pre: llama.cpp hashes the HF tokenizer's ids for a check text (get_vocab_base_pre). We read
    the pre-tokenizer from tokenizer.json instead and match its regexes against the ones edgelm's BPE
    tokenizer implements (edgelm.tokenizer.bpe.PRE_REGEXES / PreTokenizer.NAMES).
  - the added-token list (AutoTokenizer.added_tokens_decoder) is tokenizer.json's "added_tokens".
Nothing is unpickled: only JSON and the SentencePiece protobuf are read.

Facts carried over from llama.cpp, the code is ours; the functions below name the llama.cpp function whose
behaviour they reproduce.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import gguf

from ...errors import EdgeLMError, UnsupportedError
from ...tokenizer.bpe import PRE_REGEXES, PreTokenizer

log = logging.getLogger(__name__)

K = gguf.Keys.Tokenizer

# gguf-py constants.TokenType
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_SPACE = "\u2581"  # "▁", SentencePiece's escaped space

# SpecialVocab's default special token types (gguf-py vocab.py SpecialVocab.__init__), and the writer key of
# each (SpecialVocab.add_to_gguf calls GGUFWriter.add_{typ}_token_id; "cls" has no handler and is skipped).
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
            "mask": K.MASK_ID, "eot": K.EOT_ID, "eom": K.EOM_ID}
_ADD_KEYS = {"bos": K.ADD_BOS, "eos": K.ADD_EOS, "sep": K.ADD_SEP}


# --------------------------------------------------------------------------- entry points

def add_vocab(writer: gguf.GGUFWriter, hf_dir: Path, n_vocab: int, arch: str) -> None:
    """Write the tokenizer of the checkpoint in `hf_dir` into `writer` (GGUF `tokenizer.*` keys).

    n_vocab is the number of embedding rows: the vocabulary is padded to it with "[PAD{id}]" tokens of type
    UNUSED, as llama.cpp does. arch is the GGUF architecture name (general.architecture), for the few
    per-architecture choices llama.cpp makes. Raises EdgeLMError / UnsupportedError naming the file.
    """
    # keys with their own GGUFWriter method (which knows the value type); the rest are ids and flags
    typed = {K.MODEL: writer.add_tokenizer_model, K.PRE: writer.add_tokenizer_pre, K.LIST: writer.add_token_list,
             K.TOKEN_TYPE: writer.add_token_types, K.SCORES: writer.add_token_scores,
             K.MERGES: writer.add_token_merges,
             K.CHAT_TEMPLATE: writer.add_chat_template}   # a string, or a list of {"name", "template"}
    for key, value in vocab_metadata(hf_dir, n_vocab, arch).items():
        if key in typed:
            typed[key](value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)  # the ..._token_id keys (GGUFWriter.add_bos_token_id etc.)
        else:  # vocab_metadata only produces the types above
            raise TypeError(f"unexpected metadata value for {key}: {value!r}")


def vocab_metadata(hf_dir: Path, n_vocab: int, arch: str) -> dict[str, Any]:
    """The GGUF tokenizer metadata for the checkpoint in `hf_dir` (what add_vocab writes), in write order."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise EdgeLMError(f"{hf_dir}: not a directory")
    n_vocab = int(n_vocab)
    if n_vocab <= 0:
        raise EdgeLMError(f"{hf_dir}: n_vocab must be positive, got {n_vocab}")
    files = _Files(hf_dir)

    meta: dict[str, Any] = {}
    sp_path = hf_dir / "tokenizer.model"
    tj_path = hf_dir / "tokenizer.json"
    sp = _load_sentencepiece(sp_path, have_alternative=tj_path.is_file()) if sp_path.is_file() else None
    if sp is not None:
        kind = "spm"
        _sentencepiece(*sp, sp_path, files, n_vocab, meta)
    elif tj_path.is_file():
        tj = files.tokenizer_json()
        model = tj.get("model")
        if not isinstance(model, dict):
            raise EdgeLMError(f"{tj_path}: no \"model\" object")
        mtype = model.get("type")
        if mtype != "BPE":
            hint = " (a Unigram tokenizer needs its tokenizer.model)" if mtype == "Unigram" else ""
            raise UnsupportedError(
                f"{tj_path}: tokenizer model type {mtype!r} is not supported; edgelm reads byte-level BPE and "
                f"SentencePiece-style BPE{hint}")
        if _is_byte_level(tj):
            kind = "bpe"
            _gpt2(tj, files, n_vocab, meta)
        elif model.get("byte_fallback") or _uses_metaspace(tj):
            kind = "llama_hf"
            _llama_hf(tj, files, n_vocab, meta)
        else:
            raise UnsupportedError(
                f"{tj_path}: a BPE tokenizer that is neither byte-level (ByteLevel pre-tokenizer/decoder) nor "
                f"SentencePiece-style (byte_fallback, \"▁\" for spaces) is not supported")
    else:
        present = sorted(p.name for p in hf_dir.iterdir() if p.is_file())
        shown = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "")
        raise EdgeLMError(
            f"{hf_dir}: no tokenizer.json or tokenizer.model (files: {shown or 'none'}); edgelm converts "
            f"tokenizers only from those two files")

    tokens: list[str] = meta[K.LIST]
    _special_vocab(files, tokens, n_vocab, load_merges=(kind == "bpe"), meta=meta)
    _arch_overrides(files, kind, n_vocab, arch, meta)
    _check_unique(tokens, hf_dir)
    return meta


# --------------------------------------------------------------------------- files

class _Files:
    """The checkpoint's JSON files, each parsed once; malformed JSON is an EdgeLMError naming the file."""

    def __init__(self, root: Path):
        self.root = root
        self._cache: dict[str, Any] = {}

    def json(self, name: str) -> Any | None:
        if name not in self._cache:
            path = self.root / name
            self._cache[name] = _read_json(path) if path.is_file() else None
        return self._cache[name]

    def obj(self, name: str) -> dict | None:
        data = self.json(name)
        if data is not None and not isinstance(data, dict):
            raise EdgeLMError(f"{self.root / name}: expected a JSON object, got {type(data).__name__}")
        return data

    def tokenizer_json(self) -> dict:
        data = self.obj("tokenizer.json")
        if data is None:
            raise EdgeLMError(f"{self.root / 'tokenizer.json'}: file not found")
        return data

    def text(self, name: str) -> str | None:
        path = self.root / name
        if not path.is_file():
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeLMError(f"{path}: cannot read: {e}") from None


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise EdgeLMError(f"{path}: malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise EdgeLMError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise EdgeLMError(f"{path}: cannot read: {e.strerror or e}") from None


def _content(entry: Any) -> str | None:
    """A special-token entry of tokenizer_config.json / special_tokens_map.json: a string or an AddedToken dict."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _added_tokens(tj: dict | None, where: Path) -> list[dict]:
    """tokenizer.json "added_tokens": [{"id", "content", "special", ...}], checked."""
    if tj is None:
        return []
    added = tj.get("added_tokens") or []
    if not isinstance(added, list) or not all(
            isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str)
            for a in added):
        raise EdgeLMError(f"{where}: \"added_tokens\" must be a list of {{\"id\", \"content\", ...}} objects")
    return added


# --------------------------------------------------------------------------- token types

def does_token_look_special(text: str) -> bool:
    """llama.cpp TextModel.does_token_look_special: added tokens that are control tokens in all but name."""
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))  # deepseek-coder's fullwidth bars
            or (text.startswith("<unused") and text.endswith(">")))     # gemma


def _added_type(text: str, special: bool) -> tuple[str, int]:
    """(text, type) of an added token (get_vocab_base / _create_vocab_sentencepiece): special or special-looking
    ones are CONTROL; the others USER_DEFINED, with "▁" turned back into spaces (llama.cpp matches
    user-defined tokens in the raw text)."""
    if special or does_token_look_special(text):
        return text, CONTROL
    return text.replace(_SPACE, " "), USER_DEFINED


# --------------------------------------------------------------------------- SentencePiece (tokenizer.model)

def _load_sentencepiece(path: Path, have_alternative: bool):
    import sentencepiece

    try:
        data = path.read_bytes()
    except OSError as e:
        raise EdgeLMError(f"{path}: cannot read: {e.strerror or e}") from None
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(data)
    except (RuntimeError, OSError) as e:  # sentencepiece's parse errors (long multi-line messages)
        if have_alternative:
            # e.g. a tiktoken-format tokenizer.model next to a tokenizer.json: use the JSON
            log.warning("%s is not a SentencePiece model (%s); using tokenizer.json", path,
                        str(e).splitlines()[0][:100] if str(e) else type(e).__name__)
            return None
        raise EdgeLMError(f"{path}: not a SentencePiece model ({type(e).__name__})") from None
    return sp, _spm_header(data)


def _spm_header(data: bytes) -> dict[str, Any]:
    """trainer_spec.model_type and normalizer_spec.add_dummy_prefix from a SentencePiece ModelProto.

    The sentencepiece package does not expose them (only through the protobuf package, which we do not depend
    on), so this walks the protobuf wire format (sentencepiece_model.proto: ModelProto field 2 trainer_spec,
    field 3 normalizer_spec; TrainerSpec field 3 model_type, UNIGRAM=1 BPE=2 WORD=3 CHAR=4, default UNIGRAM;
    NormalizerSpec field 3 add_dummy_prefix, default true).
    """
    out: dict[str, Any] = {"model_type": 1, "add_dummy_prefix": True}
    try:
        for field, value in _pb_fields(data):
            if field == 2 and isinstance(value, bytes):
                for f2, v2 in _pb_fields(value):
                    if f2 == 3 and isinstance(v2, int):
                        out["model_type"] = v2
            elif field == 3 and isinstance(value, bytes):
                for f2, v2 in _pb_fields(value):
                    if f2 == 3 and isinstance(v2, int):
                        out["add_dummy_prefix"] = bool(v2)
    except (IndexError, ValueError):
        pass  # sentencepiece accepted the file; keep the defaults
    return out


def _pb_fields(buf: bytes):
    """(field number, int or bytes) for each top-level field of a protobuf message."""
    pos, n = 0, len(buf)

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7

    while pos < n:
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            yield field, varint()
        elif wire == 2:
            length = varint()
            if pos + length > n:
                raise ValueError("truncated")
            yield field, buf[pos:pos + length]
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"wire type {wire}")


def _sentencepiece(sp, proto: dict, sp_path: Path, files: _Files, n_vocab: int, meta: dict) -> None:
    """llama.cpp TextModel._create_vocab_sentencepiece + _set_vocab_sentencepiece (and Phi3MiniModel.set_vocab,
    which also reads tokenizer.json's added tokens)."""
    n_sp = sp.vocab_size()
    if n_sp > n_vocab:
        log.warning("%s has %d pieces; ids from %d on do not fit the %d embedding rows and are dropped",
                    sp_path, n_sp, n_vocab, n_vocab)
    if proto["model_type"] != 2:
        names = {1: "Unigram", 3: "word", 4: "char"}
        log.warning("%s is a SentencePiece %s model; edgelm (like llama.cpp's \"llama\" vocabulary) tokenizes it "
                    "by merging pieces by score, which can differ from SentencePiece's own segmentation",
                    sp_path, names.get(proto["model_type"], str(proto["model_type"])))

    # every id starts as padding; ids the tokenizer does not fill stay "[PAD{id}]" UNUSED
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    scores = [-10000.0] * n_vocab
    types = [UNUSED] * n_vocab
    for i in range(min(n_sp, n_vocab)):
        if sp.IsUnknown(i):
            t = UNKNOWN
        elif sp.IsControl(i):
            t = CONTROL
        elif sp.IsUnused(i):
            t = UNUSED
        elif sp.IsByte(i):
            t = BYTE
        else:
            t = NORMAL  # llama.cpp leaves SentencePiece's user-defined pieces NORMAL too
        tokens[i] = sp.IdToPiece(i)
        scores[i] = float(sp.GetScore(i))
        types[i] = t

    def put(tid: int, text: str, t: int, where: str) -> None:
        if not 0 <= tid < n_vocab:
            log.warning("%s: ignoring added token %r: id %d is out of range (n_vocab %d)", where, text, tid, n_vocab)
            return
        tokens[tid], scores[tid], types[tid] = text, -1000.0, t

    # added_tokens.json {content: id}: USER_DEFINED
    added_json = files.obj("added_tokens.json")
    if added_json:
        for text, tid in added_json.items():
            if not isinstance(tid, int):
                raise EdgeLMError(f"{files.root / 'added_tokens.json'}: id of {text!r} is not an integer")
            put(tid, text, USER_DEFINED, "added_tokens.json")

    # tokenizer_config.json added_tokens_decoder {id: {"content", "special"}}; transformers 5 no longer writes
    # it, so tokenizer.json's added_tokens (which Phi3MiniModel.set_vocab also reads) cover the remaining ids
    config = files.obj("tokenizer_config.json") or {}
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise EdgeLMError(f"{files.root / 'tokenizer_config.json'}: added_tokens_decoder is not an object")
    done: set[int] = set()
    for key, data in decoder.items():
        try:
            tid = int(key)
        except ValueError:
            raise EdgeLMError(f"{files.root / 'tokenizer_config.json'}: added_tokens_decoder key {key!r} "
                              f"is not an id") from None
        text = _content(data)
        if text is None:
            raise EdgeLMError(f"{files.root / 'tokenizer_config.json'}: added_tokens_decoder[{key}] has no content")
        put(tid, *_added_type(text, isinstance(data, dict) and bool(data.get("special"))), "tokenizer_config.json")
        done.add(tid)
    tj = files.obj("tokenizer.json")
    for a in _added_tokens(tj, files.root / "tokenizer.json"):
        if a["id"] not in done:
            put(a["id"], *_added_type(a["content"], bool(a.get("special"))), "tokenizer.json")

    meta[K.MODEL] = "llama"
    meta[K.PRE] = "default"
    meta[K.LIST] = tokens
    meta[K.SCORES] = scores
    meta[K.TOKEN_TYPE] = types
    if not proto["add_dummy_prefix"]:
        # llama.cpp writes this for the families whose tokenizer.model has no dummy prefix (Gemma*: see
        # _arch_overrides); we take it from the model itself, which is what SentencePiece does
        meta[K.ADD_PREFIX] = False


# --------------------------------------------------------------------------- tokenizer.json

def _components(node: Any) -> list[dict]:
    """A pre-tokenizer / normalizer / decoder node flattened through "Sequence"."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        inner = node.get("pretokenizers") or node.get("normalizers") or node.get("decoders") or []
        return [c for n in inner for c in _components(n)]
    return [node]


def _is_byte_level(tj: dict) -> bool:
    return any(c.get("type") == "ByteLevel"
               for c in _components(tj.get("pre_tokenizer")) + _components(tj.get("decoder")))


def _uses_metaspace(tj: dict) -> bool:
    if any(c.get("type") == "Metaspace" for c in _components(tj.get("pre_tokenizer"))):
        return True
    return any(c.get("type") == "Replace" and c.get("content") == _SPACE for c in _components(tj.get("normalizer")))


def _vocab_by_id(tj: dict, where: Path, n_vocab: int) -> tuple[dict[int, str], list[dict]]:
    """id -> token text over the model vocabulary and the added tokens (HF's tokenizer.vocab)."""
    vocab = tj["model"].get("vocab")
    if not isinstance(vocab, dict):
        raise EdgeLMError(f"{where}: model.vocab is not an object of token -> id")
    by_id: dict[int, str] = {}
    for text, tid in vocab.items():
        if not isinstance(tid, int) or tid < 0:
            raise EdgeLMError(f"{where}: bad id {tid!r} for token {text!r}")
        by_id[tid] = text
    added = _added_tokens(tj, where)
    for a in added:
        if a["id"] < 0:
            raise EdgeLMError(f"{where}: bad id {a['id']} for added token {a['content']!r}")
        by_id[a["id"]] = a["content"]
    top = max(by_id, default=-1)
    if top >= n_vocab:
        raise EdgeLMError(f"{where}: token id {top} ({by_id[top]!r}) does not fit the model's {n_vocab} "
                          f"embedding rows")
    return by_id, added


def _merge_pairs(tj: dict, where: Path) -> list[tuple[str, str]]:
    """model.merges as (left, right) pairs; both the "a b" and the ["a", "b"] forms."""
    merges = tj["model"].get("merges") or []
    if not isinstance(merges, list):
        raise EdgeLMError(f"{where}: model.merges is not a list")
    pairs: list[tuple[str, str]] = []
    for m in merges:
        if isinstance(m, str):
            # "a b", split at the first space after position 0, as llama.cpp reads GGUF merges
            i = m.find(" ", 1)
            if i < 0:
                raise EdgeLMError(f"{where}: malformed merge {m!r}")
            left, right = m[:i], m[i + 1:]
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m):
            left, right = m
        else:
            raise EdgeLMError(f"{where}: unknown merge format {m!r}")
        pairs.append((left, right))
    return pairs


def _gpt2(tj: dict, files: _Files, n_vocab: int, meta: dict) -> None:
    """llama.cpp TextModel._set_vocab_gpt2 / get_vocab_base over tokenizer.json."""
    where = files.root / "tokenizer.json"
    by_id, added = _vocab_by_id(tj, where, n_vocab)
    # added_vocab = AutoTokenizer.get_added_vocab(): content -> special flag (the first entry of a content wins)
    added_special: dict[str, bool] = {}
    for a in added:
        added_special.setdefault(a["content"], bool(a.get("special")))
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif text in added_special:
            # (llama.cpp first decodes non-normalized added tokens through the HF tokenizer: a no-op for
            # byte-level BPE, whose decoder returns an added token's content unchanged)
            text, t = _added_type(text, added_special[text])
            tokens.append(text)
            types.append(t)
        else:
            tokens.append(text)
            types.append(NORMAL)
    meta[K.MODEL] = "gpt2"
    meta[K.PRE] = identify_pre(tj, files)
    meta[K.LIST] = tokens
    meta[K.TOKEN_TYPE] = types


def _llama_hf(tj: dict, files: _Files, n_vocab: int, meta: dict) -> None:
    """llama.cpp TextModel._set_vocab_llama_hf (gguf-py LlamaHfVocab) over tokenizer.json.

    Tokens: the model vocabulary, "<0xXX>" as BYTE, then the added tokens typed as get_vocab_base /
    _create_vocab_sentencepiece type them (special -> CONTROL, else USER_DEFINED), padded to n_vocab.

    Scores: LlamaHfVocab gives every token -1000.0. llama.cpp's (and edgelm's) "llama" tokenizer merges the
    adjacent pair whose concatenation has the highest score, leftmost first on ties, so with equal scores it
    merges left to right and does not reproduce the BPE. We give each token minus the rank of the first merge
    that produces it, so that the highest-scoring mergeable pair is the lowest-ranked merge, which is the
    order Hugging Face's BPE applies merges in; tokens no merge produces (characters, bytes, added tokens) get
    -1000.0 like llama.cpp, or lower than every merge when they are longer than one character.
    """
    where = files.root / "tokenizer.json"
    by_id, added = _vocab_by_id(tj, where, n_vocab)
    pairs = _merge_pairs(tj, where)
    rank: dict[str, int] = {}
    for r, (left, right) in enumerate(pairs):
        rank.setdefault(left + right, r)
    floor = -1000.0 - float(len(pairs))

    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    byte_re = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            scores.append(-1000.0)
            types.append(UNUSED)
            continue
        r = rank.get(text)
        tokens.append(text)
        scores.append(-float(r) if r is not None else (-1000.0 if len(text) <= 1 else floor))
        types.append(BYTE if byte_re.fullmatch(text) else NORMAL)
    for a in added:
        tid = a["id"]
        text, t = _added_type(a["content"], bool(a.get("special")))
        tokens[tid], scores[tid], types[tid] = text, -1000.0, t

    meta[K.MODEL] = "llama"
    meta[K.PRE] = "default"
    meta[K.LIST] = tokens
    meta[K.SCORES] = scores
    meta[K.TOKEN_TYPE] = types
    if not _hf_prepends_space(tj):
        meta[K.ADD_PREFIX] = False


def _hf_prepends_space(tj: dict) -> bool:
    """Does the tokenizer.json put a "▁" in front of the text (Prepend normalizer, or Metaspace with a prefix)?"""
    for c in _components(tj.get("normalizer")):
        if c.get("type") == "Prepend" and c.get("prepend") == _SPACE:
            return True
    for c in _components(tj.get("pre_tokenizer")):
        if c.get("type") == "Metaspace":
            scheme = c.get("prepend_scheme")
            if scheme is None:
                return bool(c.get("add_prefix_space", True))
            return scheme in ("first", "always")
    return False


# --------------------------------------------------------------------------- tokenizer.ggml.pre

# Hugging Face's spellings of regex parts that llama.cpp rewrote (src/llama-vocab.cpp keeps the tokenizer.json
# originals in comments): case-insensitive contractions and the GPT-4o / Tekken letter classes.
_HF_REWRITES = (
    ("(?i:'s|'t|'re|'ve|'m|'ll|'d)", "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"),
    (r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]", r"((?=[\p{L}])([^a-z]))"),
    (r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]", r"((?=[\p{L}])([^A-Z]))"),
)
# tokenizers' ByteLevel pre-tokenizer regex (use_regex=true); edgelm's "gpt2" pattern is the same without
# the final "|\s+" (a lone whitespace run is then an unmatched piece, which gives the same split).
_HF_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_EDGELM_GPT2 = PRE_REGEXES["gpt2"][0]

# the name written for each pre-tokenizer family (llama.cpp's name for the model that defines it), then the
# other names of the family in order of preference
_PREFERRED = {
    "default": ("default",), "gpt2": ("gpt-2",), "smollm": ("smollm", "starcoder"),
    "llama3": ("llama-bpe", "smaug-bpe", "dbrx"), "qwen2": ("qwen2", "stablelm2"), "falcon": ("falcon",),
    "poro": ("bloom", "poro-chat"), "viking": ("viking",), "tekken": ("tekken",), "gpt4o": ("gpt-4o",),
    "deepseek-coder": ("deepseek-coder",),
}


def _normalize_regex(p: str) -> str:
    for hf, ours in _HF_REWRITES:
        p = p.replace(hf, ours)
    return _EDGELM_GPT2 if p == _HF_GPT2 else p


def pre_regexes(tj: dict, where: Path) -> list[str]:
    """The regexes a tokenizer.json pre-tokenizer splits with, in order, spelled as edgelm spells them."""
    out: list[str] = []
    for c in _components(tj.get("pre_tokenizer")):
        t = c.get("type")
        if t == "ByteLevel":
            if c.get("add_prefix_space"):
                raise UnsupportedError(f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true is not "
                                       f"supported (llama.cpp has no such pre-tokenizer)")
            if c.get("use_regex", True):
                out.append(_HF_GPT2)
        elif t == "Split":
            pat = c.get("pattern") or {}
            if "Regex" in pat:
                p = pat["Regex"]
            elif "String" in pat:
                p = re.escape(pat["String"])
            else:
                raise EdgeLMError(f"{where}: Split pre-tokenizer without a pattern")
            if c.get("behavior", "Isolated") != "Isolated" or c.get("invert"):
                raise UnsupportedError(f"{where}: Split pre-tokenizer with behavior {c.get('behavior')!r}"
                                       f"{' inverted' if c.get('invert') else ''} is not supported "
                                       f"(pattern {_short(p)})")
            out.append(p)
        elif t == "Digits":
            out.append(r"\p{N}" if c.get("individual_digits") else r"\p{N}+")
        else:
            raise UnsupportedError(f"{where}: pre-tokenizer {t!r} is not supported")
    return [_normalize_regex(p) for p in out]


def identify_pre(tj: dict, files: _Files) -> str:
    """tokenizer.ggml.pre for a byte-level BPE tokenizer.json.

    llama.cpp identifies it by hashing the HF tokenizer's ids (get_vocab_base_pre); we match the
    pre-tokenizer's regexes against those of edgelm's pre-tokenizer families and write llama.cpp's name for
    the model that defines the family ("gpt-2", "llama-bpe", "qwen2", "smollm", ...). Within a family the
    names differ in flags; the one that changes ids, ignore_merges, is taken from tokenizer.json
    (model.ignore_merges: Llama 3's "llama-bpe" has it, "smaug-bpe" not). The other flag, llama.cpp's
    clean-up of spaces when detokenizing, is not used by edgelm's decoder.
    """
    where = files.root / "tokenizer.json"
    regexes = pre_regexes(tj, where)
    if not regexes:
        raise UnsupportedError(f"{where}: byte-level BPE without a splitting pre-tokenizer is not supported")
    families = [f for f, rx in PRE_REGEXES.items() if list(rx) == regexes]
    if not families:
        shown = " | ".join(_short(p) for p in regexes)
        raise UnsupportedError(f"{where}: unrecognised BPE pre-tokenizer (regexes: {shown}); edgelm knows: "
                               + ", ".join(sorted(PRE_REGEXES)))
    family = families[0]
    # e[4]: "no BOS by default", GLM's names only; never chosen from the regexes alone
    names = [n for n, e in PreTokenizer.NAMES.items() if e[0] == family and not e[4]]
    pref = _PREFERRED.get(family, ())
    ordered = [n for n in pref if n in names] + [n for n in names if n not in pref]
    ignore_merges = bool(tj["model"].get("ignore_merges", False))
    matching = [n for n in ordered if PreTokenizer.NAMES[n][1] == ignore_merges]
    if not matching:
        log.warning("%s: ignore_merges=%s, which no llama.cpp name of the %r pre-tokenizer has; using %r",
                    where, ignore_merges, family, ordered[0])
        return ordered[0]
    return matching[0]


def _short(p: str, n: int = 60) -> str:
    return repr(p if len(p) <= n else p[:n] + "...")


# --------------------------------------------------------------------------- special tokens (SpecialVocab)

def _special_vocab(files: _Files, tokens: list[str], n_vocab: int, load_merges: bool, meta: dict) -> None:
    """gguf-py vocab.py SpecialVocab: merges, special token ids, add_*_token flags, chat template.

    Beyond SpecialVocab (which only resolves token strings through tokenizer.json's added tokens, and reads
    ids from config.json): a type still unset is then looked up by its text in special_tokens_map.json and
    tokenizer_config.json against the final token list, and last in generation_config.json.
    """
    root = files.root
    tj = files.obj("tokenizer.json")
    config = files.obj("tokenizer_config.json")
    types = list(_SPECIAL_TYPES)
    ids: dict[str, int] = {}
    add: dict[str, bool] = {}

    def set_id(typ: str, tid: Any, source: str) -> None:
        # SpecialVocab._set_special_token: integers only, first one wins, out-of-range ones are skipped
        if not isinstance(tid, int) or isinstance(tid, bool):
            return
        if tid < 0:
            raise EdgeLMError(f"{root / source}: invalid id for the {typ} token: {tid}")
        if tid >= n_vocab:
            log.warning("%s: %s token id %d is out of range (n_vocab %d); skipped", root / source, typ, tid, n_vocab)
            return
        ids.setdefault(typ, tid)

    merges: list[str] = []
    added: list[dict] = []
    if tj is not None:
        if load_merges:
            merges = [_gguf_merge(left, right) for left, right in _merge_pairs(tj, root / "tokenizer.json")]
        added = _added_tokens(tj, root / "tokenizer.json")
        cfg = config if config is not None else {}
        # SpecialVocab compares token texts; AddedToken dicts in tokenizer_config.json count by their content
        special_bos, special_cls = _content(cfg.get("bos_token")), _content(cfg.get("cls_token"))
        special_eos, special_sep = _content(cfg.get("eos_token")), _content(cfg.get("sep_token"))
        if not special_bos and special_cls and config:
            config["bos_token"] = special_bos = special_cls
        if not special_eos and special_sep and config:
            config["eos_token"] = special_eos = special_sep
        post = tj.get("post_processor")
        if isinstance(post, dict) and post:
            for proc in post.get("processors", [post]):
                if not isinstance(proc, dict):
                    continue
                if proc.get("type") == "RobertaProcessing":
                    add["bos"] = add["eos"] = add["sep"] = True
                    if not special_cls and config:
                        special_cls = (proc.get("cls") or [special_bos])[0]
                        config["cls_token"] = special_cls
                    if not special_sep and config:
                        special_sep = (proc.get("sep") or [special_eos])[0]
                        config["sep_token"] = special_sep
                    continue
                if proc.get("type") == "TemplateProcessing":
                    special_bos, special_eos, special_sep = _template_processing(
                        proc, config, types, add, special_bos, special_cls, special_eos, special_sep)

    if config is None:
        # SpecialVocab stops here without tokenizer_config.json; we still read a chat_template.jinja
        template = _chat_template(files, None)
    else:
        template = _chat_template(files, config)
        for typ in types:
            flag = config.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                add[typ] = flag
            text = _content(config.get(f"{typ}_token"))
            if text is None:
                continue
            tid = next((a.get("id") for a in added if a.get("content") == text), None)
            set_id(typ, tid, "tokenizer_config.json")

    # config.json {typ}_token_id, also under text_config (SpecialVocab._try_load_from_config_json)
    cfg_json = files.obj("config.json")
    if cfg_json is not None:
        text_config = cfg_json.get("text_config") if isinstance(cfg_json.get("text_config"), dict) else {}
        for typ in types:
            tid = cfg_json.get(f"{typ}_token_id")
            if tid is None:
                tid = text_config.get(f"{typ}_token_id")
            set_id(typ, tid, "config.json")

    # our additions: token texts resolved against the final vocabulary, then generation_config.json
    first_id: dict[str, int] = {}
    for i, t in enumerate(tokens):
        first_id.setdefault(t, i)
    stm = files.obj("special_tokens_map.json") or {}
    for typ in types:
        if typ in ids:
            continue
        for source, data in (("tokenizer_config.json", config or {}), ("special_tokens_map.json", stm)):
            text = _content(data.get(f"{typ}_token"))
            if text is not None and text in first_id:
                set_id(typ, first_id[text], source)
                break
    gen = files.obj("generation_config.json") or {}
    for typ in ("bos", "eos", "pad"):
        tid = gen.get(f"{typ}_token_id")
        if isinstance(tid, list) and tid:
            tid = tid[0]
        if typ not in ids:
            set_id(typ, tid, "generation_config.json")

    # SpecialVocab.add_to_gguf order: merges, ids, add_* flags, chat template
    if merges:
        meta[K.MERGES] = merges
    elif load_merges:
        log.warning("%s: no merges found; the BPE vocabulary will not merge anything", root / "tokenizer.json")
    for typ, tid in ids.items():
        key = _ID_KEYS.get(typ)
        if key is not None:  # "cls" has no GGUF key
            meta[key] = tid
    for typ, value in add.items():
        key = _ADD_KEYS.get(typ)
        if key is not None:
            meta[key] = value
    if template is not None:
        meta[K.CHAT_TEMPLATE] = template


def _gguf_merge(left: str, right: str) -> str:
    # gguf-py SpecialVocab: the pair form may hold spaces (transformers >= 4.45); GGUF merges are "a b" strings,
    # so a space inside a part is written as U+0120 ("Ġ", GPT-2's byte-level space)
    if " " in left or " " in right:
        left, right = left.replace(" ", "\u0120"), right.replace(" ", "\u0120")
    return f"{left} {right}"


def _template_processing(proc: dict, config: dict | None, types: list[str], add: dict[str, bool],
                         special_bos, special_cls, special_eos, special_sep):
    """SpecialVocab's crude reading of a TemplateProcessing post-processor: a leading special token means add_bos,
    a trailing one add_eos (a trailing token other than eos_token becomes the EOS, the old EOS the EOT/EOM), and
    a special token between A and B in the pair template add_sep."""
    def special_id(item: Any) -> str | None:
        return item.get("SpecialToken", {}).get("id") if isinstance(item, dict) else None

    def seq_id(item: Any) -> str | None:
        return item.get("Sequence", {}).get("id") if isinstance(item, dict) else None

    single = proc.get("single") or []
    pair = proc.get("pair") or []
    first = last = None
    if len(single) > 1:
        first = special_id(single[0])
        if first:
            if not config:
                special_bos = first
            add["bos"] = first in (special_bos, special_cls)
            if first not in (special_bos, special_cls):
                log.warning("unknown leading special token %r in TemplateProcessing<single>", first)
        last = special_id(single[-1])
        if last:
            if not config:
                special_eos = last
            elif last != special_eos:
                if "eot" not in types:
                    types.append("eot")
                    config["eot_token"] = special_eos
                elif "eom" not in types:
                    types.append("eom")
                    config["eom_token"] = special_eos
                else:
                    log.warning("overriding EOS token %r with %r without EOT/EOM fallback", special_eos, last)
                config["eos_token"] = special_eos = last
            add["eos"] = last == special_eos
    if pair:
        start = 1 if first and special_id(pair[0]) == first else 0
        stop = -1 if last and special_id(pair[-1]) == last else None
        middle = pair[start:stop]
        if middle and seq_id(middle[0]) == "A" and seq_id(middle[-1]) == "B":
            middle = middle[1:-1]
            if middle:
                add_sep = False
                entry = special_id(middle[0])
                if entry and entry in (special_sep, special_eos) and not last:
                    add_sep = True
                if len(middle) == 2:
                    entry = special_id(middle[1])
                    if entry and entry in (special_sep, special_eos):
                        add_sep = True
                add["sep"] = add_sep
                if add_sep and not special_sep and config:
                    config["sep_token"] = special_eos
    return special_bos, special_eos, special_sep


def _chat_template(files: _Files, config: dict | None) -> str | list | None:
    """tokenizer_config.json "chat_template" (a string, or a list of {"name", "template"}), else
    chat_template.jinja (with additional_chat_templates/*.jinja as named ones), else chat_template.json."""
    root = files.root
    alt: str | list | None = None
    jinja = files.text("chat_template.jinja")
    if jinja is not None:
        alt = jinja
        extra = sorted((root / "additional_chat_templates").glob("*.jinja"))
        if extra:
            alt = [{"name": "default", "template": jinja}]
            for p in extra:
                alt.append({"name": p.stem, "template": files.text(str(p.relative_to(root)))})
    else:
        ct = files.obj("chat_template.json")
        if ct is not None:
            alt = ct.get("chat_template")
    template = (config or {}).get("chat_template", alt)
    if template is None:
        return None
    if isinstance(template, str):
        return template
    if isinstance(template, list) and all(isinstance(t, dict) and isinstance(t.get("template"), str)
                                          for t in template):
        return template
    log.warning("%s: chat_template is neither a string nor a list of {name, template}; ignored",
                root / "tokenizer_config.json")
    return None


# --------------------------------------------------------------------------- per-architecture choices

def _arch_overrides(files: _Files, kind: str, n_vocab: int, arch: str, meta: dict) -> None:
    config = files.obj("tokenizer_config.json") or {}
    prefix = config.get("add_prefix_space")
    if arch == "llama" and prefix is not None:
        # LlamaModel.set_vocab: tokenizer_config.json add_prefix_space -> add_space_prefix
        meta[K.ADD_PREFIX] = bool(prefix)
    elif kind != "bpe" and isinstance(prefix, bool):
        # transformers rebuilds Llama/Gemma-style tokenizers with this setting, so it decides for SPM too
        meta[K.ADD_PREFIX] = prefix
    elif arch in ("gemma", "gemma2", "gemma3") and kind == "spm":
        # Gemma*Model.set_vocab: _set_vocab_sentencepiece, then add_space_prefix = False
        meta[K.ADD_PREFIX] = False
    if arch == "llama" and n_vocab == 32016:
        # LlamaModel.set_vocab, CodeLlama: eot = 32010 (prefix/suffix/middle have no GGUFWriter handler there)
        meta.setdefault(K.EOT_ID, 32010)
    if arch == "llama" and n_vocab == 49152:
        # LlamaModel.set_vocab: "granite small models" (also SmolLM/SmolLM2): add_bos_token = False
        meta[K.ADD_BOS] = False


def _check_unique(tokens: list[str], root: Path) -> None:
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        if t in seen and t:
            raise EdgeLMError(f"{root}: token {t!r} (id {i}) appears twice in the vocabulary")
        seen.add(t)
