"""What differs between architectures, as data. The decoder reads these; it has no per-family branches.

Facts per family were checked against transformers' model code (models/llama/modeling_llama.py,
models/gemma3/modeling_gemma3.py) and llama.cpp's loader (src/llama-model.cpp, src/llama-arch.cpp).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchTraits:
    name: str
    norm: str = "rms"                 # "rms" | "layer"
    activation: str = "silu"          # gated MLP activation: "silu" (SwiGLU) | "gelu_tanh" (GeGLU)
    rope_style: str = "norm"          # "norm": rotate adjacent pairs (llama.cpp permutes llama Q/K at convert time)
                                      # "neox": rotate the two halves of each head (HF rotate_half)
    qk_norm: bool = False             # RMSNorm over each head of q and k before RoPE
    sandwich_norm: bool = False       # extra norms after attention and after the MLP (post_attention_norm, post_ffw_norm)
    embed_scale_sqrt_dim: bool = False  # embeddings multiplied by sqrt(n_embd)
    swa_pattern: int = 0              # every swa_pattern-th layer is global, the others use the sliding window; 0 = none
    rope_base_swa: float | None = None  # RoPE base of sliding-window layers, when it differs and the GGUF has no key
    norm_eps_key: str = "attention.layer_norm_rms_epsilon"


ARCH_TRAITS: dict[str, ArchTraits] = {
    "llama": ArchTraits("llama"),
    # gemma3: llama.cpp src/llama-model.cpp LLM_ARCH_GEMMA3 (set_swa_pattern(6), rope_freq_base_train_swa 10000,
    # LLAMA_ROPE_TYPE_NEOX); transformers Gemma3TextConfig (rope_local_base_freq=10000, gelu_pytorch_tanh,
    # Gemma3TextScaledWordEmbedding * hidden_size**0.5, q_norm/k_norm, four norms per layer).
    # The GGUF stores Gemma's norm weights already as (1 + w) (llama.cpp convert_hf_to_gguf.py Gemma3Model).
    "gemma3": ArchTraits("gemma3", activation="gelu_tanh", rope_style="neox", qk_norm=True, sandwich_norm=True,
                         embed_scale_sqrt_dim=True, swa_pattern=6, rope_base_swa=10000.0),
}
