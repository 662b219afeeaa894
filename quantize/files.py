"""Where models live on disk, and writing files so that a crash never leaves one that looks finished."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path


def models_home() -> Path:
    """$EMBEDRUNNER_HOME, else $XDG_CACHE_HOME/embedrunner, else ~/.cache/embedrunner."""
    if env := os.environ.get("EMBEDRUNNER_HOME"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "embedrunner"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside PATH; on success fsync it and rename it to PATH, else delete it.

    Temp files of PATH that a killed process left (kill -9 mid-conversion: its PID is gone) are removed first.
    """
    _remove_orphans(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    finally:
        tmp.unlink(missing_ok=True)


def _remove_orphans(path: Path) -> None:
    """Delete `.<name>.partial-<PID>` files beside PATH whose writer no longer runs (a live one is left alone)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = tmp.name.rsplit("-", 1)[1]
        if pid.isdigit() and 0 < int(pid) != os.getpid() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    return True


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """PATH's sha256; ON_BYTES(n) after each block read (a 15 GB file takes ~25 s here: worth a bar)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()
