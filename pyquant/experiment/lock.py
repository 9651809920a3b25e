"""A run's lock: two `pyquant experiment` processes on the same --out must not run (or delete) the same run.

The lock is a file ``<out>/.<run name>.lock`` beside the run's folder (not in it: an unfinished folder is
deleted before a rerun), created atomically (O_CREAT | O_EXCL) and holding the holder's pid, host and start
time. A lock whose holder is a dead process on this host is stale (the process was killed) and is taken over;
a lock held by a live process, or by a process on another host (whose pid cannot be checked here), is not.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path


def _holder() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: Path) -> dict | None:
    """The holder written in a lock file; None when the file is gone. A lock that cannot be parsed (its
    writer died between creating and writing it, or it is not ours) reads as an unknown holder."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(text)
        return holder if isinstance(holder, dict) else {}
    except json.JSONDecodeError:
        return {}


def _alive(holder: dict) -> bool:
    """Whether the lock's holder may still be running: unknown holders and other hosts count as alive."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def describe(holder: dict, path: Path) -> str:
    if not holder:
        return f"an unreadable lock {path} (delete it if no other process runs this grid)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')} "
            f"(lock {path}; delete it if that process is gone)")


def acquire(path: Path) -> dict | None:
    """Take the lock at `path`: None when taken (release it with `release`), else the live holder's record."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if holder is None:
                continue  # released meanwhile: try again
            if _alive(holder):
                return holder
            # Stale: move it aside under a name of our own (only one process can), then check that what we
            # moved is the stale lock we judged: another process may have taken it over in between.
            aside = path.with_name(f"{path.name}.stale.{os.getpid()}")
            try:
                os.rename(path, aside)
            except FileNotFoundError:
                continue
            moved = _read(aside)
            if moved != holder:
                try:
                    os.link(aside, path)  # a live lock moved by mistake: put it back (unless replaced already)
                except FileExistsError:
                    pass
            os.unlink(aside)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(_holder(), f)
        return None


def release(path: Path) -> None:
    """Remove the lock at `path` if this process holds it."""
    holder = _read(Path(path))
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        Path(path).unlink(missing_ok=True)
