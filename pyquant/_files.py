"""Atomic file writes: a file is either the old one or the whole new one, never a partial one."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable

_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Write ``path`` by ``write(f)`` into a temporary binary file beside it, then move that into place
    (os.replace). On any failure the temporary file is removed and ``path`` is left as it was; a full disk (or
    quota) raises OSError(ENOSPC) saying "no space left on <path>".

    ``write`` gets a Python file object, not a path: torch.save then writes through it, so a full disk comes
    back as OSError(ENOSPC) instead of the RuntimeError of torch's own file writer ("unexpected pos ...",
    "basic_ios::clear: iostream error"), which does not say why."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:  # closing flushes: a full disk raises here, before the replace
            write(f)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno in _FULL:
            raise OSError(e.errno, f"no space left on {path} (device full; "
                                   f"{'the previous file is kept' if path.exists() else 'nothing written'})") from e
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))
