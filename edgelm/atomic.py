"""Write a file so that it appears whole or not at all, whatever ends the writer.

- Success: the temporary file is renamed over the destination.
- An exception, Ctrl-C (SIGINT) or SIGTERM/SIGHUP: the temporary file is removed. SIGTERM and SIGHUP would
  end Python without running any cleanup, so while an output is open a handler removes it and then ends the
  process with the same signal (only where nobody else has claimed those signals).
- SIGKILL cannot be caught: the temporary name carries the writer's process id, and the next write to the same
  destination removes leftovers whose process no longer exists.
- An output that resolves to one of the inputs (through a symlink or a hard link) is refused before anything
  is opened, so no command can overwrite what it reads.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .errors import EdgeLMError

_PARTIAL = re.compile(r"\.edgelm-(\d+)\.[^.]+\.partial$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:     # exists, owned by someone else
        return True
    return True


def remove_stale(directory: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove files or folders in `directory` named `prefix` + `.edgelm-PID.*.partial` (or PID-tagged
    `prefix.edgelm-PID.*` folders) whose writing process is gone. Returns what was removed."""
    removed = []
    try:
        entries = list(Path(directory).iterdir())
    except OSError:
        return removed
    for p in entries:
        if not p.name.startswith(prefix):
            continue
        m = _PARTIAL.search(p.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            _remove(str(p))
            removed.append(p)
        except OSError:
            pass
    return removed


def tagged_name(base: str) -> str:
    """A prefix for temporary names that remove_stale can trace back to this process."""
    return f"{base}.edgelm-{os.getpid()}."


# Cleanups to run if SIGTERM/SIGHUP arrives, by registration order. They run inside the signal handler itself:
# an exception raised there could be swallowed (Python ignores exceptions in ctypes callbacks, which Numba's
# compiler uses), so the handler does the work, then ends the process with the same signal, as the default
# action would have (a shell sees status 143 for SIGTERM).
_cleanups: dict[int, Callable[[], None]] = {}
_saved_handlers: dict[int, object] = {}
_next_token = iter(range(1 << 62))


def _terminate(signum, frame):
    for action in reversed(list(_cleanups.values())):
        try:
            action()
        except Exception:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_handlers() -> None:
    for name in ("SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None and sig not in _saved_handlers and signal.getsignal(sig) in (signal.SIG_DFL, None):
            _saved_handlers[sig] = signal.signal(sig, _terminate)


def _restore_handlers() -> None:
    for sig, old in _saved_handlers.items():
        signal.signal(sig, old if old is not None else signal.SIG_DFL)
    _saved_handlers.clear()


@contextmanager
def cleanup_on_termination(action: Callable[[], None]) -> Iterator[None]:
    """Run `action` (remove a temporary file, stop a child process) if SIGTERM or SIGHUP ends the process within
    the block; exceptions and Ctrl-C are left to the caller's own `finally`/`except`. Signal handlers belong to the
    main thread, and a program that installed its own keeps it: there, this only registers nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    token = next(_next_token)
    _cleanups[token] = action
    _install_handlers()
    try:
        yield
    finally:
        del _cleanups[token]
        if not _cleanups:
            _restore_handlers()


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        Path(path).unlink(missing_ok=True)


def refuse_same_file(dst: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """EdgeLMError when writing `dst` would replace one of `inputs` (same file by any path or link)."""
    dst = os.fspath(dst)
    real = os.path.realpath(dst)
    for src in inputs:
        src = os.fspath(src)
        same = os.path.realpath(src) == real
        if not same and os.path.exists(dst) and os.path.exists(src):
            try:
                same = os.path.samefile(src, dst)
            except OSError:
                same = False
        if same:
            raise EdgeLMError(f"{dst}: the output is the input file {src} (through a link or another path); "
                              f"write to a different file")


@contextmanager
def atomic_output(dst: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[str]:
    """Yield a temporary path beside `dst`; when the block succeeds it is renamed to `dst` (with the permissions
    a newly created file gets: mkstemp makes 0600), when it ends in any other way it is removed. `inputs`: files
    the writer reads, which `dst` must not be."""
    dst = os.fspath(dst)
    refuse_same_file(dst, inputs)
    folder = os.path.dirname(os.path.abspath(dst)) or "."
    base = f".{os.path.basename(dst)}"
    remove_stale(folder, base)
    fd, tmp = tempfile.mkstemp(prefix=tagged_name(base), suffix=".partial", dir=folder)
    os.close(fd)
    with cleanup_on_termination(lambda: _remove(tmp)):
        try:
            yield tmp
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, dst)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
