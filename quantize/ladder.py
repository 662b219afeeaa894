"""The quant ladder: F16 GGUF -> Q8_0 ... Q2_K (and, with an importance matrix, the i-quants) through llama.cpp's
own quantizer, plus manifest.json."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import llama_cpp
from tqdm import tqdm

from quantize import gguf_keys, imatrix, llamacpp
from quantize.errors import BadInput, EngineError
from quantize.files import atomic_path
from quantize.gguf_check import check_gguf
from quantize.manifest import record
from quantize.progress import SILENT, Progress, size
from quantize.quants import IQUANTS, QUANTS, RAISED_TENSORS
from quantize.sizes import nbytes, read_tensors
from quantize.store import quant_path

_TENSOR_LINE = re.compile(r"\[\s*(?P<i>\d+)/\s*(?P<n>\d+)\]\s+(?P<name>\S+)")


def quantize(
    source: Path,
    quants: list[str],
    outdir: Path | None = None,
    threads: int | None = None,
    progress: Progress = SILENT,
    importance: imatrix.Imatrix | None = None,
    tensor_types: Sequence[tuple[str, str]] = (),
    stock: bool = False,
) -> list[Path]:
    """Quantize SOURCE (an F16/F32/BF16 GGUF) to each of QUANTS; returns the files written.

    IMPORTANCE (quantize.imatrix) weighs each column's rounding error by its activations; the i-quants need it.
    TENSOR_TYPES are (regex, ggml type name) pairs, as llama-quantize's --tensor-type: a quantized tensor whose
    name the first regex matches gets that type; the project's RAISED_TENSORS rule for the quant follows them
    unless STOCK (llama.cpp's own mix, as llama-quantize makes it); quantize.sizes.tensor_types predicts the same.
    PROGRESS gets a bar per quant (llama.cpp's per-tensor log lines, weighted by each tensor's bytes) and one
    summary line per file.
    """
    unknown = [q for q in quants if q not in QUANTS]
    if unknown:
        raise BadInput(f"unknown quant {', '.join(unknown)}; choose from {', '.join(QUANTS)}")
    if importance is None and (needs := [q for q in quants if q in IQUANTS]):
        raise BadInput(f"{', '.join(needs)} need an importance matrix: add --imatrix auto (or --imatrix FILE)")
    # Fails early, with a clear message, on a file that is not a GGUF or whose hyper-parameters would crash
    # llama.cpp's quantizer; a pooling head name with a directory part is refused here, so --outdir D writes in D.
    meta = check_gguf(source).metadata
    threads = llamacpp.thread_count(threads, os.cpu_count() or 1)
    llamacpp.init()
    outdir = Path(outdir) if outdir else source.parent
    outdir.mkdir(parents=True, exist_ok=True)
    if head := meta.get(gguf_keys.HEAD_FILE):  # NV-Embed: each quant needs the pooling head beside it
        _copy_head(source.parent / str(head), outdir / str(head))
    tensors = {t.name: nbytes(t.type, t.shape) for t in read_tensors(source)[0]}
    entries = imatrix.quantizer_entries(importance) if importance else None
    tensor_overrides(tensor_types)  # a bad regex or type fails before the first file
    made_with = imatrix.key_values(importance) if importance else {}
    if tensor_types:
        made_with[gguf_keys.TENSOR_TYPES] = ",".join(f"{rx}={name.upper()}" for rx, name in tensor_types)
    key_values = kv_overrides(made_with)
    written = []
    for i, quant in enumerate(quants, 1):
        dest = quant_path(source, quant, outdir)
        started = time.perf_counter()
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
        params.nthread = threads
        if entries is not None:
            params.imatrix = ctypes.cast(entries, type(params.imatrix))
        if wanted := [*tensor_types, *(() if stock else RAISED_TENSORS.get(quant, ()))]:
            overrides = tensor_overrides(wanted)  # alive until llama_model_quantize returns
            params.tt_overrides = ctypes.cast(overrides, type(params.tt_overrides))
        if made_with:
            params.kv_overrides = ctypes.cast(key_values, type(params.kv_overrides))
        with (
            atomic_path(dest) as tmp,
            progress.bar(f"quantize {quant}", sum(tensors.values())) as bar,
            llamacpp.listening(_tensor_bar(bar, tensors)),
        ):
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise EngineError(f"{source}: llama.cpp could not quantize to {quant} ({llamacpp.last_error()})")
        record(dest, quant, progress)
        seconds = time.perf_counter() - started
        step = f" [{i}/{len(quants)}]" if len(quants) > 1 else ""
        progress.say(f"quantize{step}: {dest.name}, {size(dest.stat().st_size)} in {seconds:.1f} s")
        written.append(dest)
    return written


def tensor_overrides(tensor_types: Sequence[tuple[str, str]]) -> ctypes.Array:
    """llama_model_quantize_params.tt_overrides: {pattern, type} entries ending in a NULL pattern."""
    entries = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
    for entry, (pattern, type_name) in zip(entries, tensor_types, strict=False):
        try:
            re.compile(pattern)
            qtype = gguf.GGMLQuantizationType[type_name.upper()]
        except (re.error, KeyError) as e:
            raise BadInput(f"tensor type {pattern}={type_name}: {e}") from None
        entry.pattern, entry.type = pattern.encode(), int(qtype)
    return entries


def kv_overrides(values: dict[str, str | int]) -> ctypes.Array:
    """llama_model_quantize_params.kv_overrides: keys llama.cpp writes into the quant, ending in an empty key."""
    entries = (llama_cpp.llama_model_kv_override * (len(values) + 1))()
    for entry, (key, value) in zip(entries, values.items(), strict=False):
        entry.key = key.encode()
        if isinstance(value, int):
            entry.tag, entry.value.val_i64 = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_INT, value
        else:
            text = value.encode()
            if len(text) >= 128:  # llama.cpp's fixed-size string value
                raise BadInput(f"{key} would be {len(text)} bytes, over the 127 llama.cpp records: shorten it")
            entry.tag, entry.value.val_str = llama_cpp.LLAMA_KV_OVERRIDE_TYPE_STR, text
    return entries


def _tensor_bar(bar: tqdm, tensors: dict[str, int]) -> Callable[[str], None]:
    """llama.cpp's quantizer logs `[  12/ 291] blk.0.ffn_up.weight - [...], type = f16, ` as it starts a tensor
    and `size = ...` when it is done: advance BAR by that tensor's bytes in the source file."""
    current: list[str] = []

    def on_log(text: str) -> None:
        if m := _TENSOR_LINE.match(text):
            current[:] = [m["name"]]
            bar.set_postfix_str(f"{m['i']}/{m['n']} tensors", refresh=False)
        elif text.startswith("size =") and current:
            bar.update(tensors.get(current.pop(), 0))

    return on_log


def _copy_head(src: Path, dest: Path) -> None:
    if not src.is_file():
        raise BadInput(f"{src}: the pooling head this model needs is missing; re-run `runner convert`")
    if src.resolve() != dest.resolve():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
