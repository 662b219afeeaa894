"""manifest.json beside a model's GGUF files: each file's quant, bytes, sha256, source and converter version, and
the model's pin (the quant, file and sha256 that runs of the model use until asked for another).

Pure Python (no llama.cpp), so the converter, the quantizer and the runner all record through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from quantize import CONVERTER_VERSION, gguf_keys
from quantize.errors import BadInput, CorruptModelFile, UserError
from quantize.files import sha256, write_text_atomic
from quantize.gguf_header import read_header
from quantize.progress import SILENT, Progress
from quantize.quants import PREFERENCE

log = logging.getLogger("runner")

MANIFEST = "manifest.json"
PIN = "pin"  # {"quant": "Q6_K", "file": "<name>-Q6_K.gguf", "sha256": its recorded digest or null}
RETENTION = "retention"  # in a quant file's entry: runner.retention's figures against the F16 file
_MAX_BYTES = 1 << 20  # a manifest records a few dozen files in a few KB; anything bigger is not one


def read_metadata(path: Path) -> dict[str, object]:
    """The GGUF's key/value metadata (scalars and strings only), or CorruptModelFile."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        return read_header(path).metadata
    except Exception as e:  # ValueError, struct.error, UnicodeDecodeError... on files that are not GGUF
        raise CorruptModelFile(f"{path}: not a readable GGUF file ({e}); re-create it with `runner convert`") from None


