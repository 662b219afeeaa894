"""The model store, `$EMBEDRUNNER_HOME/<model>/`: which GGUFs a model directory holds, which one a run can
take as it is, and removing files (`runner rm`, `runner models --prune`) with manifest.json kept in step.

The store deletes only what it made: files its manifest.json records, by a plain name (no `/`, no `..`), in a
model folder directly inside the models home that is a real directory (a link to a folder elsewhere is
refused), each removed without following a link; and its own temp files of writers that are gone. Whatever
else a folder holds stays. Pure Python, no llama.cpp: the planner reads it to know what a run will still have
to write.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from quantize import gguf_keys
from quantize.errors import BadInput, ModelNotFound, UserError
from quantize.files import models_home, orphaned
from quantize.manifest import MANIFEST, entries, forget, plain_name, read_metadata
from quantize.manifest import verify as verify_directory
from quantize.quants import PREFERENCE, UNQUANTIZED
from quantize.reference import Kind, ModelRef

log = logging.getLogger("runner")

HEAD_SUFFIX = ".head.gguf"


@dataclass(frozen=True)
class Removed:
    path: Path
    bytes: int
    why: str


def on_disk(directory: Path) -> dict[str, Path]:
    """{QUANT: path} for `<stem>-<QUANT>.gguf` files in DIRECTORY (a link to a file counts, a dangling one not)."""
    return _by_quant([p for p in sorted(directory.glob("*.gguf")) if p.is_file()] if directory.is_dir() else [])


def _by_quant(paths: list[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in paths:
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


def usable(files: dict[str, Path], quant: str, base: Path | None = None) -> Path | None:
    """QUANT's file in FILES when a run can take it as it is: it exists and was made from the same conversion
    as BASE (default: as an unquantized file beside it, F16 or BF16, either may be the source); a quant of an older
    conversion is made again."""
    path = files.get(quant)
    if path is None:
        return None
    bases = [base] if base is not None else [files[q] for q in UNQUANTIZED if q in files]
    if not bases or quant in UNQUANTIZED or _stamp(path) in {_stamp(b) for b in bases}:
        return path
    return None


def serves(files: dict[str, Path], quant: str | None) -> bool:
    """A model directory holding FILES gives QUANT without its checkpoint: QUANT's file is usable as it is, or
    an unquantized file is there to make it from (QUANT None: any file will do). An unquantized type is made
    only by a conversion: an F16 file is no source for the exact BF16 one, nor the other way round."""
    if quant is None:
        return bool(files)
    quant = quant.upper()
    return usable(files, quant) is not None or (quant not in UNQUANTIZED and base_file(files) is not None)


def _stamp(path: Path) -> object:
    return read_metadata(path).get(gguf_keys.SOURCE_STAMP)


def model_dir(model: str, home: Path | None = None) -> Path:
    """MODEL's folder in the models HOME, where the store may delete: MODEL is a plain name (or a path to a folder
    directly in the home), the folder is a real directory, not a link, and it holds a manifest.json.

    Anything else is a one-line error: `runner rm ../x`, `/abs/dir` or `.` name no model of this store.
    """
    home = home or models_home()
    name = model
    if not plain_name(model):  # a path: only a folder directly in the home names a model of this store
        path = Path(model).expanduser()
        same_home = path.name and path.parent.resolve() == home.resolve()
        if not (same_home and plain_name(path.name)):
            raise BadInput(
                f"{model}: not a model folder in the models home ({home}); the store removes only what it made "
                "there (`runner models` lists it): remove other files by hand"
            )
        name = path.name
    directory = home / name
    try:
        mode = directory.lstat().st_mode
    except FileNotFoundError:
        raise ModelNotFound(f"{model}: no such model in {home}; `runner models` lists what is on disk") from None
    if stat.S_ISLNK(mode):
        raise BadInput(
            f"{directory}: a link to {os.readlink(directory)}; the store never deletes through a link: remove the "
            "link itself (`rm` it), and the files it points to by hand"
        )
    if not stat.S_ISDIR(mode):
        raise ModelNotFound(f"{directory}: not a model folder; `runner models` lists what is on disk")
    if not os.path.lexists(directory / MANIFEST):
        raise ModelNotFound(f"{directory}: no {MANIFEST}, so nothing here was recorded by this tool: remove by hand")
    return directory


def remove_model(model: str, quants: list[str] | None = None, home: Path | None = None) -> list[Removed]:
    """`runner rm MODEL [--quant Q ...]`: QUANTS' files (all of the model's when None) out of the models home."""
    return remove(model_dir(model, home), quants)


def remove(directory: Path, quants: list[str] | None = None) -> list[Removed]:
    """Delete QUANTS' files from DIRECTORY (all the files its manifest.json records when None) and update the
    manifest; the pooling-head sidecar goes with the last trunk that needs it.

    Only files the manifest records are removed: a corrupt manifest removes nothing, a quant it does not record
    is a ModelNotFound naming what it does, and files it does not record stay (a warning names them). The
    directory goes when nothing is left in it.
    """
    if directory.is_symlink():
        raise BadInput(f"{directory}: a link to {os.readlink(directory)}; the store never deletes through a link")
    recorded = entries(directory)  # read (or refused) before anything is deleted
    files = _recorded_files(directory, recorded)
    if quants is not None:
        missing = [q for q in quants if q not in files]
        if missing:
            have = ", ".join(files) or "nothing"
            raise ModelNotFound(
                f"{directory}: no {', '.join(missing)} file here (have {have}); `runner models` lists them"
            )
        out = _unlink_all([files[q] for q in quants], "removed")
        out += _unlink_all(_unused_heads(directory, recorded), "its last trunk was removed")
        forget(directory, [r.path.name for r in out])
        return out
    out = _unlink_all([directory / name for name in sorted(recorded)], "removed")
    out += _unlink_all(_orphans(directory), "left by a writer that is gone")
    forget(directory, sorted(recorded))
    (directory / f".{MANIFEST}.lock").unlink(missing_ok=True)
    if kept := sorted(p.name for p in directory.iterdir()):
        log.warning("%s: kept %s (not recorded in %s)", directory, ", ".join(kept), MANIFEST)
    else:
        directory.rmdir()
    return out


def prune(home: Path) -> list[Removed]:
    """Reclaim what no run will use, in every model folder under HOME: temp files of writers that died
    (kill -9 mid-conversion), quants of an older conversion than the F16 beside them (they would be made
    again), head sidecars no trunk refers to, and manifest entries of files that are gone.

    A folder that is a link is skipped (never deleted through), and so is one whose manifest cannot be read:
    each with a warning line, and the others are pruned.
    """
    out: list[Removed] = []
    for directory in sorted(home.iterdir()) if home.is_dir() else []:
        if directory.is_symlink():
            if directory.is_dir():
                log.warning("%s: skipped, a link to %s (the store never deletes through a link)", directory,
                            os.readlink(directory))  # fmt: skip
            continue
        if not directory.is_dir():
            continue
        out += _unlink_all(_orphans(directory), "left by a writer that is gone")
        try:
            recorded = entries(directory)
        except UserError as e:
            log.warning("%s; skipped", e)
            continue
        files = _recorded_files(directory, recorded)
        stale = [p for q, p in files.items() if q not in UNQUANTIZED and _older_conversion(files, q)]
        out += _unlink_all(stale, "made from an older conversion than the F16 beside it")
        out += _unlink_all(_unused_heads(directory, recorded), "no model file uses it")
        forget(directory, sorted(n for n in recorded if not os.path.lexists(directory / n)))
    return out


def verify(model: str | None, home: Path | None = None) -> list[tuple[Path, str | None]]:
    """`runner verify [MODEL]`: (file, problem) pairs, problem None when the file matches its manifest entry.

    MODEL: a GGUF file (its directory's manifest.json checks it), a model directory, or a name in the models
    HOME; None: every model folder in the home. Read-only, so a link the user names is followed.
    """
    home = home or models_home()
    if model is None:
        return [r for m in sorted(home.glob(f"*/{MANIFEST}")) for r in verify_directory(m.parent)]
    ref = ModelRef.parse(model)
    if ref.kind is Kind.GGUF:
        path = ref.path.resolve()
        return verify_directory(path.parent, only=path.name)
    directory = ref.path or home / model  # a model directory, or a name in the models home (a registry name's)
    if not os.path.lexists(directory / MANIFEST):
        raise BadInput(f"{model}: no {MANIFEST} there to check against (no such file, directory or model on disk)")
    return verify_directory(directory)


def _recorded_files(directory: Path, recorded: dict[str, dict]) -> dict[str, Path]:
    """{QUANT: path} of the GGUF files in DIRECTORY that its manifest RECORDED (a link counts, and is never followed
    by a removal)."""
    paths = [directory / name for name in sorted(recorded) if name.endswith(".gguf")]
    return _by_quant([p for p in paths if os.path.lexists(p)])


def _regular(path: Path) -> bool:
    return os.path.lexists(path) and stat.S_ISREG(path.lstat().st_mode)


def _unlink_all(paths: list[Path], why: str) -> list[Removed]:
    """Unlink PATHS (a link itself, never what it points to), skipping those already gone and folders."""
    out = []
    for path in paths:
        try:
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        out.append(Removed(path, st.st_size if stat.S_ISREG(st.st_mode) else 0, why))
    return out


def _orphans(directory: Path) -> list[Path]:
    """Temp files in DIRECTORY of `atomic_path` writers on this host that are gone."""
    return [p for p in sorted(directory.glob(".*.partial-*")) if orphaned(p)]


def _older_conversion(files: dict[str, Path], quant: str) -> bool:
    """QUANT's file was made from another conversion than the unquantized file beside it. An unreadable file is
    left for `runner verify` to report, not deleted."""
    try:
        return usable(files, quant) is None
    except UserError:
        return False


def _unused_heads(directory: Path, recorded: dict[str, dict]) -> list[Path]:
    """Recorded pooling-head sidecars (NV-Embed) that no trunk GGUF in DIRECTORY names. None while any trunk
    cannot be read: its head may be in use."""
    heads = [directory / n for n in sorted(recorded) if n.endswith(HEAD_SUFFIX) and _regular(directory / n)]
    if not heads:
        return []
    used = set()
    for trunk in on_disk(directory).values():
        try:
            used.add(read_metadata(trunk).get(gguf_keys.HEAD_FILE))
        except UserError:
            return []
    return [h for h in heads if h.name not in used]
