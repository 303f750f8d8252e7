"""`edgelm perplexity`: read the text or the base file, run the evaluation, print as llama-perplexity does.

Text output: the running PPL after each chunk on one line (`[1]14.2302,[2]15.0021,...`), then
`Final estimate: PPL = ... +/- ...`; with --kl-divergence a table row per chunk and llama-perplexity's
statistics block. `-o json`: one JSON object at the end instead. Progress goes to stderr.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from ..atomic import atomic_output
from ..errors import EdgeLMError
from ..evaluate import logits_file
from ..evaluate.perplexity import KL_HEADER, format_kl_summary, kl_divergence, n_chunks, perplexity

OUTPUT_FORMATS = ("text", "json")


def read_text(path: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EdgeLMError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


class _Progress:
    """`chunk i/n` on stderr, on a terminal only (the text output already shows each chunk)."""

    def __init__(self, n: int, label: str):
        self.n, self.label, self.live = n, label, sys.stderr.isatty()

    def step(self, i: int) -> None:
        if self.live:
            sys.stderr.write(f"\r{self.label}: chunk {i + 1}/{self.n}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.live:
            sys.stderr.write("\r" + " " * (len(self.label) + 24) + "\r")
            sys.stderr.flush()


def run_perplexity(load, text_path: str | None, n_ctx: int, chunks: int | None, fmt: str,
                   kl_base: str | None, kl: bool) -> None:
    """`load(n_ctx)` opens the model (a function: with --kl-divergence the context comes from the base file)."""
    if kl:
        return _run_kl(load, kl_base, chunks, fmt, ignored_text=text_path)
    if text_path is None:
        raise EdgeLMError("perplexity needs -f TEXT (or --kl-divergence with --kl-divergence-base FILE)")
    if kl_base is not None and os.path.isdir(kl_base):
        raise EdgeLMError(f"{kl_base}: is a folder; --kl-divergence-base names the file to write")
    text = read_text(text_path)
    model = load(n_ctx)
    tokens = model.tokenize(text, add_special=True)
    n_chunk = n_chunks(len(tokens), n_ctx, chunks, source=text_path)
    click.echo(f"perplexity: {len(tokens)} tokens, {n_chunk} chunks of {n_ctx}, "
               f"scoring the last {n_ctx - 1 - n_ctx // 2} tokens of each", err=True)
    progress = _Progress(n_chunk, "perplexity")

    def on_chunk(i, result):
        progress.step(i)
        if fmt == "text":
            sys.stdout.write(f"[{i + 1}]{result.running[-1]:.4f},")
            sys.stdout.flush()

    if kl_base is None:
        result = perplexity(model, tokens, n_ctx, n_chunk, on_chunk=on_chunk)
    else:
        with atomic_output(kl_base, inputs=[text_path]) as tmp, open(tmp, "wb") as f:
            writer = logits_file.LogitsWriter(f, n_ctx, model.config.n_vocab, n_chunk, tokens)
            result = perplexity(model, tokens, n_ctx, n_chunk, writer=writer, on_chunk=on_chunk)
    progress.done()
    if fmt == "json":
        click.echo(json.dumps(dict(model=os.path.basename(model.path), text=text_path, n_tokens=len(tokens),
                                   **result.as_dict())))
    else:
        click.echo()
        click.echo(f"Final estimate: PPL = {result.ppl:.4f} +/- {result.ppl_error:.5f}")
    if kl_base is not None:
        click.echo(f"{kl_base}: log-probabilities of {result.count} tokens saved (--kl-divergence-base)", err=True)


def _run_kl(load, kl_base: str | None, chunks: int | None, fmt: str, ignored_text: str | None) -> None:
    if kl_base is None:
        raise EdgeLMError("--kl-divergence needs --kl-divergence-base FILE (written by a perplexity run of the "
                          "base model with --kl-divergence-base FILE)")
    base = logits_file.read_base(kl_base)
    if ignored_text is not None:
        click.echo(f"perplexity: the tokens come from {kl_base}; -f {ignored_text} is not read", err=True)
    model = load(base.n_ctx)
    if base.n_vocab != model.config.n_vocab:
        raise EdgeLMError(f"{kl_base}: saved from a model with a vocabulary of {base.n_vocab} tokens, "
                          f"this model has {model.config.n_vocab}")
    n_chunk = base.n_chunk if not chunks or chunks <= 0 else min(base.n_chunk, chunks)
    progress = _Progress(n_chunk, "kl-divergence")
    if fmt == "text":
        click.echo(KL_HEADER)

    def on_chunk(i, result):
        progress.step(i)
        if fmt == "text":
            progress.done()
            click.echo(result.chunk_line(i))

    result = kl_divergence(model, base, n_chunk, on_chunk=on_chunk)
    progress.done()
    summary = result.summary()
    if fmt == "json":
        click.echo(json.dumps(dict(model=os.path.basename(model.path), base=kl_base, **summary)))
    elif result.count >= 100:          # llama.cpp: no statistics on so few values
        click.echo()
        click.echo(format_kl_summary(summary))
