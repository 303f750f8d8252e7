"""Make the tokenizer golden files: llama.cpp's token ids for every text of the tokenizer corpus.

llama.cpp (through llama-cpp-python) is the independent reference; edgelm must give the same ids.
Run it with the reference venv (llama-cpp-python and gguf installed), from the repository root:

    ~/.cache/edgelm-reference/venv/bin/python tools/make_tokenizer_golden.py [--models-dir DIR]

It writes tests/golden/tokenizer_<name>.json for
  - smollm2: SmolLM2-135M-Instruct (byte-level BPE, pre-tokenizer "smollm")
  - gemma3:  gemma-3-270m (SentencePiece-style, user-defined whitespace tokens, byte fallback)
  - smollm2-pre-<pre>: SmolLM2's vocabulary and merges with `tokenizer.ggml.pre` swapped for other
    pre-tokenizers (llama-bpe, qwen2, gpt-2, default, ...), written as vocab-only GGUF files in a temporary
    directory, so every pre-tokenizer regex table edgelm has is checked against llama.cpp too.
  - fuzz: 150 seeded random texts glued from awkward pieces (tokenizer_fuzz.json), ids for a few of the
    above in two modes.
Regenerate whenever tests/corpus/tokenizer_corpus.json changes (the test checks the texts match).

For each text and each mode (add_special x parse_special; two of them for the variants) the file has
llama.cpp's ids (and llama_detokenize of the first mode's ids); per vocabulary it
also has BOS/EOS, add_bos, the end-of-generation and control token ids, and a SHA-256 over every token's
piece (llama_token_to_piece, special False and True) to check token_bytes() over the whole vocabulary.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "corpus" / "tokenizer_corpus.json"
GOLDEN_DIR = ROOT / "tests" / "golden"

MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}
# `tokenizer.ggml.pre` values tried on SmolLM2's vocabulary (one per regex family edgelm implements)
PRE_VARIANTS = ["llama-bpe", "qwen2", "gpt-2", "default", "falcon", "poro-chat", "viking", "tekken", "gpt-4o",
                "deepseek-coder", "chatglm-bpe", "starcoder"]
MODES = [(False, False), (False, True), (True, False), (True, True)]  # (add_special, parse_special)
VARIANT_MODES = [(False, False), (True, True)]
FUZZ_LABELS = ["smollm2", "gemma3", "smollm2-pre-llama-bpe", "smollm2-pre-qwen2"]
FUZZ_MODES = [(False, False), (True, True)]
FUZZ_N, FUZZ_SEED = 150, 1234

# Pieces that random fuzz texts are glued from: awkward whitespace, contractions, scripts, digits, emoji,
# special-token texts (whole and broken), byte-level look-alikes, unassigned and newer-than-15.1 characters.
FUZZ_ATOMS = list("abcXYZ019 '\t\n\r\x0b.,;:!?-_()[]{}<>|/\\\"~^$+=#@%&*`") + [
    "'s", "'S", "'re", "'LL", "'ve", "'d", "'m", "'t", "\u00e9", "\u00f1", "\u00c5", "e\u0301", "\u0301",
    "\u65e5\u672c", "\u4e2d\u6587", "\ud55c\uad6d\uc5b4", "\u306a\u3044", "\u0645\u0631\u062d\u0628\u0627",
    "\u0663", "\u096a", "\u2460", "\u00bd", "\u00b2", "\u2167", "\uff21\uff22", "\uff11\uff12",
    "\U0001f600", "\U0001f44d\U0001f3fd", "\U0001f468\u200d\U0001f469", "\u200d", "\ufe0f", "\u00a0",
    "\u2028", "\u3000", "\u2003", "\u0085", "\u3002", "\uff0c", "\u3001", "\u2026", "\u0964", "\u06d4",
    "\u060c", "<|im_end|>", "<|im_start|>", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>", "</s>",
    "<0x41>", "\u2581", "\u0120", "\n\n", "  ", "    ", "\t\t", "<div>", "<unused3>", "[multimodal]",
    "\u0378", "\ue000", "\U000e0001", "\U00010348", "\u088f", "\u01c5", "\u00df", "\u1e9e", "\u0130",
    "\u017f", "123456789", "0000", "3.14", "-", "---", "\x01", "\x1f", "\x7f", "@@", "http://x.y/z?q=1",
]


def fuzz_texts(n: int = FUZZ_N, seed: int = FUZZ_SEED) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice(FUZZ_ATOMS) for _ in range(rng.randint(1, 30))) for _ in range(n)]


def _ranges(ids: list[int]) -> list[list[int]]:
    """Sorted ids as [first, last] runs, to keep the files small."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def _piece(llama_cpp, vocab, tid: int, special: bool) -> bytes:
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, tid, buf, len(buf), 0, special)
    if n < 0:
        buf = ctypes.create_string_buffer(-n)
        n = llama_cpp.llama_token_to_piece(vocab, tid, buf, len(buf), 0, special)
    return buf.raw[:n]


def _tokenize(llama_cpp, vocab, text: str, add_special: bool, parse_special: bool) -> list[int]:
    data = text.encode("utf-8")
    cap = len(data) + 8
    buf = (llama_cpp.llama_token * cap)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), buf, cap, add_special, parse_special)
    if n < 0:
        raise RuntimeError(f"llama_tokenize failed ({n}) for {text!r}")
    return list(buf[:n])


