"""Byte-level BPE (GGUF `tokenizer.ggml.model` = "gpt2"), as llama.cpp's llm_tokenizer_bpe does it.

Text -> special-token partition (base.py) -> pre-tokenizer regexes (chosen by `tokenizer.ggml.pre`) ->
each piece's UTF-8 bytes mapped to printable characters (GPT-2 bytes_to_unicode) -> merges by rank.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any

import regex

from ..errors import GGUFError, UnsupportedError
from .base import Tokenizer, string_array

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- pre-tokenizers
#
# The regexes are llama.cpp's (src/llama-vocab.cpp, llm_tokenizer_bpe constructor), applied in sequence: each
# one splits every piece the previous one produced into its matches and the unmatched runs between them
# (llama.cpp unicode.cpp, unicode_regex_split). Notes on making the `regex` module behave like llama.cpp:
#  - llama.cpp runs the GPT-2, LLaMA-3 and Qwen2 patterns through hand-written matchers (unicode.cpp
#    unicode_regex_split_custom_*) and the rest through std::regex on text whose non-ASCII characters are
#    collapsed to one byte per Unicode category. Both amount to ordinary leftmost-first regex semantics with
#    \s = the Unicode White_Space set (which is what `regex`'s \s matches) and \p{L} / \p{N} by general
#    category, so the patterns are used as written.
#  - "(?i:'s|...)" was already rewritten by llama.cpp as "(?:'[sS]|...)": only ASCII letters fold.
#  - The GPT-2 pattern has no final "|\s+"; a lone whitespace character before a non-space is then an
#    unmatched run of one character, which is also what llama.cpp's custom matcher emits.
#  - What the matcher sees (non-ASCII whitespace folding, characters newer than llama.cpp's Unicode 15.1
#    tables): see _regexes below.

_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
           r"|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS_CI + "?"
          r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS_CI + "?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+"
           r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# pre-tokenizer family -> regexes in the order llama.cpp applies them (llama-vocab.cpp, same names)
PRE_REGEXES: dict[str, tuple[str, ...]] = {
    # LLAMA_VOCAB_PRE_TYPE_DEFAULT
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"),
    # LLAMA_VOCAB_PRE_TYPE_GPT2 / MPT / OLMO / JAIS / TRILLION / GRANITE_DOCLING
    "gpt2": (_GPT2,),
    # LLAMA_VOCAB_PRE_TYPE_STARCODER / REFACT / COMMAND_R / SMOLLM / CODESHELL / EXAONE / MINERVA
    "smollm": (r"\p{N}", _GPT2),
    # LLAMA_VOCAB_PRE_TYPE_LLAMA3 / DBRX / SMAUG / CHATGLM4
    "llama3": (_LLAMA3,),
    # LLAMA_VOCAB_PRE_TYPE_QWEN2 / STABLELM2 / HUNYUAN
    "qwen2": (_QWEN2,),
    # LLAMA_VOCAB_PRE_TYPE_FALCON
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"),
    # LLAMA_VOCAB_PRE_TYPE_PORO / BLOOM / GPT3_FINNISH
    "poro": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
    # LLAMA_VOCAB_PRE_TYPE_VIKING
    "viking": (r" ?[^(\s|.,!?…。，、।۔،)]+", r"\p{N}"),
    # LLAMA_VOCAB_PRE_TYPE_TEKKEN
    "tekken": (_TEKKEN,),
    # LLAMA_VOCAB_PRE_TYPE_GPT4O
    "gpt4o": (_GPT4O,),
    # LLAMA_VOCAB_PRE_TYPE_DEEPSEEK_CODER
    "deepseek-coder": (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"),
}


class PreTokenizer:
    """`tokenizer.ggml.pre` value -> (family, flags) as llama.cpp's llama_vocab::impl::load maps them."""

    # name -> (family, ignore_merges, add_bos default, clean_spaces, bos default disabled)
    NAMES: dict[str, tuple[str, bool, bool, bool, bool]] = {}

    @classmethod
    def _add(cls, family: str, names: str, ignore_merges=False, add_bos=False, clean_spaces=True, no_bos=False):
        for name in names.split():
            cls.NAMES[name] = (family, ignore_merges, add_bos, clean_spaces, no_bos)


_P = PreTokenizer._add
_P("default", "default")
_P("llama3", "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 jina-v5-nano",
   ignore_merges=True, add_bos=True)
