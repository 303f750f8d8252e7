"""Tokenizers built from GGUF metadata: byte-level BPE ("gpt2") and SentencePiece-style ("llama").

    tok = tokenizer_from_metadata(meta)         # meta: the GGUF key/value dict
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    tok.decode(ids)                             # -> "Hello"

Behaviour follows llama.cpp (src/llama-vocab.cpp) token id for token id; tests/test_tokenizer.py checks it
against golden ids produced by llama.cpp itself (tools/make_tokenizer_golden.py).
"""

from __future__ import annotations

from typing import Any

from ..errors import GGUFError, UnsupportedError
from .base import Tokenizer
from .bpe import PRE_REGEXES, BPETokenizer, PreTokenizer
from .spm import SPMTokenizer

__all__ = [
    "Tokenizer", "BPETokenizer", "SPMTokenizer", "tokenizer_from_metadata", "supported_pre_tokenizers",
    "PRE_REGEXES",
]


def tokenizer_from_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF file describes (`tokenizer.ggml.*` keys). Errors name the file when `meta`
    is a GGUFFile's metadata (which carries its path)."""
    try:
        return _build(meta)
    except (GGUFError, UnsupportedError) as e:
        path = getattr(meta, "path", "")
        if path and not str(e).startswith(path):
            raise type(e)(f"{path}: {e}") from None
        raise


def _build(meta: dict[str, Any]) -> Tokenizer:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise GGUFError("missing metadata key tokenizer.ggml.model")
    if model == "gpt2":
        return BPETokenizer(meta)
    if model == "llama":
        return SPMTokenizer(meta)
    raise UnsupportedError(
        f"unsupported tokenizer.ggml.model = {model!r} (supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")


def supported_pre_tokenizers() -> list[str]:
    """Values of `tokenizer.ggml.pre` accepted for BPE vocabularies."""
    return sorted(PreTokenizer.NAMES)
