"""A model's hyper-parameters, read from GGUF metadata (`{arch}.*` keys, names as in gguf-py constants.py Keys)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from .arch.traits import ARCH_TRAITS, ArchTraits
from .errors import GGUFError, UnsupportedError
from .gguf_file import GGUFFile, shown


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    traits: ArchTraits
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int          # per-head size of q and k
    head_dim_v: int        # per-head size of v
    n_vocab: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope_base_swa: float
    rope_dim: int
    sliding_window: int    # 0 = none
    attn_scale: float
    n_expert: int = 0      # mixture of experts: experts per layer (0 = dense)
    n_expert_used: int = 0
    n_ff_exp: int = 0      # hidden size of one expert
    expert_weights_norm: bool = False
    rope_scaling: str = "none"     # "none" | "linear" | "yarn" (llama3-style factors come as a rope_freqs tensor)
    rope_factor: float = 1.0
    rope_orig_ctx: int = 0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0

    def is_swa_layer(self, il: int) -> bool:
        p = self.traits.swa_pattern
        return bool(self.sliding_window) and p > 0 and (p == 1 or (il + 1) % p != 0)

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> "ModelConfig":
        """The hyper-parameters, each checked for type, range and consistency with the tensors before anything
        is sized from them (one validation pass: an error names the file, the key and the rule broken)."""
        arch = g.architecture
        traits = ARCH_TRAITS.get(arch)
        if traits is None:
            known = ", ".join(sorted(ARCH_TRAITS))
            raise UnsupportedError(f"{g.path}: architecture '{arch}' is not supported (supported: {known})")
        k = _Keys(g, arch)
        emb = g.tensors.get("token_embd.weight")
        if emb is None:
            raise GGUFError(f"{g.path}: tensor token_embd.weight is missing")
        n_embd = k.int("embedding_length", required=True, hi=MAX_DIM)
        n_head = k.int("attention.head_count", required=True, hi=MAX_HEADS)
        n_head_kv = k.int("attention.head_count_kv", n_head, hi=MAX_HEADS)
        if n_head % n_head_kv:
            raise GGUFError(f"{g.path}: key {arch}.attention.head_count = {n_head} must be a multiple of "
                            f"{arch}.attention.head_count_kv = {n_head_kv}")
        if k.has("attention.key_length"):
            head_dim = k.int("attention.key_length", hi=MAX_DIM)
        elif n_embd % n_head:
            raise GGUFError(f"{g.path}: key {arch}.embedding_length = {n_embd} must be a multiple of "
                            f"{arch}.attention.head_count = {n_head} (or the file must give attention.key_length)")
        else:
            head_dim = n_embd // n_head
        head_dim_v = k.int("attention.value_length", head_dim, hi=MAX_DIM)
        n_vocab = _vocab_size(g, emb, n_embd)
        if k.has("vocab_size") and k.int("vocab_size", hi=2**31) != n_vocab:
            raise GGUFError(f"{g.path}: key {arch}.vocab_size = {k.int('vocab_size')} does not match the "
                            f"{n_vocab} rows of token_embd.weight")
        n_layer = k.int("block_count", required=True, hi=MAX_LAYERS)
        _check_layers(g, arch, n_layer)
        rope_base = k.float("rope.freq_base", 10000.0, above=1.0)
        swa_base = k.float("rope.freq_base_swa", None, above=1.0)
        n_expert = k.int("expert_count", 0, lo=0, hi=MAX_EXPERTS)
        scaling = k.str("rope.scaling.type", "none")
        if scaling not in ("none", "linear", "yarn"):
            raise UnsupportedError(f"{g.path}: {arch}.rope.scaling.type '{scaling}' is not supported "
                                   f"(supported: none, linear, yarn)")
        rope_dim = k.int("rope.dimension_count", head_dim, hi=MAX_DIM)
        if traits.positions == "rope" and (rope_dim > head_dim or rope_dim % 2):
            raise GGUFError(f"{g.path}: key {arch}.rope.dimension_count = {rope_dim} must be even and at most "
                            f"the head size {head_dim}")
        cfg = cls(
            arch=arch, traits=traits,
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=k.int("feed_forward_length", 0, lo=0 if n_expert else 1, hi=MAX_DIM, required=not n_expert),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            n_vocab=n_vocab,
            n_ctx_train=k.int("context_length", 2048, hi=MAX_CONTEXT),
            norm_eps=k.float(traits.norm_eps_key, 1e-5, above=0.0, at_most=1.0),
            rope_base=rope_base,
            rope_base_swa=float(swa_base if swa_base is not None else (traits.rope_base_swa or rope_base)),
            rope_dim=rope_dim,
            sliding_window=k.int("attention.sliding_window", 0, lo=0, hi=MAX_CONTEXT),
            attn_scale=k.float("attention.scale", 1.0 / math.sqrt(head_dim), above=0.0),
            n_expert=n_expert,
            n_expert_used=k.int("expert_used_count", 0, lo=0, hi=MAX_EXPERTS, required=bool(n_expert)),
            # Mixtral-style files (llama arch) size their experts by feed_forward_length alone
            n_ff_exp=k.int("expert_feed_forward_length", k.int("feed_forward_length", 0, lo=0, hi=MAX_DIM),
                           lo=0, hi=MAX_DIM),
            expert_weights_norm=k.bool("expert_weights_norm", traits.expert_weights_norm),
            rope_scaling=scaling,
            rope_factor=k.float("rope.scaling.factor", 1.0, above=0.0),
            rope_orig_ctx=k.int("rope.scaling.original_context_length", 0, lo=0, hi=MAX_CONTEXT),
            yarn_beta_fast=k.float("rope.scaling.yarn_beta_fast", 32.0, above=0.0),
            yarn_beta_slow=k.float("rope.scaling.yarn_beta_slow", 1.0, above=0.0),
        )
        if n_expert and not 0 < cfg.n_expert_used <= n_expert:
            raise GGUFError(f"{g.path}: {arch}.expert_used_count {cfg.n_expert_used} is not in 1..{n_expert}")
        if n_expert and cfg.n_ff_exp < 1:
            raise GGUFError(f"{g.path}: key {arch}.expert_feed_forward_length (or feed_forward_length) = "
                            f"{cfg.n_ff_exp} must be >= 1")
        if scaling == "yarn" and cfg.rope_orig_ctx < 1:
            raise GGUFError(f"{g.path}: key {arch}.rope.scaling.original_context_length must be >= 1 with YaRN")
        return cfg


# Upper bounds far above any real model (the largest today: 128k-wide embeddings, a few hundred layers, 10M
# contexts) that keep every size computed from them finite and every loop over them short.
MAX_DIM = 1 << 20
MAX_HEADS = 1 << 14
MAX_LAYERS = 4096
MAX_EXPERTS = 1 << 14
MAX_CONTEXT = 1 << 31
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.")


class _Keys:
    """Typed, range-checked reads of `{arch}.*` metadata keys; an error names the file, the key and the rule."""

    def __init__(self, g: GGUFFile, arch: str):
        self.g, self.arch = g, arch

    def has(self, name: str) -> bool:
        return f"{self.arch}.{name}" in self.g.metadata

    def _raw(self, name: str, required: bool):
        key = f"{self.arch}.{name}"
        if key not in self.g.metadata:
            if required:
                raise GGUFError(f"{self.g.path}: required metadata key {key} is missing")
            return key, None
        return key, self.g.metadata[key]

    def _fail(self, key: str, value, rule: str):
        shown = value if not isinstance(value, (list, np.ndarray)) else f"an array of {len(value)} items"
        raise GGUFError(f"{self.g.path}: key {key} = {shown} {rule}")

    def int(self, name: str, default=None, required: bool = False, lo: int = 1, hi: int = MAX_DIM) -> int:
        key, v = self._raw(name, required)
        if v is None:
            return default
        # bool is an int in Python, not in GGUF; a float (even 64.0) is refused as llama.cpp's typed getters do
        if isinstance(v, bool) or not isinstance(v, int):
            self._fail(key, v, "must be an integer")
        if not lo <= v <= hi:
            self._fail(key, v, f"must be in {lo}..{hi}")
        return v

    def float(self, name: str, default=None, above: float | None = None, at_most: float | None = None):
        key, v = self._raw(name, False)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self._fail(key, v, "must be a number")
        v = float(v)
        if not math.isfinite(v):
            self._fail(key, v, "must be finite")
        if above is not None and not v > above:
            self._fail(key, v, f"must be > {above:g}")
        if at_most is not None and v > at_most:
            self._fail(key, v, f"must be <= {at_most:g}")
        return v

    def str(self, name: str, default: str) -> str:
        key, v = self._raw(name, False)
        if v is None:
            return default
        if not isinstance(v, str):
            self._fail(key, v, "must be a string")
        return v

    def bool(self, name: str, default: bool) -> bool:
        key, v = self._raw(name, False)
        if v is None:
            return default
        if not isinstance(v, bool):
            self._fail(key, v, "must be a boolean")
        return v


def _vocab_size(g: GGUFFile, emb, n_embd: int) -> int:
    """Rows of the embedding table, which must match embedding_length and the tokenizer's vocabulary: llama.cpp
    refuses a mismatch too (src/llama-model.cpp creates token_embd as {n_embd, n_vocab} with n_vocab from the
    vocabulary, and llama-model-loader.cpp check_tensor_dims fails with "has wrong shape")."""
    if len(emb.shape) != 2 or emb.shape[0] != n_embd:
        raise GGUFError(f"{g.path}: tensor token_embd.weight has shape {list(emb.shape)}, expected "
                        f"[{n_embd}, n_vocab] (embedding_length {n_embd})")
    n_vocab = emb.shape[1]
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, (list, np.ndarray)) and len(tokens) != n_vocab:
        raise GGUFError(f"{g.path}: key tokenizer.ggml.tokens has {len(tokens)} tokens, but token_embd.weight has "
                        f"{n_vocab} rows (they must be equal)")
    return n_vocab


def _check_layers(g: GGUFFile, arch: str, n_layer: int) -> None:
    """block_count must describe the blk.N tensors the file holds: no tensor beyond it, and no layer without
    tensors (llama.cpp refuses both: a missing tensor, or "wrong number of tensors" for extra ones)."""
    present = set()
    for name in g.tensors:
        m = _BLOCK_NAME.match(name)
        if m:
            il = int(m.group(1))
            if il >= n_layer:
                raise GGUFError(f"{g.path}: tensor {shown(name)} belongs to layer {il}, but {arch}.block_count = {n_layer}")
            present.add(il)
    if len(present) != n_layer:
        missing = min(set(range(min(n_layer, len(present) + 1))) - present)
        raise GGUFError(f"{g.path}: key {arch}.block_count = {n_layer}, but the file has no tensors for layer "
                        f"{missing}")
