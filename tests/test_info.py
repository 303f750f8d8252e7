"""`edgelm info` architecture cards, checked against an independent source of truth: the Hugging Face
config.json and safetensors headers of the tiny checkpoints (converted to GGUF here), and the known facts of
the two real models (SmolLM2-135M, Gemma 3 270M)."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from edgelm.commands.describe import architecture_card, architecture_facts, column_header, format_card, format_compare
from tests.conftest import run_cli

TINY = Path(__file__).parent / "data" / "tiny"
NAMES = ["gpt2", "llama", "llama3", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma3", "gpt_oss"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """name -> path of the tiny checkpoint converted to an f32 GGUF (converted once per module)."""
    from edgelm.commands.convert import convert
    out = tmp_path_factory.mktemp("tiny_gguf")
    paths = {}

    def get(name: str) -> str:
        if name not in paths:
            p = out / f"{name}.gguf"
            convert(str(TINY / name), str(p), "f32")
            paths[name] = str(p)
        return paths[name]
    return get


def hf_config(name: str) -> dict:
    return json.loads((TINY / name / "config.json").read_text())


def hf_tensors(name: str) -> dict[str, list[int]]:
    """Tensor name -> shape from the checkpoint's safetensors headers (8-byte length + JSON)."""
    shapes = {}
    for f in sorted((TINY / name).glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def rope_params(c: dict) -> dict:
    """The (global layers') RoPE parameters: transformers 5 `rope_parameters`, older `rope_scaling` + rope_theta."""
    rp = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if "full_attention" in rp:
        rp = rp["full_attention"]
    rp = dict(rp)
    rp.setdefault("rope_theta", c.get("rope_theta", 10000.0))
    return rp


@pytest.mark.parametrize("name", NAMES)
def test_card_matches_hf_config(tiny, name):
    c = hf_config(name)
    shapes = hf_tensors(name)
    f = architecture_facts(tiny(name))

    heads = c.get("num_attention_heads") or c["n_head"]
    kv = c.get("num_key_value_heads") or heads
    d = c.get("hidden_size") or c["n_embd"]
    L = c.get("num_hidden_layers") or c["n_layer"]
    head_dim = c.get("head_dim") or d // heads
    assert (f["heads"], f["kv_heads"], f["head_dim"]) == (heads, kv, head_dim)
    assert f["attention"] == ("MHA" if kv == heads else "MQA" if kv == 1 else "GQA")
    assert f["group_size"] == heads // kv
    assert (f["layers"], f["embedding"], f["vocab"]) == (L, d, c["vocab_size"])
    assert f["context_length"] == (c.get("max_position_embeddings") or c.get("n_positions"))

    # sliding window: layer_types when given, else sliding_window on every layer (Mistral)
    if c.get("layer_types"):
        n_swa = c["layer_types"].count("sliding_attention")
    elif c.get("sliding_window") and c.get("use_sliding_window", True):
        n_swa = L
    else:
        n_swa = 0
    assert f["sliding_layers"] == n_swa
    assert f["sliding_window"] == (c["sliding_window"] if n_swa else 0)
    # one more token of context costs f16 K and V on the global layers only (a sliding layer keeps a ring)
    assert f["kv_bytes_per_token"] == (L - n_swa) * kv * 2 * head_dim * 2
    assert f["kv_cache"]["types"]["f32"]["bytes_per_token"] == 2 * f["kv_bytes_per_token"]
    assert (f["kv_cache"]["types"]["q8_0"] is None) == (head_dim % 32 != 0)

    # mixture of experts
    n_exp = c.get("num_local_experts") or c.get("num_experts") or 0
    assert f["experts"] == n_exp
    if n_exp:
        assert f["mlp"] == "moe" and f["experts_used"] == c["num_experts_per_tok"]
        assert f["expert_ffn"] == (c.get("moe_intermediate_size") or c["intermediate_size"])
    else:
        assert f["mlp"] == "dense"
        assert f["ffn"] == (c.get("intermediate_size") or c.get("n_inner") or 4 * d)

    # parameters: the checkpoint's element count (+ the rope_freqs vector llama.cpp adds for Llama-3 RoPE);
    # active: minus the unused experts' share of the expert tensors
    total = sum(numel(s) for s in shapes.values())
    rp = rope_params(c)
    if rp.get("rope_type") == "llama3":
        total += head_dim // 2
    assert f["parameters"] == total
    expert = sum(numel(s) for k, s in shapes.items() if ".experts." in k)
    active = total - (expert * (n_exp - c["num_experts_per_tok"]) // n_exp if n_exp else 0)
    assert f["parameters_active"] == active

    # positions
    if c["model_type"] == "gpt2":
        assert f["positions"] == "learned" and f["max_positions"] == c["n_positions"]
    else:
        assert f["positions"] == "rope" and f["rope_base"] == rp["rope_theta"]
        rtype = rp.get("rope_type") or rp.get("type") or "default"
        assert f["rope_scaling"] == {"default": "none"}.get(rtype, rtype)
        if rtype != "default":
            assert f["rope_factor"] == rp["factor"]
        if rtype == "yarn":
            assert f["rope_orig_ctx"] == rp["original_max_position_embeddings"]
        local = (c.get("rope_parameters") or {}).get("sliding_attention")
        assert f["rope_base_local"] == (local["rope_theta"] if local else None)

    # tying: output.weight absent, or a byte-identical copy (llama.cpp writes GPT-2's twice)
    assert f["tied_embeddings"] == c.get("tie_word_embeddings", True)
    assert f["output_is_stored_copy"] == (name == "gpt2")

    # what the checkpoint's tensors show: biases, sinks, QK-norm, sandwich norms, LayerNorm
    def any_(*parts):
        return any(all(p in k for p in ps) for k in shapes for ps in parts)
    expect_biases = [label for label, found in (
        ("qkv", any_(("q_proj.bias",), ("c_attn.bias",))),
        ("attn out", any_(("o_proj.bias",), ("attn.c_proj.bias",))),
        ("mlp", any_(("mlp.", "proj_bias"), ("mlp.c_fc.bias",), ("mlp.", "_proj.bias"))),
        ("router", any_(("router.bias",))),
        ("norms", any_(("ln_", ".bias"), ("layernorm.bias",))),
    ) if found]
    assert f["biases"] == expect_biases
    assert f["attn_sinks"] == any_(("sinks",))
    assert f["qk_norm"] == any_(("q_norm",))
    assert f["norm_placement"] == ("sandwich" if any_(("post_feedforward_layernorm",)) else "pre")
    assert f["norm"] == ("LayerNorm" if c["model_type"] == "gpt2" else "RMSNorm")
    act = c.get("hidden_activation") or c.get("hidden_act") or c.get("activation_function")
    gated = any_(("gate_proj",), ("gate_up_proj",))          # GPT-2's c_fc has no gate
    assert f["gated"] == gated
    if c["model_type"] == "gpt_oss":                          # hidden_act silu, clamped (swiglu_limit)
        assert "swiglu_limit" in c and f["activation"] == "clamped SwiGLU (gpt-oss)"
    else:
        base = {"silu": "SiLU", "gelu_new": "GELU", "gelu_pytorch_tanh": "GELU"}[act]
        assert f["activation"] == ({"SiLU": "SwiGLU", "GELU": "GeGLU"}[base] if gated else base)

    # f32 conversion: every tensor F32
    assert f["dominant_type"] == "F32" and f["bits_per_weight"] == 32.0

    card = format_card(f)
    assert architecture_card(tiny(name)) == card
    assert all(isinstance(v, str) and v for v in card.values())


def test_card_text_for_tiny_families(tiny):
    gpt2, q3moe, oss = (architecture_card(tiny(n)) for n in ("gpt2", "qwen3_moe", "gpt_oss"))
    assert gpt2["positions"] == "learned absolute (128)"
    assert gpt2["norm"] == "LayerNorm, pre" and gpt2["activation"] == "GELU, not gated"
    assert gpt2["attention"] == "MHA" and gpt2["biases"] == "qkv, attn out, mlp, norms"
    assert gpt2["tied embeddings"].startswith("yes")
    assert q3moe["MLP"].startswith("MoE: 8 experts, 2 active, width 32, softmax → top-k")
    assert q3moe["norm"] == "RMSNorm, pre, QK-norm"
    assert q3moe["active per token"].endswith("(61%)")
    assert oss["positions"] == "RoPE base 150000, YaRN ×32 from 4096"
    assert oss["sliding window"] == "8 on 1 of 2 layers (1 local : 1 global)"
    assert oss["attention sinks"] == "yes" and oss["activation"] == "clamped SwiGLU (gpt-oss), gated"
    assert "top-k → softmax" in oss["MLP"]
    assert architecture_card(tiny("llama3"))["positions"] == "RoPE base 500000, llama3 ×8 (rope_freqs)"
    assert architecture_card(tiny("mistral"))["sliding window"] == "8 on all 2 layers"


def test_smollm2_card(smollm2_path):
    f = architecture_facts(smollm2_path)
    assert f["architecture"] == "llama"
    assert (f["attention"], f["heads"], f["kv_heads"], f["group_size"], f["head_dim"]) == ("GQA", 9, 3, 3, 64)
    assert (f["layers"], f["embedding"], f["ffn"], f["mlp"]) == (30, 576, 1536, "dense")
    assert (f["norm"], f["norm_placement"], f["qk_norm"]) == ("RMSNorm", "pre", False)
    assert (f["activation"], f["gated"]) == ("SwiGLU", True)
    assert (f["positions"], f["rope_base"], f["rope_scaling"]) == ("rope", 100000.0, "none")
    assert f["tied_embeddings"] and not f["output_is_stored_copy"]
    assert (f["sliding_window"], f["attn_sinks"], f["biases"]) == (0, False, [])
    assert f["context_length"] == 8192
    assert f["parameters"] == f["parameters_active"] and 134e6 < f["parameters"] < 135e6
    assert f["dominant_type"] == "Q4_1"
    assert f["kv_bytes_per_token"] == 30 * 3 * 128 * 2 == 23040
    # q8_0 rows: 64 / 32 blocks of 34 bytes; q4_0: of 18 bytes (llama.cpp's block_q8_0 / block_q4_0)
    per_token = {"f16": 23040, "q8_0": 30 * 3 * 2 * 68, "q4_0": 30 * 3 * 2 * 36, "f32": 46080}
    types = f["kv_cache"]["types"]
    assert list(types) == ["f16", "q8_0", "q4_0", "f32"]
    for name, b in per_token.items():
        assert types[name] == {"bytes_per_token": b, "bytes": b * 8192, "sliding_bytes": 0}
    card = format_card(f)
    assert card["attention"] == "GQA (group size 3)"
    assert card["heads / KV / head dim"] == "9 / 3 / 64"
    assert card["positions"] == "RoPE base 100000"
    assert card["KV cache / token"] == "22.5 KiB (f16), 12.0 KiB (q8_0), 6.3 KiB (q4_0), 45.0 KiB (f32)"
    assert card["KV cache, full ctx"] == "180.0 MiB (f16), 95.6 MiB (q8_0), 50.6 MiB (q4_0), 360.0 MiB (f32) at 8192 tokens"


def test_gemma3_card(gemma_path):
    f = architecture_facts(gemma_path)
    assert f["architecture"] == "gemma3"
    assert (f["attention"], f["heads"], f["kv_heads"], f["head_dim"]) == ("MQA", 4, 1, 256)
    assert (f["norm"], f["norm_placement"], f["qk_norm"]) == ("RMSNorm", "sandwich", True)
    assert (f["activation"], f["gated"], f["mlp"], f["ffn"]) == ("GeGLU", True, "dense", 2048)
    assert (f["sliding_window"], f["sliding_layers"], f["layers"]) == (512, 15, 18)
    assert (f["rope_base"], f["rope_base_local"]) == (1e6, 10000.0)
    assert f["tied_embeddings"] and f["context_length"] == 32768
    assert f["dominant_type"] == "Q8_0"          # the 262144 x 640 embedding is most of the weights
    # every 6th layer global: 3 layers hold the full context, 15 a ring of window + batch - 1 = 1023 slots
    # (llama.cpp sizes its SWA cache by window + ubatch too: src/llama-kv-cache-iswa.cpp)
    kv = f["kv_cache"]
    assert (kv["global_layers"], kv["sliding_layers"], kv["ring_slots"]) == (3, 15, 512 + 511)
    for name, row in (("f16", 256 * 2), ("q8_0", 8 * 34), ("q4_0", 8 * 18), ("f32", 256 * 4)):
        per_slot = 1 * 2 * row                      # 1 KV head, K and V
        assert kv["types"][name]["bytes"] == per_slot * (3 * 32768 + 15 * 1023)
        assert kv["types"][name]["bytes_per_token"] == per_slot * 3
    assert f["kv_bytes_full_context"] == kv["types"]["f16"]["bytes"]
    card = format_card(f)
    assert card["KV cache, full ctx"].startswith("111.0 MiB (f16), 59.0 MiB (q8_0)")
    assert "15 sliding ones keep 1023 slots each" in card["KV cache / token"]
    assert card["attention"] == "MQA"
    assert card["sliding window"] == "512 on 15 of 18 layers (5 local : 1 global)"
    assert card["norm"] == "RMSNorm, sandwich (pre + post), QK-norm"
    assert card["positions"] == "RoPE base 1000000; local 10000"


def test_format_compare_aligns_columns():
    cols = [("a", {"x": "1", "longer label": "wide value here"}), ("bb", {"x": "22", "only b": "y"})]
    lines = format_compare(cols).splitlines()
    starts = [lines[0].index("a"), lines[0].index("bb")]
    assert set(lines[1]) <= {"-", " "}
    body = {ln.split("  ")[0]: ln for ln in lines[2:]}
    assert list(body) == ["x", "longer label", "only b"]
    for label, values in (("x", ["1", "22"]), ("longer label", ["wide value here", "—"]), ("only b", ["—", "y"])):
        for s, v in zip(starts, values):
            assert body[label][s:s + len(v)] == v
    assert column_header("/m/Model-Q4_0.gguf") == "Model-Q4_0"


def _assert_aligned(out: str, headers: list[str], cards: list[dict]):
    lines = out.splitlines()
    starts = [lines[0].index(h) for h in headers]
    assert starts == sorted(starts)
    rows = lines[2:]
    assert len(rows) == len(cards[0])
    for row, label in zip(rows, cards[0]):
        assert row.startswith(label)
        for s, card in zip(starts, cards):
            assert row[s:s + len(card[label])] == card[label], (label, row)


def test_cli_compare_tiny(tiny):
    names = ["gpt2", "qwen3", "qwen3_moe", "gpt_oss"]
    paths = [tiny(n) for n in names]
    r = run_cli("info", *paths, "--compare", timeout=120)
    assert r.returncode == 0, r.stderr
    _assert_aligned(r.stdout, names, [architecture_card(p) for p in paths])
    # several files compare without the flag; --json gives a list of facts with their cards
    r2 = run_cli("info", *paths[:2], timeout=120)
    assert r2.returncode == 0, r2.stderr
    _assert_aligned(r2.stdout, names[:2], [architecture_card(p) for p in paths[:2]])
    r3 = run_cli("info", "--json", "--compare", paths[2], timeout=120)
    doc = json.loads(r3.stdout)
    assert len(doc) == 1 and doc[0]["experts"] == 8 and doc[0]["card"]["MLP"].startswith("MoE")


def test_cli_compare_real(smollm2_path, gemma_path):
    r = run_cli("info", smollm2_path, gemma_path, "--compare", timeout=120)
    assert r.returncode == 0, r.stderr
    headers = [column_header(smollm2_path), column_header(gemma_path)]
    _assert_aligned(r.stdout, headers, [architecture_card(smollm2_path), architecture_card(gemma_path)])
    assert "GQA (group size 3)" in r.stdout and "MQA" in r.stdout


def test_cli_single_file_shows_card_without_repeating_it(tiny):
    r = run_cli("info", tiny("qwen3_moe"), timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for line in ("  file size ", "  quant types ", "  tokenizer ", "  card"):
        assert line in out
    assert "    MLP                    MoE: 8 experts" in out
    assert "  tensors" not in out                        # the table only with --tensors
    header = out[:out.index("  card")]
    for card_fact in ("architecture", "attention", "layers", "context", "bits/weight"):
        assert card_fact not in header, header       # said once, in the card
    d = json.loads(run_cli("info", "--json", "--tensors", tiny("qwen3"), timeout=120).stdout)
    assert d["architecture"] == "qwen3" and d["card"]["norm"] == "RMSNorm, pre, QK-norm" and "tensors" in d


def test_cli_tensor_table_in_layer_order(smollm2_path):
    from edgelm.gguf_file import GGUFFile
    r = run_cli("info", "--tensors", smollm2_path, timeout=120)
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("  tensors\n"):].splitlines()[1:]
    names = [row.split()[0] for row in table]
    assert sorted(names) == sorted(GGUFFile(smollm2_path).tensors)       # every tensor, once
    layers = [int(n.split(".")[1]) for n in names if n.startswith("blk.")]
    assert layers == sorted(layers) and layers[-1] == 29                 # blk.2 before blk.10
    assert not any(n.startswith("blk.") for n in names[:len(names) - len(layers)])   # the others first


def test_cli_compare_bad_file_is_one_line(tiny, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    r = run_cli("info", tiny("qwen3"), str(bad), "--compare", timeout=120)
    assert r.returncode != 0 and r.stdout == ""
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgelm: error:") and str(bad) in err[0]
    missing = tmp_path / "nope.gguf"
    r = run_cli("info", str(missing), tiny("qwen3"), timeout=120)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and str(missing) in r.stderr
