"""manifest.json beside a model's GGUF files: each file's quant, bytes, sha256, source and converter version.

Pure Python (no llama.cpp), so the converter, the quantizer and the runner all record through it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path

from quantize import CONVERTER_VERSION, gguf_keys
from quantize.errors import BadInput, CorruptModelFile
from quantize.files import sha256, write_text_atomic
from quantize.gguf_header import read_header
from quantize.progress import SILENT, Progress

MANIFEST = "manifest.json"


def read_metadata(path: Path) -> dict[str, object]:
    """The GGUF's key/value metadata (scalars and strings only), or CorruptModelFile."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        return read_header(path).metadata
    except Exception as e:  # ValueError, struct.error, UnicodeDecodeError... on files that are not GGUF
        raise CorruptModelFile(f"{path}: not a readable GGUF file ({e}); re-create it with `runner convert`") from None


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on DIRECTORY's manifest: concurrent quantize/convert runs must not drop entries."""
    with open(directory / f".{MANIFEST}.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record(path: Path, quant: str, progress: Progress = SILENT) -> None:
    """Add PATH to its directory's manifest.json: quant, bytes, sha256, source and converter version."""
    meta = read_metadata(path)
    with progress.bar(f"sha256 {path.name}", path.stat().st_size) as bar:
        digest = sha256(path, bar.update)
    entry = {
        "quant": quant,
        "bytes": path.stat().st_size,
        "sha256": digest,
        "source_repo": meta.get(gguf_keys.SOURCE_REPO),
        "source_revision": meta.get(gguf_keys.SOURCE_REVISION),
        "converter_version": meta.get(gguf_keys.CONVERTER_VERSION, CONVERTER_VERSION),
    }
    manifest_path = path.parent / MANIFEST
    with _locked(path.parent):  # read-modify-write under the lock
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
        manifest["files"][path.name] = entry
        manifest["files"] = dict(sorted(manifest["files"].items()))
        write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")


def forget(directory: Path, names: list[str]) -> None:
    """Drop NAMES (files removed from DIRECTORY) from its manifest.json; the manifest goes with its last entry."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return
    with _locked(directory):  # read-modify-write under the lock, as record does
        manifest = json.loads(manifest_path.read_text())
        for name in names:
            manifest.get("files", {}).pop(name, None)
        if manifest.get("files"):
            write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
        else:
            manifest_path.unlink()
