"""Where models live on disk, and writing files so that a crash never leaves one that looks finished."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

# `.<name>.partial-<host>-<pid>-<token>`: the host and PID say whose it is (a killed writer's can be removed),
# the random token keeps two writers apart even where hosts share a filesystem and reuse PIDs. The older form
# `.<name>.partial-<pid>` is still recognised, so its leftovers are still cleaned up.
_PARTIAL = re.compile(r"\.partial-(?:(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[0-9a-f]{16}|(?P<old_pid>\d+))$")


def models_home() -> Path:
    """$EMBEDRUNNER_HOME, else $XDG_CACHE_HOME/embedrunner, else ~/.cache/embedrunner."""
    if env := os.environ.get("EMBEDRUNNER_HOME"):
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "embedrunner"


def temp_name(name: str) -> str:
    """A temp file name for writing NAME beside it, unique to this writer: `.<name>.partial-<host>-<pid>-<token>`."""
    return f".{name}.partial-{_host()}-{os.getpid()}-{secrets.token_hex(8)}"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside PATH; on success fsync it, rename it to PATH and fsync the directory (so the new
    name survives a power cut), else delete it. A link at PATH is replaced, never written through.

    Temp files of PATH that a killed writer on this host left (its PID is gone) are removed first.
    """
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        if orphaned(tmp):
            tmp.unlink(missing_ok=True)
    tmp = path.with_name(temp_name(path.name))
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def orphaned(path: Path) -> bool:
    """PATH is a temp file of `atomic_path` whose writer ran on this host and is gone (kill -9 mid-write).
    Another host's temp file, or a live writer's, is not: it may still be being written."""
    found = _PARTIAL.search(path.name)
    if found is None or not path.name.startswith("."):
        return False
    if found["old_pid"] is not None:
        pid = int(found["old_pid"])
    elif found["host"] == _host():
        pid = int(found["pid"])
    else:
        return False
    return 0 < pid != os.getpid() and not _alive(pid)


def _host() -> str:
    """This host's name as it goes into temp names: file-name-safe characters only, at most 64 of them."""
    return re.sub(r"[^A-Za-z0-9._]", "_", socket.gethostname())[:64] or "localhost"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # another user's process
        return True
    except (ProcessLookupError, OverflowError):  # gone, or a number no process can have
        return False
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path, on_bytes: Callable[[int], None] | None = None) -> str:
    """PATH's sha256; ON_BYTES(n) after each block read (a 15 GB file takes ~25 s here: worth a bar)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()
