"""HF checkpoint -> one GGUF file (F32, F16 or BF16), streamed one tensor at a time.

The story: resolve the source, pick the model family from config.json, reuse the file when it was
made from this very source, else index the safetensors shards without reading them, write the GGUF
header (hyper-parameters, tokenizer, provenance), then load, transform and write each tensor in turn.
The file appears under its final name only once complete and fsynced, and is recorded in manifest.json.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import numpy as np

from quantize import CONVERTER_VERSION, gguf_keys
from quantize.architectures import Family, for_config
from quantize.checkpoint import LazyTensor, open_checkpoint
from quantize.errors import BadInput, CorruptModelFile
from quantize.files import atomic_path, models_home, sha256
from quantize.manifest import read_metadata, record
from quantize.progress import SILENT, Progress, rate, size
from quantize.registry import ModelEntry
from quantize.source import Source, read_config, resolve, source_files, weights_dtype
from quantize.store import quant_path
from quantize.vocab import add_vocab

log = logging.getLogger("runner")
OUTTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "bf16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}
RUN_OUTTYPES = ("f16", "bf16")  # what a run converts to (run_outtype); f32 only when asked
POOLING_TYPES = {
    "mean": gguf.PoolingType.MEAN,
    "cls": gguf.PoolingType.CLS,
    "last": gguf.PoolingType.LAST,
    # llama.cpp hands back every token's state; the runner pools them through the model's head.
    "latent-attention": gguf.PoolingType.NONE,
}


@dataclass(frozen=True)
class _Planned:
    name: str
    source: LazyTensor | np.ndarray
    qtype: gguf.GGMLQuantizationType

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.source.shape)


def convert(
    source: str,
    outdir: Path | None = None,
    outtype: str = "f16",
    revision: str | None = None,
    as_embedder: bool = False,
    progress: Progress = SILENT,
    pooling: str | None = None,
    causal: bool | None = None,
) -> Path:
    """Convert SOURCE (HF dir, registry name or hub repo id) and return the GGUF path.

    POOLING and CAUSAL are for checkpoints models.toml does not name (its entries carry their own): the
    pooling to record (default: the sentence-transformers files', else mean) and causal attention (default:
    bidirectional). A file already made from the same source files, registry entry, options and converter
    version is reused.
    PROGRESS shows the download, the tensors written and the manifest's sha256, and sums each step up.
    """
    src = resolve(source, revision, progress)
    family, pooling, causal = _choices(src, as_embedder, pooling, causal, source)
    name, path = output_name(src), output_path(src, outdir, outtype)
    outdir = path.parent
    outdir.mkdir(parents=True, exist_ok=True)
    stamp = source_stamp(src, outtype, as_embedder, pooling, causal)
    if is_current(path, stamp):
        progress.say(f"convert: {path.name} reused (made from this unchanged source), {size(path.stat().st_size)}")
        return path
    started = time.perf_counter()
    tensors = open_checkpoint(src.path)
    extra: dict[str, object] = {gguf_keys.SOURCE_STAMP: stamp}
    if dtype := weights_dtype(read_config(src.path)):
        extra[gguf_keys.SOURCE_DTYPE] = dtype
    head = family.head_tensors(lambda n: tensors[n].load() if n in tensors else None)
    if head is not None:
        head_path = write_head(family, head, outdir / f"{name}.head.gguf")
        record(head_path, "head")
        extra |= {gguf_keys.HEAD_FILE: head_path.name, gguf_keys.HEAD_SHA256: sha256(head_path)}
    count = write_gguf(path, family, tensors, src, name, outtype, extra, progress, pooling)
    if pooling == "last" and not read_metadata(path).get("tokenizer.ggml.add_eos_token"):
        log.warning(
            "%s: last-token pooling, but its tokenizer appends no EOS token: each vector is the state of the "
            "text's own last token. Check the model card: last-token embedders are trained on an appended EOS",
            source,
        )
    record(path, outtype.upper(), progress)
    seconds, written = time.perf_counter() - started, path.stat().st_size
    progress.say(
        f"convert: {path.name}, {count} tensors, {size(written)} in {seconds:.1f} s ({rate(written, seconds)})"
    )
    return path


def _choices(
    src: Source, as_embedder: bool, pooling: str | None, causal: bool | None, where: str
) -> tuple[Family, str, bool]:
    """The family, pooling and attention a conversion of SRC records (POOLING/CAUSAL: --pooling/--causal)."""
    entry = src.entry
    if entry is not None and (pooling is not None or causal is not None):
        raise BadInput(
            f"{where}: a models.toml model takes its pooling and attention from its entry; --pooling, --causal "
            "and --bidirectional are for checkpoints the registry does not name"
        )
    stated = entry is not None or causal is not None
    causal = entry.causal if entry else bool(causal)
    family = for_config(read_config(src.path), as_embedder or bool(entry and entry.embedder), where, causal)
    return family, conversion_pooling(src, family, pooling, stated, where), causal


def conversion_stamp(
    src: Source, outtype: str = "f16", as_embedder: bool = False, pooling: str | None = None, causal: bool | None = None
) -> str:
    """The stamp `convert` gives SRC's file with these options, without converting: what the disk plan and
    `made_from` compare a file on disk with."""
    _, pooling, causal = _choices(src, as_embedder, pooling, causal, str(src.path))
    return source_stamp(src, outtype, as_embedder, pooling, causal)


def made_from(src: Source, quant: str) -> Path | None:
    """QUANT's file in SRC's model directory when it was made from this very source (the F16's or BF16's stamp
    travels into every quant): a run can take it without converting again, even after --no-keep-f16 removed the
    file it was made from."""
    path = quant_path(output_path(src, None, "f16"), quant.upper())
    return path if any(is_current(path, conversion_stamp(src, t)) for t in RUN_OUTTYPES) else None


def run_outtype(src: Source | None, quant: str | None) -> str:
    """What a run that needs QUANT converts SRC to: BF16 for BF16 (a plan takes it only for a bfloat16 model, whose
    weights it holds exactly), and to make a quant when a current BF16 conversion of SRC is there already (SRC None:
    not on disk yet); else F16."""
    if quant == "BF16":
        return "bf16"
    if quant not in (None, "F16") and src is not None:
        bf16 = output_path(src, None, "bf16")
        if is_current(bf16, conversion_stamp(src, "bf16")) and not output_path(src, None, "f16").is_file():
            return "bf16"
    return "f16"


def output_name(src: Source) -> str:
    """The model's name: its registry name, else the repo's or directory's last part."""
    return src.entry.name if src.entry else (src.repo or src.path.name).split("/")[-1]


