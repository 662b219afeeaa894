"""The quant ladder: F16 GGUF -> Q8_0 ... Q2_K through llama.cpp's own quantizer, plus manifest.json."""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import llama_cpp

from quantize import gguf_keys, llamacpp
from quantize.errors import BadInput, EngineError
from quantize.files import atomic_path
from quantize.manifest import read_metadata, record
from quantize.quants import LADDER, UNQUANTIZED


def quant_path(source: Path, quant: str, outdir: Path | None = None) -> Path:
    """`<stem>-<QUANT>.gguf`, where the stem drops a trailing -F16/-F32/-BF16 of the source."""
    stem = source.stem
    for tag in UNQUANTIZED:
        stem = stem.removesuffix(f"-{tag}")
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