_P("falcon", "falcon")
_P("gpt2", "mpt gpt-2 phi-2 jina-es jina-de gigachat jina-v2-es jina-v2-de a.x-4.0 mellum modern-bert exaone4 "
   "olmo")
_P("gpt2", "trillion granite-docling", clean_spaces=False)
_P("smollm", "starcoder refact codeshell exaone minerva-7b mellum2")
_P("smollm", "command-r smollm", clean_spaces=False)
_P("qwen2", "qwen2 deepseek-r1-qwen kormo f2llmv2", clean_spaces=False)
_P("qwen2", "stablelm2 megrez")
_P("qwen2", "hunyuan", clean_spaces=False)
_P("llama3", "dbrx smaug-bpe")
_P("llama3", "chatglm-bpe glm4", no_bos=True)
_P("poro", "poro-chat", clean_spaces=False)
_P("poro", "bloom gpt3-finnish")
_P("viking", "viking", clean_spaces=False)
_P("tekken", "tekken", ignore_merges=True, add_bos=True, clean_spaces=False)
_P("gpt4o", "gpt-4o llama4 kanana2 talkie", clean_spaces=False)
_P("deepseek-coder", "deepseek-coder", clean_spaces=False)
del _P

# How llama.cpp sees the text before matching (unicode.cpp unicode_regex_split):
#  - a pattern without Unicode categories runs through std::wregex on the code points, with every non-ASCII
#    whitespace character replaced by U+000B first; so e.g. U+2028 does not fall into deepseek-coder's
#    [ࠀ-一] range. We fold the same way for such patterns.
#  - a pattern with categories (\p{L}, \p{N}, ...) sees each character's category from llama.cpp's Unicode
#    15.1 tables (unicode-data.cpp). The `regex` module may know newer characters; the code points first
#    assigned in Unicode 16.0 / 17.0 (ranges below, from the Unicode Character Database's DerivedAge) are
#    "undefined" for llama.cpp, so we map them to U+0378 (unassigned everywhere) before matching.
_UCATS = (r"\p{N}", r"\p{L}", r"\p{P}", r"\p{M}", r"\p{S}",
          r"\p{Lu}", r"\p{Ll}", r"\p{Lt}", r"\p{Lm}", r"\p{Lo}")
_FOLD_WS = {c: "\x0b" for c in (0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
                                 0x3000)}
_NEWER_THAN_UNICODE_15_1 = (
    (0x88F, 0x88F), (0x897, 0x897), (0xC5C, 0xC5C), (0xCDC, 0xCDC), (0x1ACF, 0x1ADD), (0x1AE0, 0x1AEB),
    (0x1B4E, 0x1B4F), (0x1B7F, 0x1B7F), (0x1C89, 0x1C8A), (0x20C1, 0x20C1), (0x2427, 0x2429), (0x2B96, 0x2B96),
    (0x31E4, 0x31E5), (0xA7CB, 0xA7CF), (0xA7D2, 0xA7D2), (0xA7D4, 0xA7D4), (0xA7DA, 0xA7DC), (0xA7F1, 0xA7F1),
    (0xFBC3, 0xFBD2), (0xFD90, 0xFD91), (0xFDC8, 0xFDCE), (0x105C0, 0x105F3), (0x10940, 0x10959),
    (0x10D40, 0x10D65), (0x10D69, 0x10D85), (0x10D8E, 0x10D8F), (0x10EC2, 0x10EC7), (0x10ED0, 0x10ED8),
    (0x10EFA, 0x10EFC), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E), (0x11390, 0x113B5),
    (0x113B7, 0x113C0), (0x113C2, 0x113C2), (0x113C5, 0x113C5), (0x113C7, 0x113CA), (0x113CC, 0x113D5),
    (0x113D7, 0x113D8), (0x113E1, 0x113E2), (0x116D0, 0x116E3), (0x11B60, 0x11B67), (0x11BC0, 0x11BE1),
    (0x11BF0, 0x11BF9), (0x11DB0, 0x11DDB), (0x11DE0, 0x11DE9), (0x11F5A, 0x11F5A), (0x13460, 0x143FA),
    (0x16100, 0x16139), (0x16D40, 0x16D79), (0x16EA0, 0x16EB8), (0x16EBB, 0x16ED3), (0x16FF2, 0x16FF6),
    (0x187F8, 0x187FF), (0x18CFF, 0x18CFF), (0x18D09, 0x18D1E), (0x18D80, 0x18DF2), (0x1CC00, 0x1CCFC),
    (0x1CD00, 0x1CEB3), (0x1CEBA, 0x1CED0), (0x1CEE0, 0x1CEF0), (0x1E5D0, 0x1E5FA), (0x1E5FF, 0x1E5FF),
    (0x1E6C0, 0x1E6DE), (0x1E6E0, 0x1E6F5), (0x1E6FE, 0x1E6FF), (0x1F6D8, 0x1F6D8), (0x1F777, 0x1F77A),
    (0x1F8B2, 0x1F8BB), (0x1F8C0, 0x1F8C1), (0x1F8D0, 0x1F8D8), (0x1FA54, 0x1FA57), (0x1FA89, 0x1FA8A),
    (0x1FA8E, 0x1FA8F), (0x1FABE, 0x1FABE), (0x1FAC6, 0x1FAC6), (0x1FAC8, 0x1FAC8), (0x1FACD, 0x1FACD),
    (0x1FADC, 0x1FADC), (0x1FADF, 0x1FADF), (0x1FAE9, 0x1FAEA), (0x1FAEF, 0x1FAEF), (0x1FBCB, 0x1FBEF),
    (0x1FBFA, 0x1FBFA), (0x2B73A, 0x2B73F), (0x2CEA2, 0x2CEAD), (0x323B0, 0x33479),
)
_AS_UNDEFINED = {c: "\u0378" for a, b in _NEWER_THAN_UNICODE_15_1 for c in range(a, b + 1)}

