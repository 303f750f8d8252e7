"""A model's hyper-parameters, read from GGUF metadata (`{arch}.*` keys, names as in gguf-py constants.py Keys)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from .arch.traits import ARCH_TRAITS, ArchTraits
from .errors import GGUFError, UnsupportedError
from .gguf_file import GGUFFile


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
        arch = g.architecture
        traits = ARCH_TRAITS.get(arch)
        if traits is None:
            known = ", ".join(sorted(ARCH_TRAITS))
            raise UnsupportedError(f"{g.path}: architecture '{arch}' is not supported (supported: {known})")

        def key(name: str, default=None, required=False, kind=(int, float)):
            k = f"{arch}.{name}"
            if k in g.metadata:
                v = g.metadata[k]
                if not isinstance(v, kind) or (isinstance(v, bool) and bool not in kind):
                    raise GGUFError(f"{g.path}: metadata key {k} should be a {kind[0].__name__}, "
                                    f"found {type(v).__name__}")
                return v
            if required:
                raise GGUFError(f"{g.path}: required metadata key {k} is missing")
            return default

        n_embd = int(key("embedding_length", required=True))
        n_head = int(key("attention.head_count", required=True))
        n_head_kv = int(key("attention.head_count_kv", n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise GGUFError(f"{g.path}: {arch}.attention.head_count {n_head} is not a multiple of "
                            f"head_count_kv {n_head_kv}")
        head_dim = int(key("attention.key_length", n_embd // n_head))
        head_dim_v = int(key("attention.value_length", head_dim))
        tokens = g.get("tokenizer.ggml.tokens")
        emb = g.tensors.get("token_embd.weight")
        if emb is None:
            raise GGUFError(f"{g.path}: tensor token_embd.weight is missing")
        n_vocab = int(key("vocab_size", emb.shape[1] if len(emb.shape) > 1 else len(tokens or [])))
        rope_base = float(key("rope.freq_base", 10000.0))
        swa_base = key("rope.freq_base_swa", None)
        n_expert = int(key("expert_count", 0))
        scaling = str(key("rope.scaling.type", "none", kind=(str,)))
        if scaling not in ("none", "linear", "yarn"):
            raise UnsupportedError(f"{g.path}: {arch}.rope.scaling.type '{scaling}' is not supported "
                                   f"(supported: none, linear, yarn)")
        cfg = cls(
            arch=arch, traits=traits,
            n_layer=int(key("block_count", required=True)),
            n_embd=n_embd,
            n_ff=int(key("feed_forward_length", 0, required=not n_expert)),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, head_dim_v=head_dim_v,
            n_vocab=n_vocab,
            n_ctx_train=int(key("context_length", 2048)),
            norm_eps=float(key(traits.norm_eps_key, 1e-5)),
            rope_base=rope_base,
            rope_base_swa=float(swa_base if swa_base is not None else (traits.rope_base_swa or rope_base)),
            rope_dim=int(key("rope.dimension_count", head_dim)),
            sliding_window=int(key("attention.sliding_window", 0)),
            attn_scale=float(key("attention.scale", 1.0 / math.sqrt(head_dim))),
            n_expert=n_expert,
            n_expert_used=int(key("expert_used_count", 0, required=bool(n_expert))),
            n_ff_exp=int(key("expert_feed_forward_length", 0, required=bool(n_expert))),
            expert_weights_norm=bool(key("expert_weights_norm", traits.expert_weights_norm, kind=(bool,))),
            rope_scaling=scaling,
            rope_factor=float(key("rope.scaling.factor", 1.0)),
            rope_orig_ctx=int(key("rope.scaling.original_context_length", 0)),
            yarn_beta_fast=float(key("rope.scaling.yarn_beta_fast", 32.0)),
            yarn_beta_slow=float(key("rope.scaling.yarn_beta_slow", 1.0)),
        )
        if n_expert and not 0 < cfg.n_expert_used <= n_expert:
            raise GGUFError(f"{g.path}: {arch}.expert_used_count {cfg.n_expert_used} is not in 1..{n_expert}")
        return cfg

    @property
    def kv_bytes_per_token(self) -> int:
        """f16 K and V for every layer."""
        return self.n_layer * self.n_head_kv * (self.head_dim + self.head_dim_v) * 2
