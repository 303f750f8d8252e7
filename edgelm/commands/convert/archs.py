"""How each Hugging Face architecture becomes a GGUF, as data: which llama.cpp architecture it maps to and
which tensor rewrites llama.cpp's converter applies (convert_hf_to_gguf.py: LlamaModel.permute for Q/K,
GPT2Model's transposed Conv1D weights, Gemma3Model's norm + 1, GptOssModel's de-interleaved gate/up,
Qwen2MoeModel's stacked experts). Tensor names come from gguf-py's own map (gguf.get_tensor_name_map).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from ...errors import EdgeLMError, UnsupportedError


@dataclass(frozen=True)
class ConvertSpec:
    arch: str                                   # GGUF general.architecture (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False                    # llama.cpp's "norm" RoPE pairs: reorder Q/K rows per head
    conv1d: tuple[str, ...] = ()                # weights stored (in, out) by Conv1D: transpose
    norm_plus_one: bool = False                 # Gemma stores norm weights as w; GGUF holds 1 + w
    stacked_experts: bool = False               # experts.N.{gate,up,down}_proj -> one 3-D tensor each
    interleaved_gate_up: bool = False           # gpt-oss experts.gate_up_proj: gate/up rows alternate
    duplicate_output: bool = False              # write output.weight as a copy of the tied embeddings
    skip: tuple[str, ...] = ()                  # regexes of checkpoint tensors that are not weights


SPECS: dict[str, ConvertSpec] = {
    "GPT2LMHeadModel": ConvertSpec("gpt2", conv1d=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                                   "mlp.c_proj.weight"),
                                   duplicate_output=True, skip=(r"\.attn\.(masked_)?bias$",)),
    "LlamaForCausalLM": ConvertSpec("llama", permute_qk=True),
    "MistralForCausalLM": ConvertSpec("llama", permute_qk=True),
    "Qwen2ForCausalLM": ConvertSpec("qwen2"),
    "Qwen3ForCausalLM": ConvertSpec("qwen3"),
    "Qwen3MoeForCausalLM": ConvertSpec("qwen3moe", stacked_experts=True),
    "Phi3ForCausalLM": ConvertSpec("phi3"),
    "Gemma3ForCausalLM": ConvertSpec("gemma3", norm_plus_one=True),
    "GptOssForCausalLM": ConvertSpec("gpt-oss", interleaved_gate_up=True),
}

_ALWAYS_SKIP = (r"rotary_emb\.inv_freq$",)


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half Q/K rows -> llama.cpp's adjacent-pair order, per head (LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


@dataclass
class Source:
    """One tensor to write: its Hugging Face-style name (for the name map), shape and a loader."""
    hf_name: str
    shape: tuple[int, ...]
    load: object          # () -> float32 array


def sources(spec: ConvertSpec, ckpt, hp) -> list[Source]:
    """The checkpoint's tensors after this architecture's rewrites, still under HF-style names."""
    skips = [re.compile(p) for p in spec.skip + _ALWAYS_SKIP]
    names = [n for n in ckpt.names() if not any(p.search(n) for p in skips)]
    if hp.tied and "lm_head.weight" in names:
        names.remove("lm_head.weight")
    out: list[Source] = []
    experts: dict[tuple[str, str], dict[int, str]] = {}
    expert_re = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    for name in names:
        if name.endswith(("_blocks", "_scales")):
            raise UnsupportedError(f"{ckpt.entries[name].file}: tensor {name} is MXFP4-packed; converting "
                                   f"pre-quantized MXFP4 checkpoints is not supported yet (use a bf16 one)")
        m = expert_re.match(name) if spec.stacked_experts else None
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = name
            continue
        if spec.interleaved_gate_up and re.search(r"\.experts\.(gate_up_proj|down_proj)(_bias)?$", name):
            out.extend(_gpt_oss_experts(ckpt, name))
            continue
        out.append(_plain(spec, ckpt, hp, name))
    for (stem, proj), by_id in sorted(experts.items()):
        ids = sorted(by_id)
        if ids != list(range(hp.n_expert)):
            raise EdgeLMError(f"{ckpt.dir}: {stem}.*.{proj} has experts {ids[:3]}..., expected 0..{hp.n_expert - 1}")
        members = [by_id[i] for i in ids]
        shape = (len(ids),) + ckpt.shape(members[0])
        out.append(Source(f"{stem}.{proj}.weight", shape,
                          lambda ms=members: np.stack([ckpt.load(n) for n in ms])))
    return out


def _plain(spec: ConvertSpec, ckpt, hp, name: str) -> Source:
    shape = ckpt.shape(name)
    ops = []
    if any(name.endswith(s) for s in spec.conv1d):
        ops.append(lambda a: a.T)
        shape = shape[::-1]
    if spec.permute_qk and re.search(r"\.(q_proj)\.(weight|bias)$", name):
        ops.append(lambda a: permute_rows(a, hp.n_head))
    if spec.permute_qk and re.search(r"\.(k_proj)\.(weight|bias)$", name):
        ops.append(lambda a: permute_rows(a, hp.n_head_kv))
    if spec.norm_plus_one and name.endswith("norm.weight"):
        ops.append(lambda a: a + np.float32(1.0))

    def load():
        a = ckpt.load(name)
        for op in ops:
            a = op(a)
        return np.ascontiguousarray(a, dtype=np.float32)
    # gpt-oss's self_attn.sinks has no .weight suffix; llama.cpp names it attn_sinks.weight
    return Source(name + ".weight" if name.endswith(".sinks") else name, shape, load)


def _gpt_oss_experts(ckpt, name: str) -> list[Source]:
    """gpt-oss stores experts as (E, in, out) with gate and up interleaved along out (GptOssExperts:
    gate_up[..., ::2], gate_up[..., 1::2]); GGUF wants (E, out, in) with separate gate and up."""
    stem, kind = name.rsplit(".", 1)
    shape = ckpt.shape(name)
    if kind == "down_proj":
        return [Source(f"{stem}.down_proj.weight", (shape[0], shape[2], shape[1]),
                       lambda: np.ascontiguousarray(ckpt.load(name).transpose(0, 2, 1)))]
    if kind == "down_proj_bias":
        return [Source(f"{stem}.down_proj.bias", shape, lambda: ckpt.load(name))]
    if kind == "gate_up_proj":
        E, n_in, n2 = shape
        return [Source(f"{stem}.{part}.weight", (E, n2 // 2, n_in),
                       lambda j=j: np.ascontiguousarray(ckpt.load(name)[:, :, j::2].transpose(0, 2, 1)))
                for j, part in enumerate(("gate_proj", "up_proj"))]
    E, n2 = shape                                   # gate_up_proj_bias
    return [Source(f"{stem}.{part}.bias", (E, n2 // 2), lambda j=j: np.ascontiguousarray(ckpt.load(name)[:, j::2]))
            for j, part in enumerate(("gate_proj", "up_proj"))]