def plain_name(name: object) -> bool:
    """NAME is a file name and nothing more: no directory part and no `..`, so joining it to a directory cannot
    leave that directory. The only names a manifest may record."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on DIRECTORY's manifest: concurrent quantize/convert runs must not drop entries."""
    lock = directory / f".{MANIFEST}.lock"
    try:  # never through a link: opening one would create or lock a file elsewhere
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise BadInput(f"{lock}: cannot open it ({e.strerror}); remove it if it is a link") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _identity(path: Path) -> dict[str, int]:
    """What says, without reading it, that a file is still the one whose sha256 was recorded."""
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _read(manifest_path: Path) -> dict:
    """MANIFEST_PATH's content ({"files": {}} when there is none), or CorruptModelFile: not JSON, not a table of
    files, too big, or not a regular file (a link is not followed)."""
    try:
        fd = os.open(manifest_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return {"files": {}}
    except OSError as e:
        raise CorruptModelFile(f"{manifest_path}: cannot read it ({e.strerror}); remove it if it is a link") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_BYTES:
            raise CorruptModelFile(f"{manifest_path}: not a manifest (not a regular file of at most 1 MiB)")
        data = f.read(_MAX_BYTES + 1)
    try:
        manifest = json.loads(data)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no table of files")
        return manifest
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptModelFile(f"{manifest_path}: not a manifest ({e}); delete it and re-create the models") from None


def entries(directory: Path) -> dict[str, dict]:
    """DIRECTORY's manifest entries by file name ({} without a manifest), or CorruptModelFile. Only plain file
    names with a table each: an entry like `../x.gguf` names nothing this directory holds."""
    files = _read(directory / MANIFEST)["files"]
    return {name: entry for name, entry in files.items() if plain_name(name) and isinstance(entry, dict)}


def record(path: Path, quant: str, progress: Progress = SILENT) -> None:
    """Add PATH to its directory's manifest.json: quant, bytes, sha256, source and converter version, and the
    importance matrix and tensor-type overrides it was made with (from the keys quantize.ladder writes into it)."""
    meta = read_metadata(path)
    with progress.bar(f"sha256 {path.name}", path.stat().st_size) as bar:
        digest = sha256(path, bar.update)
    identity = _identity(path)
    entry = {
        "quant": quant,
        **identity,
        "sha256": digest,
        "source_repo": meta.get(gguf_keys.SOURCE_REPO),
        "source_revision": meta.get(gguf_keys.SOURCE_REVISION),
        "converter_version": meta.get(gguf_keys.CONVERTER_VERSION, CONVERTER_VERSION),
    }
    if gguf_keys.IMATRIX_DATASET in meta:  # made with an importance matrix (quantize.imatrix)
        entry["imatrix"] = {
            "file": meta.get(gguf_keys.IMATRIX_FILE),
            "sha256": meta.get(gguf_keys.IMATRIX_SHA256),
            "datasets": str(meta[gguf_keys.IMATRIX_DATASET]).split(","),
            "chunks": meta.get(gguf_keys.IMATRIX_CHUNKS),
            "weights": meta.get(gguf_keys.IMATRIX_ENTRIES),
        }
    if gguf_keys.TENSOR_TYPES in meta:
        entry["tensor_types"] = str(meta[gguf_keys.TENSOR_TYPES]).split(",")
    manifest_path = path.parent / MANIFEST
    with _locked(path.parent):  # read-modify-write under the lock
        manifest = _read(manifest_path)
        manifest["files"][path.name] = entry
        manifest["files"] = dict(sorted(manifest["files"].items()))
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")


def forget(directory: Path, names: list[str]) -> None:
    """Drop NAMES (files removed from DIRECTORY) from its manifest.json; the manifest goes with its last entry."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return
    with _locked(directory):  # read-modify-write under the lock, as record does
        manifest = _read(manifest_path)
        for name in names:
            manifest["files"].pop(name, None)
        if isinstance(manifest.get(PIN), dict) and manifest[PIN].get("file") in names:
            del manifest[PIN]  # the pinned file is gone: the next run pins anew, and says so
        if manifest["files"]:
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
        else:
            manifest_path.unlink()


def _restamp(path: Path, digest: str) -> None:
    """PATH was just hashed to DIGEST: if manifest.json records that digest for it (the file was copied or touched),
    record its new identity, so the next run need not hash it again. Best effort: a read-only model directory just
    means hashing again next time."""
    manifest_path = path.parent / MANIFEST
    if not manifest_path.is_file():
        return  # nothing recorded it: no lock file is made in a directory this tool never wrote to
    try:
        with _locked(path.parent):
            manifest = _read(manifest_path)
            entry, identity = manifest["files"].get(path.name), _identity(path)
            if isinstance(entry, dict) and entry.get("sha256") == digest and entry | identity != entry:
                entry.update(identity)
                write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    except (OSError, UserError):
        pass


def pinned(directory: Path) -> dict | None:
    """DIRECTORY's pin ({"quant", "file", "sha256"}), or None: no manifest, no pin yet, or one that is not a pin
    (said in a warning; the next run pins anew). A manifest that cannot be read is a CorruptModelFile: a run must
    not pick another file silently."""
    pin = _read(directory / MANIFEST).get(PIN)
    if pin is None:
        return None
    if (
        isinstance(pin, dict)
        and pin.get("quant") in PREFERENCE
        and plain_name(pin.get("file"))
        and isinstance(pin.get("sha256"), str | None)
    ):
        return pin
    log.warning("%s: its %r entry is not a pin; the next run pins anew", directory / MANIFEST, PIN)
    return None


def pin(directory: Path, quant: str, file: str, digest: str | None) -> None:
    """Pin QUANT's FILE (in DIRECTORY, with its recorded DIGEST) in DIRECTORY's manifest.json, written atomically
    under the manifest's lock (a manifest is created for a directory that has none)."""
    manifest_path = directory / MANIFEST
    with _locked(directory):
        manifest = _read(manifest_path)
        manifest[PIN] = {"quant": quant, "file": file, "sha256": digest}
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")


def record_retention(path: Path, figures: dict) -> None:
    """Record FIGURES (runner.retention: cosines to the F16 file, neighbour overlap) in PATH's entry, under the
    manifest's lock. A file made again gets a new entry (record), so figures never outlive their file."""
    manifest_path = path.parent / MANIFEST
    with _locked(path.parent):
        manifest = _read(manifest_path)
        entry = manifest["files"].get(path.name)
        if not isinstance(entry, dict):
            raise BadInput(f"{path}: not recorded in {manifest_path}; `runner quantize` records the files it makes")
        entry[RETENTION] = figures
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")


def retention(directory: Path) -> dict[str, dict]:
    """Measured retention per quant in DIRECTORY's manifest ({} when none): entries whose figures are cosines in
    [-1, 1] and an overlap in [0, 1]; anything else there is ignored with a warning (the file is anyone's to edit)."""
    try:
        files = entries(directory)
    except CorruptModelFile:
        return {}
    found = {}
    for name, entry in files.items():
        figures = entry.get(RETENTION)
        if figures is None:
            continue
        if isinstance(figures, dict) and isinstance(entry.get("quant"), str) and _figures_ok(figures):
            found[entry["quant"]] = figures
        else:
            log.warning("%s: the %s of %s is not a measurement; ignored", directory / MANIFEST, RETENTION, name)
    return found


def _figures_ok(figures: dict) -> bool:
    def number(key: str, low: float) -> bool:
        value = figures.get(key)
        return isinstance(value, int | float) and not isinstance(value, bool) and low <= value <= 1

    return number("mean_cosine", -1) and number("min_cosine", -1) and number("top10_overlap", 0)


def recorded_sha256(path: Path) -> str | None:
    """PATH's sha256 as manifest.json records it while the file is still the one recorded (same size, mtime and
    inode), else None. Never reads the file."""
    try:
        entry = _read(path.parent / MANIFEST)["files"].get(path.name)
    except (OSError, CorruptModelFile):
        return None
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        if all(entry.get(k) == v for k, v in _identity(path).items()):
            return entry["sha256"]
    return None


def content_sha256(path: Path) -> str:
    """PATH's sha256, cheaply: the one manifest.json records while the file is still the one recorded (same
    size, mtime and inode), else hashed now. What `--resume` ties a run to: a path and a size are not an identity
    (another file of the same size resumed into NaN rows).

    A file whose content changed keeps its old entry, for `runner verify` to report.
    """
    if (recorded := recorded_sha256(path)) is not None:
        return recorded
    digest = sha256(path)
    _restamp(path, digest)
    return digest


def verify(directory: Path, only: str | None = None) -> list[tuple[Path, str | None]]:
    """Hash each file DIRECTORY's manifest.json records (or only the file named ONLY) against it.

    Returns (path, problem) pairs, problem None when the file matches; GGUF files the manifest does not
    record are listed with the problem "not in manifest.json", a manifest that cannot be read is one problem.
    Only plain names beside the manifest are read, never through a link.
    """
    try:
        files = _read(directory / MANIFEST)["files"]
    except CorruptModelFile as e:
        return [(directory / MANIFEST, str(e).removeprefix(f"{directory / MANIFEST}: "))]
    names = [only] if only else sorted(set(files) | {p.name for p in directory.glob("*.gguf")})
    out: list[tuple[Path, str | None]] = []
    for name in names:
        if not plain_name(name):
            out.append((directory, f"{MANIFEST} records {name!r}, not a plain file name: nothing here to check"))
            continue
        path, entry = directory / name, files.get(name)
        kind = path.lstat().st_mode if os.path.lexists(path) else None
        if not isinstance(entry, dict):
            out.append((path, f"not in {MANIFEST}: nothing to check it against"))
        elif kind is None:
            out.append((path, f"missing (recorded in {MANIFEST})"))
        elif not stat.S_ISREG(kind):
            out.append((path, f"not a regular file (a link or a device), while {MANIFEST} recorded one"))
        elif path.stat().st_size != entry.get("bytes"):
            out.append((path, f"{path.stat().st_size} bytes, {MANIFEST} recorded {entry.get('bytes')}"))
        elif (digest := sha256(path)) != entry.get("sha256"):
            out.append((path, f"sha256 {digest[:16]}… differs from the one {MANIFEST} recorded; re-create it"))
        else:
            out.append((path, None))
            _restamp(path, digest)
    return out
