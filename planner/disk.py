"""Disk a run needs before it starts: the download, the F16 GGUF, the chosen quant, and what is already there.

A first run of an 8B model writes ~15 GB of safetensors into the Hugging Face cache, a 15 GB F16 GGUF and
the chosen quant into $EMBEDRUNNER_HOME/<model>/: 35+ GB and minutes of work. This module says so before
the first byte is written, per filesystem, and `DiskPlan.check` refuses a run that cannot fit.

Sizes: the GGUFs from the shapes (quantize/sizes.py: exact once a GGUF of the model is on disk, within 1 %
from config.json or models.toml, whose tokenizer bytes are estimated); the download from the hub's own
listing when the hub answers, else from the shapes: parameters x 2 bytes (4 when config.json says float32).
What a run writes mirrors runner/model.py `resolve_model` and quantize/convert.py `convert`: both read the
same store (quantize/store.py) and the same file names, so the plan and the run cannot drift apart.

The probes (free space, the hub listing, the Hugging Face cache) are this module's edges; tests patch them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from planner.shapes import ModelShape, from_config, from_gguf, hub_config, resolve_shape
from quantize.convert import conversion_stamp, is_current, made_from, output_path, run_outtype
from quantize.errors import NotEnoughDisk
from quantize.progress import size
from quantize.quants import PREFERENCE, UNQUANTIZED
from quantize.reference import Kind, ModelRef
from quantize.registry import ModelEntry
from quantize.sizes import file_bytes
from quantize.source import (
    Source,
    cached_snapshot,
    hub_cache,
    hub_listing,
    package_dir,
    read_config,
    resolve,
    source_files,
)
from quantize.store import base_file, on_disk, quant_path, serves, usable

FLOAT32_NAMES = ("float32", "fp32")


@dataclass(frozen=True)
class DiskItem:
    """One thing a run writes: a download into the Hugging Face cache, or a GGUF file."""

    what: str  # "download", "head" (NV-Embed's sidecar), or a quant: "F16", "Q4_K_M", ...
    path: Path  # the file (for a download: the repo's folder in the Hugging Face cache)
    bytes: int  # its size when complete
    have: int = 0  # bytes of it already on disk and usable as they are
    exact: bool = True  # False: estimated from shapes, not read from a listing or a file

    @property
    def needs(self) -> int:
        return self.bytes - self.have

    def as_json(self) -> dict:
        return {
            "what": self.what,
            "path": str(self.path),
            "bytes": self.bytes,
            "cached_bytes": self.have,
            "needs_bytes": self.needs,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class Volume:
    """A filesystem the run writes to: where, what it needs there, what it has free, and what moves it."""

    directories: tuple[Path, ...]  # where on it the run writes
    free: int
    needs: int
    what: tuple[str, ...]  # the items written there
    fix: str  # e.g. "set EMBEDRUNNER_HOME"

    @property
    def fits(self) -> bool:
        return self.needs <= self.free

    @property
    def where(self) -> str:
        return " and ".join(str(d) for d in self.directories)

    def as_json(self) -> dict:
        return {
            "directories": [str(d) for d in self.directories],
            "free_bytes": self.free,
            "needs_bytes": self.needs,
            "items": list(self.what),
            "fits": self.fits,
        }


@dataclass(frozen=True)
class DiskPlan:
    model: str
    items: tuple[DiskItem, ...] = ()
    volumes: tuple[Volume, ...] = ()
    download_from: str | None = None  # "hub listing", "Hugging Face cache" or "estimated ..."; None: no download

    @property
    def needs(self) -> int:
        """Bytes the run will write."""
        return sum(i.needs for i in self.items)

    @property
    def cached(self) -> int:
        """Bytes of what the run needs that are already on disk."""
        return sum(i.have for i in self.items)

    def check(self) -> None:
        """NotEnoughDisk, naming the directory, the bytes and the fix, when a filesystem cannot hold its share."""
        for v in self.volumes:
            if not v.fits:
                parts = ", ".join(f"{i.what} {size(i.needs)}" for i in self.items if i.needs and i.what in v.what)
                raise NotEnoughDisk(
                    f"{self.model}: needs {size(v.needs)} on {v.where} ({parts}), {size(v.free)} free; "
                    f"free space or {v.fix}"
                )

    def summary(self) -> str:
        if not self.needs:
            return "disk: nothing to write" + (f" ({size(self.cached)} already on disk)" if self.cached else "")
        parts = " + ".join(f"{i.what} {size(i.needs)}" for i in self.items if i.needs)
        where = ", ".join(f"{size(v.free)} free on {v.where}" for v in self.volumes)
        return f"disk: writes {size(self.needs)} ({parts}), {where}"

    def as_json(self) -> dict:
        return {
            "needs_bytes": self.needs,
            "cached_bytes": self.cached,
            "download_from": self.download_from,
            "items": [i.as_json() for i in self.items],
            "volumes": [v.as_json() for v in self.volumes],
        }


def volume(path: Path) -> tuple[int, int]:
    """(filesystem id, bytes free to this user) of the filesystem PATH is on, or would be created on."""
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return os.stat(path).st_dev, st.f_bavail * st.f_frsize


def for_run(model: str | ModelRef, quant: str | None = None, shape: ModelShape | None = None) -> DiskPlan:
    """What `resolve_model(MODEL, QUANT)` will write (runner/model.py): nothing for a GGUF file or a quant
    already there; the quant for a directory holding an unquantized file; else the conversion first (and the
    download before it for a registry name or a hub repo id). SHAPE: the model's, if the caller has it."""
    ref = ModelRef.parse(model)
    quant = quant.upper() if quant else None
    if ref.kind is Kind.GGUF:
        return DiskPlan(ref.text)
    if ref.kind is Kind.STORE:
        return _plan(ref.text, _from_store(ref.path, quant), None)
    entry, repo = ref.entry, ref.repo
    revision = entry.revision if entry else None
    checkpoint = None  # a local checkpoint's files, to stamp
    if ref.kind is Kind.CHECKPOINT:  # converted into the models home
        src = checkpoint = resolve(str(ref.path))
        if quant not in (None, "F16") and (done := made_from(src, quant)) is not None:
            return _plan(ref.text, [DiskItem(quant, done, done.stat().st_size, done.stat().st_size)], None)
    elif ref.kind is Kind.REGISTRY and serves(on_disk(ref.home), quant):
        return _plan(ref.text, _from_store(ref.home, quant), None)
    else:  # not downloaded yet: the source names the model (its file names) but has no files to stamp
        src = Source(Path(ref.text), repo, revision, entry)
    shape = shape or resolve_shape(ref)
    outtype = run_outtype(checkpoint, quant)  # F16, or BF16 as resolve_model converts
    download, local, source = _download(src, entry, repo, revision, shape)
    base = output_path(src, None, outtype)
    items = [*download, *_converted(local, base, shape, as_embedder=False, outtype=outtype.upper())]
    if quant not in (None, outtype.upper()):
        exact = items[len(download)].have > 0  # the file there is current: size the quant from its own header
        items.append(_quant(quant, quant_path(base, quant), from_gguf(base) if exact else shape, exact))
    return _plan(ref.text, items, source)


