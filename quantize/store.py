"""The model store, `$EMBEDRUNNER_HOME/<model>/`: which GGUFs a model directory holds, which one a run can
take as it is, and removing files (`runner rm`, `runner models --prune`) with manifest.json kept in step.

Pure Python, no llama.cpp: the planner reads it to know what a run will still have to write.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from quantize import gguf_keys
from quantize.errors import CorruptModelFile, ModelNotFound
from quantize.manifest import MANIFEST, forget, read_metadata
from quantize.quants import PREFERENCE, UNQUANTIZED

HEAD_SUFFIX = ".head.gguf"


@dataclass(frozen=True)
class Removed:
    path: Path
    bytes: int
    why: str


def on_disk(directory: Path) -> dict[str, Path]:
    """{QUANT: path} for `<stem>-<QUANT>.gguf` files in DIRECTORY."""
    found = {}
    for p in sorted(directory.glob("*.gguf")) if directory.is_dir() else []:
        tag = p.stem.rsplit("-", 1)[-1].upper()
        if tag in PREFERENCE:
            found.setdefault(tag, p)
    return found


def quant_path(source: Path, quant: str, outdir: Path | None = None) -> Path:
    """`<stem>-<QUANT>.gguf`, where the stem drops a trailing -F16/-F32/-BF16 of the source."""
    stem = source.stem
    for tag in UNQUANTIZED:
        stem = stem.removesuffix(f"-{tag}")
    return (outdir or source.parent) / f"{stem}-{quant}.gguf"


def base_file(files: dict[str, Path]) -> Path | None:
    """The unquantized file of FILES (F32, F16 or BF16): what every quant is made from."""
    return next((files[q] for q in UNQUANTIZED if q in files), None)


def usable(files: dict[str, Path], quant: str) -> Path | None:
    """QUANT's file in FILES when a run can take it as it is: it exists and was made from the same conversion
    as the unquantized file beside it (a quant of an older conversion is made again)."""
    path, base = files.get(quant), base_file(files)
    if path is None:
        return None
    if base is None or quant in UNQUANTIZED or _stamp(path) == _stamp(base):
        return path
    return None


def serves(files: dict[str, Path], quant: str | None) -> bool:
    """A model directory holding FILES gives QUANT without its checkpoint: QUANT's file is usable as it is, or
    an unquantized file is there to make it from (QUANT None: any file will do)."""
    if quant is None:
        return bool(files)
    return usable(files, quant.upper()) is not None or base_file(files) is not None


def _stamp(path: Path) -> object:
    return read_metadata(path).get(gguf_keys.SOURCE_STAMP)


def remove(directory: Path, quants: list[str] | None = None) -> list[Removed]:
    """Delete QUANTS' files from DIRECTORY (all of the model when None) and update its manifest.json.

    The pooling head sidecar goes with the last trunk that needs it; the directory goes when nothing else is
    left in it. A quant that is not there is a ModelNotFound naming what is.
    """
    files = on_disk(directory)
    if quants is None:
        doomed = [*sorted(directory.glob("*.gguf")), *sorted(directory.glob(".*.partial-*"))]
        out = [_unlink(p, "removed") for p in doomed]
        for name in (MANIFEST, f".{MANIFEST}.lock"):
            (directory / name).unlink(missing_ok=True)
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
        return out
    missing = [q for q in quants if q not in files]
    if missing:
        have = ", ".join(files) or "nothing"
        raise ModelNotFound(f"{directory}: no {', '.join(missing)} file here (have {have}); `runner models` lists them")
    out = [_unlink(files[q], "removed") for q in quants]
    out += [_unlink(h, "its last trunk was removed") for h in _unused_heads(directory)]
    forget(directory, [r.path.name for r in out])
    return out


def prune(home: Path) -> list[Removed]:
    """Reclaim what no run will use, in every model directory under HOME: temp files of writers that died
    (kill -9 mid-conversion), quants of an older conversion than the F16 beside them (they would be made
    again), head sidecars no trunk refers to, and manifest entries of files that are gone."""
    out: list[Removed] = []
    for directory in sorted(p for p in home.iterdir() if p.is_dir()) if home.is_dir() else []:
        removed = [_unlink(p, "left by a writer that is gone") for p in _orphan_partials(directory)]
        files = on_disk(directory)
        stale = [q for q in files if q not in UNQUANTIZED and usable(files, q) is None]
        removed += [_unlink(files[q], "made from an older conversion than the F16 beside it") for q in stale]
        removed += [_unlink(h, "no model file uses it") for h in _unused_heads(directory)]
        present = {p.name for p in directory.glob("*.gguf")}
        forget(directory, sorted(_recorded(directory) - present))
        out += removed
    return out


def _unlink(path: Path, why: str) -> Removed:
    size = path.stat().st_size
    path.unlink()
    return Removed(path, size, why)


def _orphan_partials(directory: Path) -> list[Path]:
    """`.<name>.partial-<PID>` files (quantize/files.py atomic_path) whose writer no longer runs."""
    out = []
    for p in sorted(directory.glob(".*.partial-*")):
        pid = p.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _running(int(pid)):
            out.append(p)
    return out


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except PermissionError:  # someone else's process: alive
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _unused_heads(directory: Path) -> list[Path]:
    """Pooling-head sidecars (NV-Embed) that no trunk GGUF in DIRECTORY names."""
    heads = sorted(directory.glob(f"*{HEAD_SUFFIX}"))
    if not heads:
        return []
    used = set()
    for trunk in on_disk(directory).values():
        try:
            used.add(read_metadata(trunk).get(gguf_keys.HEAD_FILE))
        except CorruptModelFile:
            continue
    return [h for h in heads if h.name not in used]


def _recorded(directory: Path) -> set[str]:
    path = directory / MANIFEST
    try:
        return set(json.loads(path.read_text()).get("files", {})) if path.is_file() else set()
    except (ValueError, UnicodeDecodeError):
        return set()