def _detokenize(llama_cpp, vocab, ids: list[int]) -> str:
    """llama_detokenize(remove_special=True, unparse_special=False), llama.cpp's own detokenizer."""
    arr = (llama_cpp.llama_token * max(1, len(ids)))(*ids)
    cap = 64 + 64 * len(ids)
    buf = ctypes.create_string_buffer(cap)
    n = llama_cpp.llama_detokenize(vocab, arr, len(ids), buf, cap, True, False)
    if n < 0:
        raise RuntimeError(f"llama_detokenize failed ({n})")
    return buf.raw[:n].decode("utf-8", errors="replace")


def golden_for(path: Path, texts: list[str], label: str, fuzz: list[str] | None = None,
               modes: list[tuple[bool, bool]] = MODES) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    eog, control = [], []
    h_plain, h_special = hashlib.sha256(), hashlib.sha256()
    for tid in range(n_vocab):
        if llama_cpp.llama_vocab_is_eog(vocab, tid):
            eog.append(tid)
        if llama_cpp.llama_vocab_is_control(vocab, tid):
            control.append(tid)
        for h, special in ((h_plain, False), (h_special, True)):
            p = _piece(llama_cpp, vocab, tid, special)
            h.update(len(p).to_bytes(4, "little") + p)

    def none_if_null(t: int):
        return None if t < 0 else int(t)

    cases = []
    for text in texts:
        ids = [_tokenize(llama_cpp, vocab, text, add, sp) for add, sp in modes]
        detok = _detokenize(llama_cpp, vocab, ids[0])
        cases.append({"text": text, "ids": ids, "detok": detok})
    result = {
        "label": label,
        "model_file": path.name,
        "reference": f"llama-cpp-python {llama_cpp.__version__}: "
                     "llama_tokenize, llama_detokenize, llama_token_to_piece",
        "modes": [[a, p] for a, p in modes],  # [add_special, parse_special] for each ids list
        "n_vocab": n_vocab,
        "bos_id": none_if_null(llama_cpp.llama_vocab_bos(vocab)),
        "eos_id": none_if_null(llama_cpp.llama_vocab_eos(vocab)),
        "add_bos": bool(llama_cpp.llama_vocab_get_add_bos(vocab)),
        "add_eos": bool(llama_cpp.llama_vocab_get_add_eos(vocab)),
        "eog_ids": eog,
        "control_ids": _ranges(control),
        "pieces_sha256": {"special=False": h_plain.hexdigest(), "special=True": h_special.hexdigest()},
        "cases": cases,
    }
    if fuzz is not None:
        result["fuzz_ids"] = [[_tokenize(llama_cpp, vocab, t, a, sp) for a, sp in FUZZ_MODES] for t in fuzz]
    del llm
    return result


def write_pre_variant(src: Path, pre: str, dst: Path) -> None:
    """A vocab-only copy of `src` (all metadata, no tensors) with tokenizer.ggml.pre replaced."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        vtype = field.types[0]
        value = pre if key == "tokenizer.ggml.pre" else field.contents()
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dump(data: dict, path: Path) -> None:
    """JSON with one case per line (ids inline), readable in a diff."""
    head = {k: v for k, v in data.items() if k != "cases"}
    lines = ["{"]
    for k, v in head.items():
        lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=True)},")
    lines.append('  "cases": [')
    cases = [json.dumps(c, ensure_ascii=True, separators=(",", ":")) for c in data["cases"]]
    lines.append(",\n".join("    " + c for c in cases))
    lines.append("  ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", default=os.path.expanduser("~/.cache/edgelm/models"))
    ap.add_argument("--only", nargs="*", help="labels to (re)make, e.g. smollm2 gemma3 smollm2-pre-qwen2")
    args = ap.parse_args()

    texts = json.loads(CORPUS.read_text(encoding="utf-8"))
    fuzz = fuzz_texts()
    fuzz_out: dict = {"modes": [[a, p] for a, p in FUZZ_MODES],
                      "seed": FUZZ_SEED, "texts": fuzz, "ids": {}}
    models_dir = Path(args.models_dir)
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)

    def make(label: str, path: Path, pre: str | None = None) -> None:
        # the pre-tokenizer variants only change plain-text splitting: two modes are enough there
        data = golden_for(path, texts, label, fuzz if label in FUZZ_LABELS else None,
                          MODES if pre is None else VARIANT_MODES)
        if pre is not None:
            data["model_file"] = f"{MODELS['smollm2']} with tokenizer.ggml.pre = {pre!r}"
            data["pre"] = pre
        if "fuzz_ids" in data:
            fuzz_out["ids"][label] = data.pop("fuzz_ids")
        out = GOLDEN_DIR / f"tokenizer_{label}.json"
        dump(data, out)
        print("wrote", out.relative_to(ROOT))

    for label, fname in MODELS.items():
        if not args.only or label in args.only:
            make(label, models_dir / fname)
    with tempfile.TemporaryDirectory() as tmp:
        for pre in PRE_VARIANTS:
            label = f"smollm2-pre-{pre}"
            if args.only and label not in args.only:
                continue
            variant = Path(tmp) / f"smollm2-{pre}.gguf"
            write_pre_variant(models_dir / MODELS["smollm2"], pre, variant)
            make(label, variant, pre)
    if not args.only:
        out = GOLDEN_DIR / "tokenizer_fuzz.json"
        lines = ["{"]
        for k in ("modes", "seed", "texts"):
            lines.append(f"  {json.dumps(k)}: {json.dumps(fuzz_out[k], ensure_ascii=True)},")
        lines.append('  "ids": {')
        lines.append(",\n".join(f"    {json.dumps(lab)}: {json.dumps(v, separators=(',', ':'))}"
                                for lab, v in fuzz_out["ids"].items()))
        lines.append("  }")
        lines.append("}")
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("wrote", out.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
