"""Write a file so that it appears whole or not at all."""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def atomic_output(dst: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `dst`; when the block succeeds it is renamed to `dst` (with the permissions
    a newly created file gets: mkstemp makes 0600), when it fails in any way it is removed."""
    dst = os.fspath(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".partial",
                               dir=os.path.dirname(os.path.abspath(dst)) or ".")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