def for_convert(
    source: str,
    outdir: Path | None,
    outtype: str,
    revision: str | None = None,
    as_embedder: bool = False,
    pooling: str | None = None,
    causal: bool | None = None,
) -> DiskPlan:
    """What `runner convert SOURCE` will write: the download (registry names, hub repo ids) and the GGUF,
    unless the GGUF there was made from this very source with these options (POOLING, CAUSAL: as convert's)."""
    ref = ModelRef.parse(source)
    if ref.kind is Kind.CHECKPOINT:
        src = resolve(str(ref.path))
        shape = from_config(ref.path.name, read_config(src.path))
        entry, repo = None, None
    elif ref.kind is Kind.REGISTRY:
        if pooling is not None or causal is not None:
            return DiskPlan(source)  # convert refuses the options for a registry model, naming it
        entry = ref.entry
        repo, revision = entry.repo, revision or entry.revision
        src, shape = Source(Path(source), repo, revision, entry), resolve_shape(ref)
    elif ref.kind is Kind.HUB:
        entry, repo = None, ref.repo
        config = hub_config(repo, revision)
        if config is None:
            return DiskPlan(source)  # neither the hub nor the cache has it: convert says so
        src, shape = Source(Path(source), repo, revision), from_config(repo, config)
    else:
        return DiskPlan(source)  # a GGUF or a directory without config.json: convert refuses it, naming it
    download, local, where = _download(src, entry, repo, revision, shape)
    target = output_path(src, outdir, outtype)
    converted = _converted(local, target, shape, as_embedder, outtype.upper(), pooling, causal)
    return _plan(source, [*download, *converted], where, outdir=outdir is not None)


def for_quantize(source: Path, quants: list[str], outdir: Path | None = None) -> DiskPlan:
    """What `runner quantize SOURCE --quant ...` will write: each quant, sized from SOURCE's own header (a file
    already there is replaced whole, so it counts in full)."""
    shape = from_gguf(source)
    items = [_quant(q, quant_path(source, q, outdir), shape, exact=True) for q in quants]
    return _plan(str(source), items, None, outdir=outdir is not None)


# --- what is there, and what will be written ---------------------------------------------------------------
def _from_store(directory: Path, quant: str | None) -> list[DiskItem]:
    """A model directory of GGUFs: QUANT's file as it is, or made from the unquantized file beside it."""
    files = on_disk(directory)
    if not files:
        return []
    quant = quant or min(files, key=PREFERENCE.index)  # resolve_model's default: the highest fidelity there
    if (path := usable(files, quant)) is not None:
        return [DiskItem(quant, path, path.stat().st_size, path.stat().st_size)]
    base = base_file(files)
    if base is None or quant in UNQUANTIZED:
        return []  # resolve_model says there is nothing to make it from (an unquantized file needs a conversion)
    exact = from_gguf(base)  # the file's own header and tensors: sizes to the byte
    tag = base.stem.rsplit("-", 1)[-1].upper()
    have = base.stat().st_size
    return [DiskItem(tag, base, have, have), _quant(quant, quant_path(base, quant), exact, exact=True)]


