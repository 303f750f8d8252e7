"""`edgelm imatrix -m MODEL -f TEXT -o imatrix.gguf`: collect the importance matrix (evaluate/imatrix.py)."""
from __future__ import annotations

import os

import click

from ..atomic import atomic_output
from ..errors import EdgeLMError
from ..evaluate import imatrix
from ..evaluate.perplexity import n_chunks
from .perplexity import _Progress, read_text


def run_imatrix(load, text_path: str, out: str, n_ctx: int, chunks: int | None, fmt: str = "gguf",
                process_output: bool = False) -> None:
    if os.path.isdir(out):
        raise EdgeLMError(f"{out}: is a folder; -o names the file to write")
    text = read_text(text_path)
    model = load(n_ctx)
    tokens = model.tokenize(text, add_special=True)
    n_chunk = n_chunks(len(tokens), n_ctx, chunks, source=text_path, need=1)     # llama-imatrix: one chunk
    click.echo(f"imatrix: {len(tokens)} tokens, {n_chunk} chunks of {n_ctx}", err=True)
    progress = _Progress(n_chunk, "imatrix")
    c = imatrix.collect(model, tokens, n_ctx, n_chunk, on_chunk=progress.step, process_output=process_output)
    progress.done()
    with atomic_output(out, inputs=[text_path, model.path]) as tmp:
        imatrix.write(tmp, c, os.path.basename(text_path), n_chunk, n_ctx, fmt)
    click.echo(f"{out}: {len(c.sums)} matrices, {n_chunk} chunks of {n_ctx} tokens", err=True)

