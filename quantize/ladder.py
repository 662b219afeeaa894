"""The quant ladder: F16 GGUF -> Q8_0 ... Q2_K through llama.cpp's own quantizer, plus manifest.json."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from quantize import CONVERTER_VERSION, gguf_keys, llamacpp
from quantize.errors import BadInput, CorruptModelFile, EngineError
from quantize.files import atomic_path, sha256, write_text_atomic
from quantize.gguf_header import read_header

# Best fidelity first.
LADDER = ["Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
MANIFEST = "manifest.json"


def quant_path(source: Path, quant: str, outdir: Path | None = None) -> Path:
    """`<stem>-<QUANT>.gguf`, where the stem drops a trailing -F16/-F32/-BF16 of the source."""
    stem = source.stem
    for suffix in ("-F16", "-F32", "-BF16"):
        stem = stem.removesuffix(suffix)
    return (outdir or source.parent) / f"{stem}-{quant}.gguf"


def quantize(
    source: Path,
    quants: list[str],
    outdir: Path | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[Path]:
    """Quantize SOURCE (an F16/F32/BF16 GGUF) to each of QUANTS; returns the files written."""
    unknown = [q for q in quants if q not in LADDER]
    if unknown:
        raise BadInput(f"unknown quant {', '.join(unknown)}; choose from {', '.join(LADDER)}")
    meta = read_metadata(source)  # fails early, with a clear message, on a file that is not a GGUF
    llamacpp.init()
    outdir = Path(outdir) if outdir else source.parent
    outdir.mkdir(parents=True, exist_ok=True)
    if head := meta.get(gguf_keys.HEAD_FILE):  # NV-Embed: each quant needs the pooling head beside it
        _copy_head(source.parent / str(head), outdir / str(head))
    written = []
    for i, quant in enumerate(quants, 1):
        dest = quant_path(source, quant, outdir)
        progress(f"[{i}/{len(quants)}] {quant}: {source.name} -> {dest.name}")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        params.nthread = threads or os.cpu_count() or 1
        with atomic_path(dest) as tmp:
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise EngineError(f"{source}: llama.cpp could not quantize to {quant} ({llamacpp.last_error()})")
        record(dest, quant)
        progress(f"[{i}/{len(quants)}] {quant}: {dest.stat().st_size / 2**20:.1f} MiB")
        written.append(dest)
    return written


def _copy_head(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise BadInput(f"{src}: the pooling head this model needs is missing; re-run `runner convert`")
    if src.resolve() != dest.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)


def read_metadata(path: Path) -> dict[str, object]:
    """The GGUF's key/value metadata (scalars and strings only), or CorruptModelFile."""
    if not path.is_file():
        raise BadInput(f"{path}: no such file")
    try:
        return read_header(path).metadata
    except Exception as e:  # ValueError, struct.error, UnicodeDecodeError... on files that are not GGUF
        raise CorruptModelFile(f"{path}: not a readable GGUF file ({e}); re-create it with `runner convert`") from None


def record(path: Path, quant: str) -> None:
    """Add PATH to its directory's manifest.json: quant, bytes, sha256, source and converter version."""
    meta = read_metadata(path)
    manifest_path = path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"files": {}}
    manifest["files"][path.name] = {
        "quant": quant,
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "source_repo": meta.get(gguf_keys.SOURCE_REPO),
        "source_revision": meta.get(gguf_keys.SOURCE_REVISION),
        "converter_version": meta.get(gguf_keys.CONVERTER_VERSION, CONVERTER_VERSION),
    }
    manifest["files"] = dict(sorted(manifest["files"].items()))
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
