"""Tiny random Hugging Face checkpoints, one per architecture, with transformers' own float32 logits.

What it makes (tests/data/tiny/<name>/, about 0.2-0.6 MB each, a few MB in all):

    config.json, generation_config.json    as transformers' save_pretrained writes them
    model.safetensors                      (qwen3_moe: model.safetensors.index.json + 3 shards)
    tokenizer.json, tokenizer_config.json  saved by transformers' tokenizer classes, as on the hub
    tokenizer.model                        SentencePiece checkpoints only (llama, mistral, phi3, gemma3)
    reference.npz                          `ids` int64 (40,), `logits` float32 (40, vocab): transformers'
                                           eager float32 forward over the *saved* weights
    tokenizer_golden.json                  {"cases": [{"text", "add_special", "ids", "decoded"}, ...]}:
                                           the HF tokenizer's ids (and decode) for 6 awkward texts, with and
                                           without special tokens; SentencePiece checkpoints add "spm_ids", the
                                           sentencepiece library's ids (see sentencepiece_ids: they differ from
                                           transformers' for leading spaces and text right after a special
                                           token, where llama.cpp follows sentencepiece)

Checkpoints: gpt2 (float32), llama, llama3, mistral, qwen2 (float16), qwen3, qwen3_moe, phi3, gemma3 (as
Gemma3ForCausalLM, model_type gemma3_text) and gpt_oss (bfloat16 unless said); see CHECKPOINTS. Hidden size
64, 2 layers (gemma3: 6, five sliding + one global), 4 heads, 2 KV heads unless said, sliding windows of 8 so
the 40-token references depend on them. config.json is transformers 5's: RoPE settings are under
`rope_parameters` (gemma3: one entry per layer type), not `rope_theta` / `rope_scaling`. The weights are the
config's random init with every parameter of 2+ dimensions multiplied by 2.5 (logit std about 0.4) and every
1-D parameter (norm weights, biases, attention sinks) moved by 0.1 * N(0, 1), so a converter that drops or
swaps one of those is caught too.

Vocabularies (512 tokens each) are trained here on tests/corpus/tokenizer_corpus.json plus the docstrings of
a fixed list of standard-library modules:
  - byte-level BPE (`tokenizers`): ByteLevel pre-tokenizer with the GPT-2 regex and ByteLevel decoder (qwen2:
    Qwen2's NFC + split regex instead, see BPE_FLAVOURS), special tokens appended after the merges as on the
    hub: gpt2 <|endoftext|>; llama3 <|begin_of_text|> (prepended by the post-processor) and friends; qwen2,
    qwen3, qwen3_moe ChatML (+ <think> </think> as plain added tokens for qwen3); gpt_oss the harmony tokens.
    Saved with PreTrainedTokenizerFast.
  - SentencePiece BPE (byte_fallback, split_digits): llama-style (unk 0, bos 1, eos 2, dummy prefix) saved
    with LlamaTokenizer for llama/mistral/phi3; gemma-style (pad 0, eos 1, bos 2, unk 3, then <mask>
    <start_of_turn> <end_of_turn> user-defined; no dummy prefix) saved with GemmaTokenizer for gemma3.
qwen2/qwen3/qwen3_moe have a ChatML chat_template and gemma3 a Gemma one, in tokenizer_config.json, which is
tidied after saving (see tidy_tokenizer_config).

Regenerate (from the repository root, with the reference venv: torch, transformers 5.x, tokenizers,
sentencepiece; no network needed):

    HF_HUB_OFFLINE=1 ~/.cache/edgelm-reference/venv/bin/python tools/make_tiny_checkpoints.py [--only a,b]
    HF_HUB_OFFLINE=1 ~/.cache/edgelm-reference/venv/bin/python tools/make_tiny_checkpoints.py --check

The output is deterministic given SEED (and the same Python, torch, transformers, tokenizers and
sentencepiece versions: the training text includes the stdlib docstrings of the interpreter that runs this).
--check reloads every directory with transformers (AutoTokenizer, AutoModelForCausalLM) and compares the
reference ids, the golden tokenizer ids and decodes, and the logits with the stored ones.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus" / "tokenizer_corpus.json"
OUT = ROOT / "tests" / "data" / "tiny"

SEED = 0
VOCAB = 512
N_IDS = 40
SCALE = 2.5  # every >= 2-D parameter is multiplied by this after init
BIAS_NOISE = 0.1  # every 1-D parameter gets this * N(0, 1) added

# The reference text: sentences with digits and punctuation, repeated.
TEXT = ("The 3 quick brown foxes jumped over 12 lazy dogs at 10:45, didn't they? "
        "Yes: 7 of them ran 2.5 km north; the rest (5) stayed home! ") * 4

# Docstrings of these modules (and of their public members) are added to the training text.
STDLIB_MODULES = [
    "abc", "argparse", "base64", "bisect", "calendar", "collections", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "enum", "fractions", "functools", "glob", "gzip", "hashlib", "heapq",
    "html", "inspect", "io", "itertools", "json", "logging", "math", "operator", "os", "pathlib", "pickle",
    "pprint", "queue", "random", "re", "shlex", "shutil", "statistics", "string", "struct", "subprocess",
    "tempfile", "textwrap", "threading", "unittest", "urllib.parse", "uuid", "zipfile",
]

# ---------------------------------------------------------------------------------------------------------
# Tokenizers

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

# Byte-level BPE flavours: special tokens (appended after the merges, in this order), plain added tokens,
# the roles of the special tokens, whether BOS is prepended, and a text with embedded special tokens.
# All split words with the GPT-2 regex (ByteLevel's own), except qwen2: transformers 5 loads every model_type
# "qwen2" checkpoint with Qwen2Tokenizer, which imposes Qwen2's split regex whatever tokenizer.json says, so that
# vocabulary is trained and saved with Qwen2's pre-tokenizer (Split(QWEN2_REGEX) + ByteLevel without regex) to
# keep tokenizer.json and AutoTokenizer in agreement (with Qwen2's NFC normalizer too).
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BPE_FLAVOURS = {
    "gpt2": {
        "special": ["<|endoftext|>"], "plain": [],
        "roles": {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        "add_bos": False,
        "special_text": "one<|endoftext|>two <|endoftext|> three",
    },
    "llama3": {
        "special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                    "<|eot_id|>"],
        "plain": [],
        "roles": {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"},
        "add_bos": True,
        "special_text": "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|><|begin_of_text|>ok",
    },
    "qwen2": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "plain": [], "regex": "qwen2",
        "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "add_bos": False,
        "special_text": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    },
    "qwen3": {
        "special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "plain": ["<think>", "</think>"],
        "roles": {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        "add_bos": False,
        "special_text": "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nok<|im_end|><|endoftext|>",
    },
    "gpt_oss": {
        "special": ["<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>",
                    "<|start|>", "<|end|>", "<|message|>", "<|call|>"],
        "plain": [],
        "roles": {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"},
        "add_bos": False,
        "special_text": "<|start|>user<|message|>Hi<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>",
    },
}

# SentencePiece flavours: trainer ids / pieces, user-defined pieces (ids 4, 5, ...), dummy prefix, and a text with
# embedded special tokens.
SPM_FLAVOURS = {
    "llama": {
        "ids": {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1},
        "user_defined": [],
        "add_dummy_prefix": True,
        "special_text": "<s>Hi</s> there </s>x",
    },
    "gemma": {
        "ids": {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3,
                "pad_piece": "<pad>", "eos_piece": "<eos>", "bos_piece": "<bos>", "unk_piece": "<unk>"},
        "user_defined": ["<mask>", "<start_of_turn>", "<end_of_turn>"],
        "add_dummy_prefix": False,
        "special_text": "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    },
}

GOLDEN_TEXTS = [
    "Hello world",
    "  two leading spaces\nand a newline,\n\n\tthen a tab",
    "Digits: 1234567 and 3.14159; 2^10 = 1024 (100%)",
    "café naïve résumé — “quotes” Ångström 日本語",
    "emoji 🦊🎉 done 👍🏽!",
    None,  # the flavour's special_text
]


def training_lines() -> list[str]:
    """The training text: the tokenizer corpus, then stdlib docstrings, as a list of non-empty lines."""
    texts = [t for t in json.loads(CORPUS.read_text(encoding="utf-8")) if t.strip()]
    for name in STDLIB_MODULES:
        mod = importlib.import_module(name)
        objs = [mod] + [getattr(mod, k) for k in sorted(vars(mod)) if not k.startswith("_")]
        for obj in objs:
            doc = getattr(obj, "__doc__", None)
            if isinstance(doc, str) and (obj is mod or getattr(obj, "__module__", None) == mod.__name__):
                texts.append(doc)
    lines = []
    for t in texts:
        lines.extend(line for line in t.splitlines() if line.strip())
    return lines


def train_bpe(flavour: str, lines: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` of VOCAB tokens: 256 bytes, merges, then the added tokens."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    spec = BPE_FLAVOURS[flavour]
    added = spec["special"] + spec["plain"]
    tok = Tokenizer(models.BPE())
    tok.normalizer = None
    if spec.get("regex") == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(added), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() == VOCAB - len(added), tok.get_vocab_size()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec["special"]])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec["plain"]])
    assert tok.get_vocab_size() == VOCAB
    byte_level = processors.ByteLevel(trim_offsets=False)
    if spec["add_bos"]:
        bos = spec["roles"]["bos_token"]
        template = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                 special_tokens=[(bos, tok.token_to_id(bos))])
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok


def bpe_tokenizer(flavour: str, lines: list[str], chat_template: str | None):
    from transformers import PreTrainedTokenizerFast

    spec = BPE_FLAVOURS[flavour]
    extra = [t for t in spec["special"] if t not in spec["roles"].values()]
    kw = dict(spec["roles"], extra_special_tokens=extra) if extra else dict(spec["roles"])
    if chat_template:
        kw["chat_template"] = chat_template
    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(flavour, lines), clean_up_tokenization_spaces=False,
                                   model_max_length=128 if flavour == "gpt2" else 131072, **kw)


def train_spm(flavour: str, lines: list[str]) -> bytes:
    """A SentencePiece BPE model (serialized tokenizer.model) of VOCAB pieces."""
    import sentencepiece as spm

    spec = SPM_FLAVOURS[flavour]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, split_digits=True, character_coverage=0.9995, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, max_sentence_length=1 << 16,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=spec["add_dummy_prefix"], allow_whitespace_only_pieces=True,
        split_by_whitespace=True, user_defined_symbols=spec["user_defined"], minloglevel=2, **spec["ids"])
    return buf.getvalue()


def spm_tokenizer(flavour: str, model: bytes, chat_template: str | None, workdir: Path):
    """The transformers tokenizer of a SentencePiece model (converted from the tokenizer.model file)."""
    from transformers import GemmaTokenizer, LlamaTokenizer

    src = workdir / f"spm-{flavour}"
    src.mkdir(parents=True, exist_ok=True)
    (src / "tokenizer.model").write_bytes(model)
    # transformers does not register SentencePiece user-defined pieces as added tokens; Gemma's hub tokenizer has
    # its turn markers as special added tokens, so name them here (they keep their SentencePiece ids).
    extra = [t for t in SPM_FLAVOURS[flavour]["user_defined"] if t != "<mask>"]
    kw = {"add_bos_token": True, "add_eos_token": False, "extra_special_tokens": extra, "model_max_length": 131072}
    if chat_template:
        kw["chat_template"] = chat_template
    if flavour == "gemma":
        tok = GemmaTokenizer.from_pretrained(str(src), **kw)
    else:
        tok = LlamaTokenizer.from_pretrained(str(src), legacy=False, add_prefix_space=True, **kw)
    assert len(tok) == VOCAB, (flavour, len(tok))
    assert all(tok.convert_tokens_to_ids(t) == i for i, t in enumerate(SPM_FLAVOURS[flavour]["user_defined"], 4))
    return tok


# ---------------------------------------------------------------------------------------------------------
# Models

COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False}

# name: (config class, config kwargs, tokenizer ("bpe"|"spm", flavour), chat template, save dtype)
# rope_theta / rope_scaling are given as transformers 5's `rope_parameters` (config.json stores that).
CHECKPOINTS = {
    "gpt2": ("GPT2Config",
             {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "n_inner": 128,
              "activation_function": "gelu_new"},
             ("bpe", "gpt2"), None, "float32"),
    "llama": ("LlamaConfig",
              {**COMMON, "num_key_value_heads": 4,
               "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
              ("spm", "llama"), None, "bfloat16"),
    "llama3": ("LlamaConfig",
               {**COMMON, "tie_word_embeddings": True,
                "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}},
               ("bpe", "llama3"), None, "bfloat16"),
    "mistral": ("MistralConfig", {**COMMON, "sliding_window": 8}, ("spm", "llama"), None, "bfloat16"),
    "qwen2": ("Qwen2Config", {**COMMON, "tie_word_embeddings": True}, ("bpe", "qwen2"), CHATML_TEMPLATE, "float16"),
    "qwen3": ("Qwen3Config", {**COMMON, "head_dim": 32}, ("bpe", "qwen3"), CHATML_TEMPLATE, "bfloat16"),
    "qwen3_moe": ("Qwen3MoeConfig",
                  {**COMMON, "head_dim": 16, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []},
                  ("bpe", "qwen3"), CHATML_TEMPLATE, "bfloat16"),
    "phi3": ("Phi3Config",
             {**COMMON, "original_max_position_embeddings": 128, "sliding_window": None, "pad_token_id": 0},
             ("spm", "llama"), None, "bfloat16"),
    "gemma3": ("Gemma3TextConfig",
               {**COMMON, "intermediate_size": 96, "num_hidden_layers": 6, "head_dim": 32, "sliding_window": 8,
                "query_pre_attn_scalar": 32, "tie_word_embeddings": True,
                # as Gemma 3 4B and larger: linear RoPE scaling on the global layers only
                "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
               ("spm", "gemma"), GEMMA_TEMPLATE, "bfloat16"),
    "gpt_oss": ("GptOssConfig",
                {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 32,
                 "sliding_window": 8},
                ("bpe", "gpt_oss"), None, "bfloat16"),
}
SHARDED = {"qwen3_moe": "150KB"}


def tidy_tokenizer_config(path: Path, kind: str) -> None:
    """Make tokenizer_config.json look like a hub file: no local-loading keys; BPE ones name the class
    PreTrainedTokenizerFast (transformers 5 writes its alias TokenizersBackend, unknown to 4.x) and leave BOS to
    tokenizer.json's post-processor (as Llama 3); SentencePiece ones state add_bos_token / add_eos_token (as
    Llama 2, Mistral, Gemma), which transformers 5 does not write."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    for k in ("is_local", "local_files_only", "vocab_file"):
        cfg.pop(k, None)
    if kind == "bpe":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        cfg.update(add_bos_token=True, add_eos_token=False)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def special_ids(tok) -> dict:
    """bos/eos/pad token ids for the model config, from the tokenizer."""
    out = {}
    for role in ("bos", "eos", "pad"):
        t = getattr(tok, f"{role}_token", None)
        if t is not None:
            out[f"{role}_token_id"] = tok.convert_tokens_to_ids(t)
    return out


