"""What both tokenizer kinds share: the vocabulary, token attributes, special tokens, decoding.

The reference behaviour is llama.cpp's (src/llama-vocab.cpp), token id for token id. The pieces that
follow it closely are marked with the llama.cpp function they mirror.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import logging
from typing import Any, Callable, Iterable

import numpy as np

from ..errors import GGUFError

log = logging.getLogger(__name__)

# GGUF `tokenizer.ggml.token_type` values (gguf-py constants.TokenType).
TYPE_NORMAL, TYPE_UNKNOWN, TYPE_CONTROL, TYPE_USER_DEFINED, TYPE_UNUSED, TYPE_BYTE = 1, 2, 3, 4, 5, 6

# Token attribute bits (same meaning as llama.h `llama_token_attr`; our own numbering).
ATTR_UNKNOWN = 1 << 0
ATTR_UNUSED = 1 << 1
ATTR_NORMAL = 1 << 2
ATTR_CONTROL = 1 << 3
ATTR_USER_DEFINED = 1 << 4
ATTR_BYTE = 1 << 5
ATTR_LSTRIP = 1 << 7
ATTR_RSTRIP = 1 << 8

_TYPE_TO_ATTR = np.zeros(8, dtype=np.int32)  # 0 (undefined) and 7 stay 0 = ATTR_UNDEFINED
_TYPE_TO_ATTR[TYPE_NORMAL] = ATTR_NORMAL
_TYPE_TO_ATTR[TYPE_UNKNOWN] = ATTR_UNKNOWN
_TYPE_TO_ATTR[TYPE_CONTROL] = ATTR_CONTROL
_TYPE_TO_ATTR[TYPE_USER_DEFINED] = ATTR_USER_DEFINED
_TYPE_TO_ATTR[TYPE_UNUSED] = ATTR_UNUSED
_TYPE_TO_ATTR[TYPE_BYTE] = ATTR_BYTE

# Token texts that llama.cpp treats as end-of-generation (and forces to CONTROL):
# llama.cpp src/llama-vocab.cpp, llama_vocab::impl::load, "maintain a list of tokens that cause end-of-generation".
EOG_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>", "[e~[",
)
# Auto-detected when the GGUF has no id for them (same place in llama.cpp): EOT/EOM and fill-in-the-middle
# tokens. All get forced to CONTROL; FIM pad/repo/sep are also end-of-generation.
EOT_TEXTS = (
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
    "_<EOT>", "[EOT]", "<\uff5cend\u2581of\u2581sentence\uff5c>", "<end_of_utterance>",
)
EOM_TEXTS = ("<|eom_id|>",)
FIM_TEXTS = {
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<\uff5cfim\u2581begin\uff5c>", "<PRE>",
                "\u2581<PRE>", "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<\uff5cfim\u2581hole\uff5c>", "<SUF>",
                "\u2581<SUF>", "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<\uff5cfim\u2581end\uff5c>", "<MID>",
                "\u2581<MID>", "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}
_FIM_EOG = ("fim_pad", "fim_rep", "fim_sep")

# ASCII whitespace as C isspace() sees it (used for LSTRIP/RSTRIP around special tokens).
_C_SPACE = " \t\n\v\f\r"

_KEY = "tokenizer.ggml."


def _get_id(meta: dict, name: str, n_vocab: int, default: int | None) -> int | None:
    """A special token id from metadata; out-of-range values keep the default (llama.cpp does the same)."""
    if default is not None and default >= n_vocab:
        default = None
    value = meta.get(_KEY + name)
    if value is None:
        return default
    if isinstance(value, (bool, float, str, list, np.ndarray)) or not isinstance(value, int):
        raise GGUFError(f"metadata key {_KEY + name} must be an integer, found {_describe(value)}")
    if not 0 <= value < n_vocab:
        log.warning("bad special token %s%s = %d (vocab size %d); using default %s",
                    _KEY, name, value, n_vocab, default)
        return default
    return value


def _describe(value) -> str:
    if isinstance(value, (list, np.ndarray)):
        return f"an array of {len(value)} items"
    return f"{type(value).__name__} {value!r:.40}"


def string_array(meta: dict, name: str) -> list[str]:
    """`tokenizer.ggml.NAME` as a list of strings (the parser gives string arrays as lists of str)."""
    v = meta.get(_KEY + name)
    if not isinstance(v, list) or not set(map(type, v)) <= {str}:     # map(type): C speed on 262k tokens
        raise GGUFError(f"metadata key {_KEY + name} must be an array of strings, found {_describe(v)}")
    return v


def number_array(meta: dict, name: str, n: int, integer: bool) -> np.ndarray | None:
    """`tokenizer.ggml.NAME`, one number per token (integers or floats), or None when absent. llama.cpp reads
    scores and token types by token id (llama-vocab.cpp), so the arrays must be as long as the vocabulary."""
    v = meta.get(_KEY + name)
    if v is None:
        return None
    kinds = "iu" if integer else "iuf"
    if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v):
        v = np.asarray(v)
    if not isinstance(v, np.ndarray) or v.ndim != 1 or v.dtype.kind not in kinds:
        what = "integers" if integer else "numbers"
        raise GGUFError(f"metadata key {_KEY + name} must be an array of {what}, found {_describe(v)}")
    if len(v) != n:
        raise GGUFError(f"metadata key {_KEY}{name} has {len(v)} entries for {n} tokens (they must be equal)")
    return v


class Tokenizer(ABC):
    """Common interface and shared machinery of the BPE and SentencePiece-style tokenizers.

    Subclasses set the vocab-type defaults before calling `_load_common` and implement `_encode_fragment`
    (one run of plain text between special tokens -> ids) and `_normal_piece_bytes`.
    """

    kind = "?"
    # defaults per vocab type (llama.cpp llama_vocab::impl::load), overridden by metadata keys
    _default_bos: int | None = None
    _default_eos: int | None = None
    _default_unk: int | None = None

    n_vocab: int
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    eom_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    end_of_generation_ids: frozenset[int]

    # ------------------------------------------------------------------ loading

    def _load_common(self, meta: dict[str, Any], *, add_bos: bool, add_eos: bool, add_space_prefix: bool) -> None:
        tokens = meta.get(_KEY + "tokens")
        if tokens is None:
            raise GGUFError(f"missing metadata key {_KEY}tokens (the vocabulary)")
        tokens = string_array(meta, "tokens")
        n = len(tokens)
        if n == 0:
            raise GGUFError(f"metadata key {_KEY}tokens is empty")
        # llama.cpp renames empty tokens so that they stay unique and never match text
        if "" in tokens:
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens: list[str] = tokens
        self.n_vocab = n
        self.token_to_id: dict[str, int] = dict(zip(tokens, range(n)))
        if len(self.token_to_id) != n:
            seen: set[str] = set()
            dup = next(t for t in tokens if t in seen or seen.add(t))
            raise GGUFError(f"duplicate token in {_KEY}tokens: {dup!r}")

        types = number_array(meta, "token_type", n, integer=True)
        if types is None:
            attrs = np.full(n, ATTR_NORMAL, dtype=np.int32)
        else:
            types = types.astype(np.int64)
            attrs = _TYPE_TO_ATTR[np.clip(types, 0, 7)].copy()
            attrs[(types < 0) | (types > 7)] = 0
        self.attrs = attrs

        scores = number_array(meta, "scores", n, integer=False)
        self.scores = None if scores is None else scores.astype(np.float32)

        self.bos_id = _get_id(meta, "bos_token_id", n, self._default_bos)
        self.eos_id = _get_id(meta, "eos_token_id", n, self._default_eos)
        self.eot_id = _get_id(meta, "eot_token_id", n, None)
        self.eom_id = _get_id(meta, "eom_token_id", n, None)
        self.unk_id = _get_id(meta, "unknown_token_id", n, self._default_unk)
        self.pad_id = _get_id(meta, "padding_token_id", n, None)
        # FIM ids; the old key names (prefix/suffix/middle_token_id) also count, as in llama.cpp
        fim = {kind: _get_id(meta, f"{kind}_token_id", n, None) for kind in FIM_TEXTS}
        for kind, old_key in (("fim_pre", "prefix"), ("fim_suf", "suffix"), ("fim_mid", "middle")):
            if meta.get(f"{_KEY}{old_key}_token_id") is not None:
                fim[kind] = _get_id(meta, f"{old_key}_token_id", n, fim[kind])

        def flag(name: str, default: bool) -> bool:
            v = meta.get(_KEY + name)
            if v is None:
                return default
            if not isinstance(v, (bool, int)) or isinstance(v, np.ndarray):
                raise GGUFError(f"metadata key {_KEY + name} must be a boolean, found {type(v).__name__}")
            return bool(v)

        self.add_space_prefix = flag("add_space_prefix", add_space_prefix)
        self.add_bos = flag("add_bos_token", add_bos)
        self.add_eos = flag("add_eos_token", add_eos)
        if self.add_bos and self.bos_id is None:
            raise GGUFError(f"{_KEY}add_bos_token is true, but {_KEY}bos_token_id is not set")
        if self.add_eos and self.eos_id is None:
            raise GGUFError(f"{_KEY}add_eos_token is true, but {_KEY}eos_token_id is not set")

        # Auto-detected special tokens and forced CONTROL attributes (llama.cpp llama_vocab::impl::load,
        # "auto-detect special tokens by text"): a token whose text marks an end of turn, a message or a FIM
        # slot is made CONTROL even when the GGUF says otherwise; this changes how text containing it tokenizes.
        get = self.token_to_id.get

        def force_control(tid: int) -> None:
            self.attrs[tid] |= ATTR_CONTROL

        for texts, attr_name in ((EOT_TEXTS, "eot_id"), (EOM_TEXTS, "eom_id")):
            if getattr(self, attr_name) is None:
                for t in texts:
                    tid = get(t)
                    if tid is not None:
                        if getattr(self, attr_name) is None:
                            setattr(self, attr_name, tid)
                        force_control(tid)
        for kind, texts in FIM_TEXTS.items():
            if fim[kind] is None:
                for t in texts:
                    tid = get(t)
                    if tid is not None:
                        if fim[kind] is None:
                            fim[kind] = tid
                        force_control(tid)
        self.fim_ids = fim

        eog: set[int] = {fim[k] for k in _FIM_EOG if fim[k] is not None}
        for t in EOG_TEXTS:
            tid = get(t)
            if tid is not None:
                eog.add(tid)
                force_control(tid)
        # gpt-oss: these are always rendered (llama.cpp sets them USER_DEFINED)
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
            tid = get(t)
            if tid is not None:
                self.attrs[tid] = ATTR_USER_DEFINED
        for tid in (self.eos_id, self.eot_id, self.eom_id):
            if tid is not None:
                eog.add(tid)
        # o200k_harmony / solar-open: "<|end|>" is not an end of generation there (llama.cpp workaround)
        eog_texts = {self.tokens[i] for i in eog}
        if "<|end|>" in eog_texts and (
            {"<|return|>", "<|call|>"} <= eog_texts or {"<|calls|>", "<|flush|>"} <= eog_texts
        ):
            end_id = get("<|end|>")
            eog.discard(end_id)
            self.attrs[end_id] = ATTR_USER_DEFINED
        # gemma4 / paddleocr: "</s>" is not an end of generation when "<|tool_response>" is
        if "<|tool_response>" in eog_texts and "</s>" in eog_texts:
            s_id = get("</s>")
            eog.discard(s_id)
            self.attrs[s_id] = ATTR_NORMAL
        self.end_of_generation_ids = frozenset(eog)

        # Special tokens, longest text first: the order in which llama.cpp's tokenizer_st_partition splits
        # them out of the text (ties by id, to be deterministic).
        special = np.nonzero(self.attrs & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN))[0].tolist()
        special.sort(key=lambda i: (-len(tokens[i]), i))
        self.special_ids: list[int] = special     # control, user-defined and unknown tokens, longest first
        self._special_rank = {tid: r for r, tid in enumerate(special)}

        # phi-3: special tokens swallow the whitespace after them (llama.cpp, per-model attributes)
        name = str(meta.get("general.name") or "").lower()
        if "phi-3" in name or "phi3" in name:
            for tid in special:
                self.attrs[tid] |= ATTR_RSTRIP
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False), ("<|endoftext|>", False)):
                tid = get(t)
                if tid is not None:
                    self.attrs[tid] = (self.attrs[tid] | ATTR_RSTRIP) if on else (self.attrs[tid] & ~ATTR_RSTRIP)

        self._matchers: dict[bool, tuple] = {}
        self._piece_cache: dict[int, bytes] = {}

    # ------------------------------------------------------------------ special-token partition

    def _matcher(self, parse_special: bool) -> tuple:
        """(first characters, set of all prefixes, text->id) for the special tokens active in this mode."""
        m = self._matchers.get(parse_special)
        if m is None:
            texts: dict[str, int] = {}
            for tid in self.special_ids:
                # with parse_special False, control and unknown tokens are plain text; user-defined ones
                # are still split out first (llama.cpp tokenizer_st_partition; HF tokenizers does the same)
                if not parse_special and self.attrs[tid] & (ATTR_CONTROL | ATTR_UNKNOWN):
                    continue
                texts[self.tokens[tid]] = tid
            prefixes = {t[:k] for t in texts for k in range(1, len(t) + 1)}
            first = frozenset(t[0] for t in texts)
            m = (first, prefixes, texts)
            self._matchers[parse_special] = m
        return m

    def _present_specials(self, text: str, parse_special: bool) -> list[int]:
        """Ids of the active special tokens that occur anywhere in `text`, in partition order."""
        first, prefixes, texts = self._matcher(parse_special)
        if not texts:
            return []
        found: set[int] = set()
        n = len(text)
        for p, ch in enumerate(text):
            if ch not in first:
                continue
            k = p + 1
            while k <= n:
                s = text[p:k]
                if s not in prefixes:
                    break
                tid = texts.get(s)
                if tid is not None:
                    found.add(tid)
                k += 1
        rank = self._special_rank
        return sorted(found, key=rank.__getitem__)

    def _partition(self, text: str, parse_special: bool) -> list[str | int]:
        """Split `text` into plain-text runs (str) and special tokens (int).

        Mirrors llama.cpp tokenizer_st_partition: for each special token, longest first, every remaining
        text run is cut at the token's leftmost non-overlapping occurrences.
        """
        if not text:
            return []
        frags: list[str | int] = [text]
        for tid in self._present_specials(text, parse_special):
            tok = self.tokens[tid]
            attr = int(self.attrs[tid])
            out: list[str | int] = []
            for frag in frags:
                if isinstance(frag, int) or tok not in frag:
                    out.append(frag)
                    continue
                rest = frag
                while True:
                    i = rest.find(tok)
                    if i < 0:
                        if rest:
                            out.append(rest)
                        break
                    left = rest[:i]
                    if attr & ATTR_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    rest = rest[i + len(tok):]
                    if attr & ATTR_RSTRIP:
                        rest = rest.lstrip(_C_SPACE)
            frags = out
        return frags

    # ------------------------------------------------------------------ encode

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`, as llama.cpp's llama_tokenize(text, add_special, parse_special) gives them.

        add_special adds BOS/EOS as the model's metadata asks (add_bos_token / add_eos_token); parse_special
        lets control tokens written in the text (e.g. "<|im_end|>") become those tokens. User-defined tokens
        are always matched whole, as llama.cpp does.
        """
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)  # type: ignore[arg-type]
        self.encode_runs(text, parse_special, out)
        if add_special and self.add_eos:
            out.append(self.eos_id)  # type: ignore[arg-type]
        return out

    def encode_runs(self, text: str, parse_special: bool, out: list[int],
                    run_text: Callable[[str], str] | None = None) -> list[int]:
        """Append the ids of `text` to `out`: special tokens are split out first (llama.cpp
        tokenizer_st_partition), then each run of plain text between them is encoded whole. `run_text` maps a
        run before it is encoded: chat prompts mask user text while special tokens are matched, then put it back."""
        prev_special = True
        for frag in self._partition(text, parse_special):
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
            else:
                self._encode_fragment(run_text(frag) if run_text else frag, prev_special, out)
                prev_special = False
        return out

    @abstractmethod
    def _encode_fragment(self, text: str, prev_special: bool, out: list[int]) -> None:
        """Append the ids of a piece of text that holds no special token (the model-specific algorithm)."""

    # ------------------------------------------------------------------ decode

    def token_text(self, id: int) -> str:
        """The token's text as stored in the vocabulary (byte-level or "▁"-escaped, not decoded)."""
        return self.tokens[id]

    def is_control(self, id: int) -> bool:
        return bool(self.attrs[id] & ATTR_CONTROL)

    def is_special(self, id: int) -> bool:
        """Control or unknown: hidden by decode(skip_special=True), like llama.cpp's token_to_piece."""
        return bool(self.attrs[id] & (ATTR_CONTROL | ATTR_UNKNOWN))

    def is_eog(self, id: int) -> bool:
        return id in self.end_of_generation_ids

    def token_bytes(self, id: int, special: bool = False) -> bytes:
        """The raw bytes this token contributes to the output text (llama.cpp token_to_piece).

        Control and unknown tokens give b"" unless `special`; a byte token gives its single byte, which may
        be part of a multi-byte UTF-8 character (join before decoding).
        """
        attr = int(self.attrs[id])
        if attr & (ATTR_CONTROL | ATTR_UNKNOWN):
            return self.tokens[id].encode("utf-8") if special else b""
        b = self._piece_cache.get(id)
        if b is None:
            if attr & ATTR_USER_DEFINED:
                b = self.tokens[id].encode("utf-8")
            elif attr & ATTR_NORMAL:
                b = self._normal_piece_bytes(self.tokens[id])
            elif attr & ATTR_BYTE:
                b = bytes([int(self.tokens[id][3:5], 16)])
            else:  # unused / undefined tokens render as nothing
                b = b""
            self._piece_cache[id] = b
        return b

    @abstractmethod
    def _normal_piece_bytes(self, text: str) -> bytes:
        """The bytes a normal (non-special) vocabulary entry stands for."""

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """The text of `ids`; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD.

        Differs from llama_detokenize on purpose in one way: no "clean up tokenization spaces" pass, so that
        decode(encode(text)) == text. With add_space_prefix, the one space the encoder put in front of the
        text is removed.
        """
        data = b"".join(self.token_bytes(int(i), special=not skip_special) for i in ids)
        if self.add_space_prefix and data.startswith(b" "):
            data = data[1:]
        return data.decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} n_vocab={self.n_vocab} bos={self.bos_id} eos={self.eos_id} "
                f"add_bos={self.add_bos}>")
