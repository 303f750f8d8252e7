"""What differs between architectures, as data. The decoder reads these; it has no per-family branches.

What a file can say for itself it does: biases, fused QKV or gate/up matrices, learned positions, attention
sinks, RoPE frequency factors and mixtures of experts are recognised by the tensors present; sizes, windows
and RoPE scaling by metadata keys. Traits hold only what llama.cpp hard-codes per architecture.

Facts per family were checked against transformers' model code (models/<family>/modeling_<family>.py) and
llama.cpp's loader and graphs (src/llama-model.cpp, src/models/*.cpp, src/llama-arch.cpp).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchTraits:
    name: str
    norm: str = "rms"                 # "rms" | "layer" (LayerNorm with bias: GPT-2)
    positions: str = "rope"           # "rope" | "learned" (position_embd added to the token embeddings)
    activation: str = "silu"          # "silu" (SwiGLU), "gelu_tanh" (GeGLU, or GELU when not gated),
                                      # "swiglu_oai" (gpt-oss: clamped gate and up, gate*sigmoid(1.702 gate)*(up+1))
    gated_mlp: bool = True            # False: down(act(up(x))) as in GPT-2
    rope_style: str = "norm"          # "norm": rotate adjacent pairs (llama.cpp permutes llama Q/K at convert time)
                                      # "neox": rotate the two halves of each head (HF rotate_half)
    qk_norm: bool = False             # RMSNorm over each head of q and k before RoPE
    sandwich_norm: bool = False       # extra norms after attention and after the MLP (post_attention_norm, post_ffw_norm)
    ffn_norm: str = "ffn_norm"        # GGUF name of the norm before the MLP (gpt-oss calls it post_attention_norm)
    embed_scale_sqrt_dim: bool = False  # embeddings multiplied by sqrt(n_embd)
    swa_pattern: int = 1              # with a sliding window: 1 = every layer slides; n > 1 = every n-th layer
                                      # is global, the others slide (llama.cpp set_swa_pattern)
    rope_base_swa: float | None = None  # RoPE base of sliding-window layers, when it differs and the GGUF has no key
    norm_eps_key: str = "attention.layer_norm_rms_epsilon"
    moe_routing: str = "softmax_topk"  # "softmax_topk": softmax over all experts, then top-k (Qwen3-MoE);
                                       # "topk_softmax": top-k logits, then softmax over those (gpt-oss)
    expert_weights_norm: bool = False  # renormalise the top-k probabilities (unless the GGUF key says otherwise)
    yarn_truncate: bool = True        # YaRN correction range rounded to whole dims (transformers `truncate`)
    scale_swa_rope: bool = True       # RoPE scaling applies to sliding-window layers too (Gemma 3: global only)


ARCH_TRAITS: dict[str, ArchTraits] = {t.name: t for t in [
    # GPT-2: LayerNorm, learned positions, GELU (gelu_new = tanh form), fused c_attn (modeling_gpt2.py).
    ArchTraits("gpt2", norm="layer", positions="learned", activation="gelu_tanh", gated_mlp=False,
               norm_eps_key="attention.layer_norm_epsilon"),
    # Llama, Mistral (converted as llama, like llama.cpp does), SmolLM.
    ArchTraits("llama", expert_weights_norm=True),     # Mixtral (llama.cpp models/llama.cpp: norm_w true)
    # Qwen2: QKV biases (found as tensors); NEOX rotation (llama.cpp LLAMA_ROPE_TYPE_NEOX for qwen2).
    ArchTraits("qwen2", rope_style="neox"),
    ArchTraits("qwen3", rope_style="neox", qk_norm=True),
    # Qwen3-MoE: softmax router, top-k, probabilities renormalised when config.norm_topk_prob
    # (modeling_qwen3_moe.py Qwen3MoeSparseMoeBlock; llama.cpp src/models/qwen3moe.cpp norm_w = true).
    ArchTraits("qwen3moe", rope_style="neox", qk_norm=True, expert_weights_norm=True),
    # Phi-3: fused qkv_proj and gate_up_proj (gate first), NEOX rotation.
    ArchTraits("phi3", rope_style="neox"),
    # gemma3: llama.cpp LLM_ARCH_GEMMA3 (set_swa_pattern(6), rope_freq_base_train_swa 10000,
    # LLAMA_ROPE_TYPE_NEOX); transformers Gemma3TextConfig (rope_local_base_freq=10000, gelu_pytorch_tanh,
    # Gemma3TextScaledWordEmbedding * hidden_size**0.5, q_norm/k_norm, four norms per layer).
    # The GGUF stores Gemma's norm weights already as (1 + w) (llama.cpp convert_hf_to_gguf.py Gemma3Model).
    ArchTraits("gemma3", activation="gelu_tanh", rope_style="neox", qk_norm=True, sandwich_norm=True,
               embed_scale_sqrt_dim=True, swa_pattern=6, rope_base_swa=10000.0, scale_swa_rope=False),
    # gpt-oss: even layers slide (llama.cpp set_swa_pattern(2); transformers layer_types), router top-k
    # then softmax, clamped SwiGLU with alpha 1.702 (modeling_gpt_oss.py GptOssExperts), attention sinks,
    # YaRN with truncate=False (its config.json rope_scaling).
    ArchTraits("gpt-oss", rope_style="neox", activation="swiglu_oai", ffn_norm="post_attention_norm",
               swa_pattern=2, moe_routing="topk_softmax", yarn_truncate=False),
]}