def perturb_(model, gen) -> None:
    import torch

    with torch.no_grad():
        for _, p in model.named_parameters():  # tied parameters are listed once
            if p.dim() >= 2:
                p.mul_(SCALE)
            else:
                p.add_(BIAS_NOISE * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def reference_logits(path: Path, ids: list[int]) -> np.ndarray:
    """transformers' float32 eager forward over the checkpoint saved in `path`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def sentencepiece_ids(sp, tok, text: str, add_special: bool) -> list[int]:
    """The SentencePiece library's own ids: the text split at the tokenizer's added tokens (as transformers and
    llama.cpp split it), each plain run encoded by `sp` (so each gets the dummy prefix when the model has one, as
    llama.cpp does after every special token), BOS first when add_special."""
    import re

    added = {str(t): i for i, t in tok.added_tokens_decoder.items()}
    pattern = "(" + "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    ids = [tok.bos_token_id] if add_special else []
    for part in re.split(pattern, text):
        if part in added:
            ids.append(added[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


def golden_cases(tok, special_text: str, spm_model: bytes | None) -> list[dict]:
    sp = None
    if spm_model is not None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_proto=spm_model)
    cases = []
    for text in GOLDEN_TEXTS:
        text = special_text if text is None else text
        for add_special in (False, True):
            ids = tok(text, add_special_tokens=add_special)["input_ids"]
            case = {"text": text, "add_special": add_special, "ids": ids, "decoded": tok.decode(ids)}
            if sp is not None:
                case["spm_ids"] = sentencepiece_ids(sp, tok, text, add_special)
            cases.append(case)
    return cases


def make(name: str, lines: list[str], workdir: Path, spm_models: dict) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cfg_name, cfg_kw, (kind, flavour), template, dtype = CHECKPOINTS[name]
    if kind == "bpe":
        tok = bpe_tokenizer(flavour, lines, template)
        special_text = BPE_FLAVOURS[flavour]["special_text"]
    else:
        if flavour not in spm_models:
            spm_models[flavour] = train_spm(flavour, lines)
        tok = spm_tokenizer(flavour, spm_models[flavour], template, workdir)
        special_text = SPM_FLAVOURS[flavour]["special_text"]

    cfg = getattr(transformers, cfg_name)(vocab_size=len(tok), **{**special_ids(tok), **cfg_kw})
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(SEED + 1)
    perturb_(model, gen)
    n_params = sum(p.numel() for p in model.parameters())

    out = OUT / name
    if out.exists():
        shutil.rmtree(out)
    model.to(getattr(torch, dtype))
    model.config.dtype = dtype
    save_kw = {"max_shard_size": SHARDED[name]} if name in SHARDED else {}
    model.save_pretrained(str(out), **save_kw)
    tok.save_pretrained(str(out), save_jinja_files=False)
    tidy_tokenizer_config(out / "tokenizer_config.json", kind)
    if kind == "spm":
        (out / "tokenizer.model").write_bytes(spm_models[flavour])
    del model

    ids = tok(TEXT)["input_ids"][:N_IDS]
    assert len(ids) == N_IDS and max(ids) < len(tok)
    logits = reference_logits(out, ids)
    np.savez_compressed(out / "reference.npz", ids=np.asarray(ids, dtype=np.int64),
                        logits=logits.astype(np.float32))
    golden = {"cases": golden_cases(tok, special_text, spm_models.get(flavour) if kind == "spm" else None)}
    (out / "tokenizer_golden.json").write_text(json.dumps(golden, ensure_ascii=False, indent=1) + "\n",
                                               encoding="utf-8")
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"name": name, "vocab": len(tok), "params": n_params, "logit_std": float(logits.std()), "bytes": size,
            "files": sorted(f.name for f in out.iterdir())}


def check(name: str) -> str:
    """Reload the directory with transformers; compare logits and tokenizer ids with the stored ones."""
    from transformers import AutoTokenizer

    out = OUT / name
    ref = np.load(out / "reference.npz")
    ids = ref["ids"].tolist()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(TEXT)["input_ids"][:N_IDS] == ids, f"{name}: reference ids differ"
    for case in json.loads((out / "tokenizer_golden.json").read_text(encoding="utf-8"))["cases"]:
        got = tok(case["text"], add_special_tokens=case["add_special"])["input_ids"]
        assert got == case["ids"], f"{name}: golden ids differ for {case['text']!r}"
        assert tok.decode(got) == case["decoded"], f"{name}: decode differs for {case['text']!r}"
    logits = reference_logits(out, ids)
    err = float(np.abs(logits - ref["logits"]).max())
    assert err < 1e-4, f"{name}: logits differ by {err}"
    return f"{name}: {type(tok).__name__}, ids and logits reproduce (max |diff| {err:.2e})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", help="comma-separated checkpoint names (default: all)")
    ap.add_argument("--check", action="store_true", help="verify the stored directories instead of writing")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(CHECKPOINTS)
    unknown = set(names) - set(CHECKPOINTS)
    if unknown:
        sys.exit(f"unknown checkpoints: {sorted(unknown)}")

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if a.check:
        for name in names:
            print(check(name))
        return
    lines = training_lines()
    spm_models: dict = {}
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            r = make(name, lines, Path(tmp), spm_models)
            print(f"{r['name']:10s} vocab {r['vocab']}  params {r['params']:7d}  logit std {r['logit_std']:.3f}  "
                  f"{r['bytes'] / 1e3:6.0f} kB  {' '.join(r['files'])}")


if __name__ == "__main__":
    main()
