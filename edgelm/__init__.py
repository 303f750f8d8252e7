"""edgelm: quantized LLMs from GGUF files on laptop CPUs, in Python with NumPy + Numba.

    import edgelm
    m = edgelm.load("smollm2-135m")          # a catalog name or a path to a .gguf
    print(m.generate("The capital of France is", max_tokens=16, temperature=0))
"""
from __future__ import annotations

import os

from .errors import ContextError, EdgeLMError, GGUFError, ModelNotFoundError, UnsupportedError

__version__ = "0.1.0"
__all__ = ["load", "Model", "EdgeLMError", "GGUFError", "UnsupportedError", "ContextError", "ModelNotFoundError"]


def load(model: str | os.PathLike | None = None, n_ctx: int | None = None, threads: int | None = None) -> "Model":
    """Open a GGUF model: a file path, or a catalog name ("smollm2-135m", "gemma3-270m") fetched on first use.
    n_ctx: context size (default min(4096, training context)); threads: compute threads (default: all cores)."""
    from .catalog import resolve
    from .model import Model
    return Model(str(resolve(model)), n_ctx=n_ctx, threads=threads)


def __getattr__(name):
    if name == "Model":
        from .model import Model
        return Model
    raise AttributeError(name)