def output_path(src: Source, outdir: Path | None, outtype: str) -> Path:
    """Where `convert` writes SRC: `<outdir or models home/<name>>/<name>-<OUTTYPE>.gguf`."""
    name = output_name(src)
    return (Path(outdir) if outdir else models_home() / name) / f"{name}-{outtype.upper()}.gguf"


def source_stamp(
    src: Source, outtype: str, as_embedder: bool, pooling: str | None = None, causal: bool | None = None
) -> str:
    """A digest of everything a converted file depends on, cheap to recompute (no weights are read).

    POOLING and CAUSAL count when given (the conversion's choices); a caller that leaves them out gets the
    digest of a mean-pooled bidirectional conversion, as before they existed."""
    files = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(src.path)]
    what = {
        "path": str(src.path),
        "files": files,
        "entry": asdict(src.entry) if src.entry else None,
        "outtype": outtype,
        "as_embedder": as_embedder,
        "converter": CONVERTER_VERSION,
    }
    if causal:
        what["causal"] = True
    if pooling not in (None, "mean"):
        what["pooling"] = pooling
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def is_current(path: Path, stamp: str) -> bool:
    """PATH exists, was made from the source STAMP describes, and its pooling head (if any) is beside it."""
    if not path.is_file():
        return False
    try:
        meta = read_metadata(path)
    except CorruptModelFile:
        return False
    head = meta.get(gguf_keys.HEAD_FILE)
    return meta.get(gguf_keys.SOURCE_STAMP) == stamp and (not head or (path.parent / str(head)).is_file())


def write_head(family: Family, head: dict[str, np.ndarray], path: Path) -> Path:
    """The pooling head's sidecar GGUF (float32)."""
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(tmp, family.head_arch)
        family.write_head(w, head)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def write_gguf(
    path: Path,
    arch: Family,
    tensors: dict[str, LazyTensor],
    src: Source,
    name: str,
    outtype: str,
    extra: dict[str, object] | None = None,
    progress: Progress = SILENT,
    pooling: str | None = None,
) -> int:
    """Write the GGUF (header, then each tensor loaded, transformed and encoded in turn); returns the tensor
    count. PROGRESS's bar counts the bytes written, so its rate and ETA hold for the big 8B tensors too."""
    ftype, qtype = OUTTYPES[outtype]
    plan = _plan(arch, tensors, qtype)
    sizes = [_nbytes(t.shape, t.qtype) for t in plan]
    with atomic_path(path) as tmp, progress.bar(f"convert {path.name}", sum(sizes)) as bar:
        w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch.gguf_arch])
        _write_metadata(w, arch, src, name, ftype, extra or {}, pooling)
        add_vocab(w, src.path, arch.vocab_size)
        for t, nbytes in zip(plan, sizes, strict=True):
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (t, nbytes) in enumerate(zip(plan, sizes, strict=True), 1):
            data = t.source.load() if isinstance(t.source, LazyTensor) else t.source
            w.write_tensor_data(_encode(arch.transform(t.name, data), t.qtype))
            del data
            bar.set_postfix_str(f"{i}/{len(plan)} tensors", refresh=False)
            bar.update(nbytes)
        w.close()
    return len(plan)