_compiled: dict[str, tuple[tuple[regex.Pattern, dict | None], ...]] = {}


def _regexes(family: str) -> tuple[tuple[regex.Pattern, dict | None], ...]:
    """(compiled pattern, str.translate table applied to non-ASCII text first) for each regex of the family."""
    r = _compiled.get(family)
    if r is None:
        r = tuple((regex.compile(p), _AS_UNDEFINED if any(u in p for u in _UCATS) else _FOLD_WS)
                  for p in PRE_REGEXES[family])
        _compiled[family] = r
    return r


def split_words(text: str, patterns: tuple[tuple[regex.Pattern, dict | None], ...]) -> list[str]:
    """Apply the patterns in sequence; every piece is split into matches and the runs between them."""
    pieces = [text]
    ascii_only = text.isascii()
    for rx, table in patterns:
        out: list[str] = []
        append = out.append
        for piece in pieces:
            pos = 0
            # the translation keeps lengths, so match positions index the original piece
            seen = piece if ascii_only or table is None else piece.translate(table)
            for m in rx.finditer(seen):
                s, e = m.span()
                if s == e:
                    continue
                if s > pos:
                    append(piece[pos:s])
                append(piece[s:e])
                pos = e
            if pos < len(piece):
                append(piece[pos:])
        pieces = out
    return pieces


# --------------------------------------------------------------------------- byte <-> printable characters