def _quant(quant: str, path: Path, shape: ModelShape, exact: bool) -> DiskItem:
    n = file_bytes(list(shape.tensors), quant, shape.header_bytes, shape.layers, shape.n_gqa)
    return DiskItem(quant, path, n, 0, exact)


def _converted(
    src: Source | None,
    target: Path,
    shape: ModelShape,
    as_embedder: bool,
    outtype: str = "F16",
    pooling: str | None = None,
    causal: bool | None = None,
) -> list[DiskItem]:
    """The converted GGUF (and NV-Embed's head sidecar): already there when made from this very source SRC
    with these options (None: the checkpoint is not on disk yet, so a fresh download is converted again)."""
    stamp = conversion_stamp(src, outtype.lower(), as_embedder, pooling, causal) if src is not None else None
    current = stamp is not None and is_current(target, stamp)
    n = target.stat().st_size if current else _quant(outtype, target, shape, exact=False).bytes
    items = [DiskItem(outtype, target, n, n if current else 0, exact=current)]
    if shape.head_bytes:
        head = target.parent / f"{target.stem.removesuffix(f'-{outtype}')}.head.gguf"
        have = head.stat().st_size if current and head.is_file() else 0
        items.append(DiskItem("head", head, have or shape.head_bytes, have, exact=bool(have)))
    return items


def _download(
    src: Source, entry: ModelEntry | None, repo: str | None, revision: str | None, shape: ModelShape
) -> tuple[list[DiskItem], Source | None, str | None]:
    """The download item (none for a local directory or an installed package); the checkpoint as the
    conversion will see it, when it is on disk already (so its stamp can be checked), else None; and where the
    download's bytes came from."""
    if entry is not None and entry.package:
        return [], Source(package_dir(entry.package), entry.repo, entry.revision, entry), None
    if repo is None:
        return [], src, None
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    snapshot = cached_snapshot(repo, revision)
    src = Source(snapshot, repo, revision, entry) if snapshot is not None else None
    listing = hub_listing(repo, revision)
    if listing is not None:
        total, have = sum(f.bytes for f in listing), sum(f.bytes for f in listing if f.cached)
        return [DiskItem("download", folder, total, have)], src, "hub listing"
    if snapshot is not None:
        n = sum(f.stat().st_size for f in source_files(snapshot))
        return [DiskItem("download", folder, n, n)], src, "Hugging Face cache"
    n = _checkpoint_bytes(shape, entry.config() if entry else {})
    return [DiskItem("download", folder, n, 0, exact=False)], None, "estimated from shapes: parameters x dtype size"


def _checkpoint_bytes(shape: ModelShape, config: dict) -> int:
    """Safetensors bytes from shapes: every tensor's parameters (a pooling head's from its float32 size) x the
    checkpoint's dtype size (config.json's torch_dtype; the published embedders ship bf16 or fp16)."""
    params = sum(math.prod(t.shape) for t in shape.tensors) + shape.head_bytes // 4
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16")
    return params * (4 if dtype in FLOAT32_NAMES else 2)


def _plan(model: str, items: list[DiskItem], download_from: str | None, outdir: bool = False) -> DiskPlan:
    """Group what is written by filesystem: each must hold its own share."""
    groups: dict[int, tuple[int, list[DiskItem]]] = {}
    for item in items:
        if item.needs:
            dev, free = volume(_directory(item))
            groups.setdefault(dev, (free, []))[1].append(item)
    volumes = []
    for free, written in groups.values():
        directories = tuple(dict.fromkeys(_directory(i) for i in written))
        how = _fix({i.what == "download" for i in written}, outdir)
        volumes.append(Volume(directories, free, sum(i.needs for i in written), tuple(i.what for i in written), how))
    return DiskPlan(model, tuple(items), tuple(volumes), download_from)


def _fix(downloads: set[bool], outdir: bool) -> str:
    """What moves the writes on one filesystem elsewhere: HF_HOME for the download, EMBEDRUNNER_HOME (or
    --outdir) for the GGUFs."""
    ggufs = "pass another --outdir" if outdir else "set EMBEDRUNNER_HOME"
    if downloads == {True}:
        return "set HF_HOME"
    if downloads == {False}:
        return ggufs
    return f"{ggufs} and set HF_HOME" if outdir else "set EMBEDRUNNER_HOME and HF_HOME to a bigger disk"


def _directory(item: DiskItem) -> Path:
    return item.path if item.what == "download" else item.path.parent