def _plan(arch: Family, tensors: dict[str, LazyTensor], qtype: gguf.GGMLQuantizationType) -> list[_Planned]:
    plan: list[_Planned] = []
    for hf_name, lazy in tensors.items():
        gguf_name = arch.gguf_name(hf_name)
        if gguf_name is not None:
            f32 = len(lazy.shape) < 2 or gguf_name in arch.keep_f32
            plan.append(_Planned(gguf_name, lazy, gguf.GGMLQuantizationType.F32 if f32 else qtype))
    for gguf_name, data in arch.extra_tensors():
        plan.append(_Planned(gguf_name, data, gguf.GGMLQuantizationType.F32))
    return sorted(plan, key=lambda t: _natural_key(t.name))


def _write_metadata(
    w: gguf.GGUFWriter,
    arch: Family,
    src: Source,
    name: str,
    ftype: int,
    extra: dict[str, object],
    pooling: str | None = None,
) -> None:
    entry: ModelEntry | None = src.entry
    w.add_name(name)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if src.repo:
        w.add_string(gguf_keys.SOURCE_REPO, src.repo)
        w.add_source_repo_url(f"https://huggingface.co/{src.repo}")
    w.add_string(gguf_keys.SOURCE_REVISION, src.revision or "local")
    w.add_string(gguf_keys.CONVERTER_VERSION, CONVERTER_VERSION)
    arch.write_hparams(w)
    pooling = pooling or (entry.pooling if entry else arch.pooling or _checkpoint_pooling(src.path))
    w.add_pooling_type(POOLING_TYPES[pooling])
    w.add_string(gguf_keys.POOLING, pooling)
    # The family's own defaults (prompts, pooling rules), then what the registry says over them.
    values = dict(arch.metadata_defaults())
    values.update(extra)
    if entry:
        w.add_license(entry.license)
        values[gguf_keys.LICENSE_NOTE] = entry.license_note
        values[gguf_keys.MAX_LENGTH] = entry.max_length
        values[gguf_keys.QUERY_PROMPT] = entry.query_prompt
        values[gguf_keys.DOCUMENT_PROMPT] = entry.document_prompt
        if entry.default_task:
            values[gguf_keys.DEFAULT_TASK] = entry.default_task
        if entry.matryoshka_dims:
            values[gguf_keys.MATRYOSHKA_DIMS] = ",".join(str(d) for d in entry.matryoshka_dims)
    for key, value in values.items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        else:
            w.add_string(key, str(value))


def conversion_pooling(src: Source, family: Family, asked: str | None, causal_stated: bool, where: str) -> str:
    """The pooling a conversion records: the registry entry's, the family's own (NV-Embed's head), ASKED
    (--pooling), the sentence-transformers files', else mean.

    Last-token pooling of a checkpoint the registry does not name needs its attention stated: last-token
    embedders come both ways (Qwen3-Embedding and e5-mistral causal, gte-Qwen2 bidirectional), and the
    wrong one gives vectors that look fine and retrieve badly.
    """
    if src.entry:
        return src.entry.pooling
    if family.pooling:
        if asked not in (None, family.pooling):
            raise BadInput(f"{where}: this model pools with its {family.pooling} head; --pooling {asked} cannot apply")
        return family.pooling
    pooling = asked or _checkpoint_pooling(src.path)
    if pooling not in ("mean", "last", "cls"):
        raise BadInput(f"{where}: --pooling {pooling}: choose one of mean, last, cls")
    if pooling == "last" and not causal_stated:
        told = "--pooling last" if asked else "its sentence-transformers files (last-token pooling)"
        raise BadInput(
            f"{where}: {told} needs --causal or --bidirectional: Qwen3-Embedding and e5-mistral were trained "
            "with causal attention, gte-Qwen2 with bidirectional; see the model card"
        )
    return pooling


def _checkpoint_pooling(model_dir: Path) -> str:
    """The pooling a sentence-transformers checkpoint declares (1_Pooling/config.json), else mean."""
    config = model_dir / "1_Pooling" / "config.json"
    modes = json.loads(config.read_text()) if config.is_file() else {}
    if modes.get("pooling_mode_cls_token"):
        return "cls"
    if modes.get("pooling_mode_lasttoken"):
        return "last"
    return "mean"


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