def _bytes_to_unicode() -> list[str]:
    # GPT-2's mapping (llama.cpp unicode.cpp unicode_byte_to_utf8_map): printable Latin-1 bytes map to
    # themselves, the other 68 bytes to U+0100 onwards, in byte order.
    keep = list(range(0x21, 0x7F)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = [""] * 256
    for b in keep:
        table[b] = chr(b)
    n = 0
    for b in range(256):
        if not table[b]:
            table[b] = chr(256 + n)
            n += 1
    return table


BYTE_TO_CHAR = _bytes_to_unicode()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# Latin-1 code point -> printable character, for str.translate on bytes decoded as Latin-1
_LATIN1_TO_PRINTABLE = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def byte_encode(text: str) -> str:
    return text.encode("utf-8").decode("latin-1").translate(_LATIN1_TO_PRINTABLE)


# --------------------------------------------------------------------------- tokenizer

class BPETokenizer(Tokenizer):
    kind = "bpe"
    # llama.cpp defaults for BPE vocabularies when the GGUF has no ids
    _default_bos = 11
    _default_eos = 11
    _default_unk = None

    _CACHE_MAX = 100_000

    def __init__(self, meta: dict[str, Any]):
        pre = meta.get("tokenizer.ggml.pre")
        if pre is None or pre == "":
            log.warning("GGUF has no tokenizer.ggml.pre; using the 'default' pre-tokenizer (as llama.cpp does)")
            pre = "default"
        if not isinstance(pre, str):
            raise GGUFError(f"metadata key tokenizer.ggml.pre must be a string, found {type(pre).__name__}")
        entry = PreTokenizer.NAMES.get(pre)
        if entry is None:
            raise UnsupportedError(
                f"unsupported BPE pre-tokenizer tokenizer.ggml.pre = {pre!r}; supported: "
                + ", ".join(sorted(PreTokenizer.NAMES)))
        family, self.ignore_merges, add_bos, self.clean_spaces, no_bos = entry
        self.pre = str(pre)
        self.pre_family = family
        if no_bos:
            self._default_bos = None
        self._load_common(meta, add_bos=add_bos, add_eos=False, add_space_prefix=False)
        self._patterns = _regexes(family)

        merges = meta.get("tokenizer.ggml.merges")
        if merges is None:
            raise GGUFError("missing metadata key tokenizer.ggml.merges (required by tokenizer.ggml.model 'gpt2')")
        merges = string_array(meta, "merges")
        # "left right" -> rank. llama.cpp splits each entry at its first space after position 0 and looks up
        # (left, right) pairs, neither containing a space, so the entry itself can be the key; for duplicate
        # entries the first (lowest) rank wins, hence the reversed fill.
        n = len(merges)
        self.ranks: dict[str, int] = dict(zip(reversed(merges), range(n - 1, -1, -1)))
        self._cache: dict[str, tuple[int, ...]] = {}

    # ---------------------------------------------------------------- encode

    def _encode_fragment(self, text: str, prev_special: bool, out: list[int]) -> None:
        cache = self._cache
        for word in split_words(text, self._patterns):
            ids = cache.get(word)
            if ids is None:
                ids = self._bpe(byte_encode(word))
                if len(cache) >= self._CACHE_MAX:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Merge one pre-tokenized word (already byte-encoded). Mirrors llm_tokenizer_bpe_session::tokenize:
        a heap of adjacent pairs ordered by (rank, left position); stale pairs are skipped."""
        vocab = self.token_to_id
        if self.ignore_merges:
            tid = vocab.get(word)
            if tid is not None:
                return (tid,)
        n = len(word)
        if n == 1:
            tid = vocab.get(word)
            return (tid,) if tid is not None else self._fallback(word)
        ranks = self.ranks
        sym = list(word)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []
        for i in range(n - 1):
            r = ranks.get(sym[i] + " " + sym[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, sym[i] + sym[i + 1]))
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, left, right, text = pop(heap)
            ls, rs = sym[left], sym[right]
            if not ls or not rs or ls + rs != text:
                continue
            sym[left] = text
            sym[right] = ""
            nr = nxt[right]
            nxt[left] = nr
            if nr >= 0:
                prv[nr] = left
            pl = prv[left]
            if pl >= 0:
                r = ranks.get(sym[pl] + " " + text)
                if r is not None:
                    push(heap, (r, pl, left, sym[pl] + text))
            if nr >= 0:
                r = ranks.get(text + " " + sym[nr])
                if r is not None:
                    push(heap, (r, left, nr, text + sym[nr]))
        ids: list[int] = []
        i = 0
        while i >= 0:
            s = sym[i]
            tid = vocab.get(s)
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self._fallback(s))
            i = nxt[i]
        return tuple(ids)

    def _fallback(self, s: str) -> tuple[int, ...]:
        # llama.cpp: a symbol missing from the vocabulary is emitted byte by byte, as the one-byte tokens of
        # its UTF-8 encoding that exist (only ASCII characters can be one-byte tokens); the rest is dropped.
        vocab = self.token_to_id
        return tuple(vocab[c] for c in s if ord(c) < 0x80 and c in vocab)

    # ---------------------------------------------------------------- decode

    def _normal_piece_bytes(self, text: str) -> bytes:
        c2b = CHAR_TO_BYTE
        try:
            return bytes(c2b[c] for c in text)
        except KeyError:
            # characters outside the byte alphabet (llama.cpp prints "[UNK_BYTE_...]"); keep their UTF-8
            return b"".join(bytes([c2b[c]]) if c in c2b else c.encode("utf-8") for c in text)
