"""An importance matrix measured the way an embedder runs, in llama.cpp's imatrix GGUF format.

llama.cpp's `llama-imatrix` runs a causal LM over perplexity chunks. An embedder runs otherwise: its own
attention (bidirectional for nemotron, NV-Embed, gte-Qwen2), its instruction prompt on queries, short texts
packed into micro-batches, its pooling. `collect` runs the model through the same Engine and Pipeline as
`runner embed`, with a `cb_eval` callback that sees every matrix multiplication as llama.cpp computes it and,
as tools/imatrix/imatrix.cpp does, adds the square of each input column to that weight's sums and counts the
rows (tokens). The file `save` writes is the one `llama-quantize --imatrix` reads (common/imatrix-loader.cpp):
`general.type = "imatrix"`, `imatrix.datasets`, `imatrix.chunk_count`, `imatrix.chunk_size`, and per weight
`<name>.in_sum2` (F32, ne = [columns, matrices]) and `<name>.counts` (F32, ne = [1, matrices]).

`quantizer_entries` turns one into what llama_model_quantize_params.imatrix takes: a NULL-terminated array
of `llama_model_imatrix_data {name, data, size}` holding in_sum2 / counts, as llama-quantize passes it.
Dense models only: MUL_MAT_ID (mixture-of-experts) is not collected, as no embedder here has experts.
"""

from __future__ import annotations

import ctypes
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import gguf
import llama_cpp
import numpy as np
from llama_cpp import _ggml

from quantize import gguf_keys
from quantize.errors import BadInput, CorruptModelFile, UserError
from quantize.files import atomic_path, sha256
from quantize.progress import SILENT, Progress

if TYPE_CHECKING:
    from planner.hardware import Hardware
    from planner.policy import Plan

CALIBRATION = "imatrix-calibration.jsonl"  # shipped in quantize/data/
KEY_TYPE = "general.type"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUM2 = ".in_sum2"
COUNTS = ".counts"
_BATCH_TEXTS = 16  # texts per Pipeline.embed call: the progress bar's step


@dataclass(frozen=True)
class CalibrationText:
    text: str
    query: bool  # embedded with the model's query prompt (its instruction template), else as a document


@dataclass
class Imatrix:
    """Per weight name: the sum of squared inputs per column (matrices x columns) and the rows seen per matrix."""

    sums: dict[str, np.ndarray] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    file: str | None = None  # the file it was loaded from (its name) and that file's sha256
    sha256: str | None = None

    def add_squares(self, name: str, squares: np.ndarray, n_rows: int) -> None:
        """Add the per-column sums of squares of N_ROWS rows seen at the input of weight NAME."""
        if name not in self.sums:
            self.sums[name] = np.zeros((1, squares.size), np.float32)
            self.counts[name] = np.zeros(1, np.float32)
        elif self.sums[name].shape[1] != squares.size:
            raise CorruptModelFile(f"{name}: inputs {squares.size} wide after {self.sums[name].shape[1]}")
        self.sums[name][0] += squares
        self.counts[name][0] += n_rows

    def values(self, name: str) -> np.ndarray:
        """What the quantizer weighs columns by: the mean square per column (1 where no row was seen)."""
        sums, counts = self.sums[name], self.counts[name]
        safe = np.where(counts > 0, counts, 1.0)[:, None]
        return np.where(counts[:, None] > 0, sums / safe, 1.0).astype(np.float32).ravel()

    @property
    def tokens(self) -> int:
        return int(max((c.max() for c in self.counts.values()), default=0))


# --- the calibration set -------------------------------------------------------------------------
def calibration_texts(path: Path | None = None) -> list[CalibrationText]:
    """The shipped calibration set, or PATH: `.jsonl` (strings, or objects with `text` and optional
    `"query": true`) or `.txt` (one document per line)."""
    if path is None:
        lines = resources.files("quantize").joinpath("data", CALIBRATION).read_text("utf-8").splitlines()
        where = CALIBRATION
    else:
        try:
            lines = Path(path).read_text("utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"--texts {path}: cannot read it ({e})") from None
        where = str(path)
        if Path(path).suffix != ".jsonl":
            return [CalibrationText(line, False) for line in lines if line.strip()]
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{where} line {n}: not JSON ({e.msg})") from None
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict) or not isinstance(item.get("text"), str) or not item["text"].strip():
            raise BadInput(f"{where} line {n}: expected a string or an object with a non-empty `text`")
        texts.append(CalibrationText(item["text"], bool(item.get("query", False))))
    if not texts:
        raise BadInput(f"{where}: no calibration texts")
    return texts


def dataset_name(path: Path | None) -> str:
    return CALIBRATION if path is None else Path(path).name


# --- collection ----------------------------------------------------------------------------------
class _Tensor(ctypes.Structure):
    """struct ggml_tensor of the vendored ggml (ggml/include/ggml.h, GGML_MAX_DIMS 4, GGML_MAX_SRC 10)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


def _ggml_op(name: bytes) -> int:
    op_name = _ggml.libggml.ggml_op_name
    op_name.restype, op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    return next(i for i in range(256) if op_name(i) == name)


def _weight_name(raw: bytes) -> str:
    """The weight's own name: a copy on another backend is named `CPU#blk.0.attn_q.weight#0`."""
    name = raw.decode("utf-8", "replace")
    return name.split("#")[1] if "#" in name else name


class _Collector:
    """The cb_eval callback: says yes to each MUL_MAT of a layer weight on F32 inputs, then adds its inputs."""

    def __init__(self, into: Imatrix) -> None:
        self.into = into
        self.mul_mat = _ggml_op(b"MUL_MAT")
        self.tensor_get = _ggml.libggml.ggml_backend_tensor_get
        self.tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
        self.callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_tensor)
        # The last input read: attn_q, attn_k and attn_v (ffn_gate and ffn_up) multiply the same one, one after
        # the other; keyed by the input's address, name and shape, which the next different input replaces.
        self._last: tuple[tuple, np.ndarray, int] | None = None

    def _on_tensor(self, t_ptr: int, ask: bool, _user: int) -> bool:
        t = _Tensor.from_address(t_ptr)
        if t.op != self.mul_mat or not t.src[0] or not t.src[1]:
            return False
        src0, src1 = _Tensor.from_address(t.src[0]), _Tensor.from_address(t.src[1])
        name = _weight_name(src0.name)
        if not name.startswith("blk.") or src1.type != gguf.GGMLQuantizationType.F32:
            return False
        if ask:
            return True
        ne, nb = list(src1.ne), list(src1.nb)
        key = (t.src[1], src1.data, bytes(src1.name), tuple(ne), tuple(nb))
        if self._last is None or self._last[0] != key:
            extent = sum((n - 1) * s for n, s in zip(ne, nb, strict=True)) + 4  # bytes a strided view spans
            buf = np.empty(extent // 4 + 1, np.float32)
            self.tensor_get(t.src[1], buf.ctypes.data, 0, extent)
            rows = np.ascontiguousarray(np.lib.stride_tricks.as_strided(buf, shape=ne[::-1], strides=nb[::-1]))
            rows = rows.reshape(-1, ne[0])
            squares = np.einsum("ij,ij->j", rows, rows, dtype=np.float64).astype(np.float32)
            self._last = (key, squares, rows.shape[0])
        self.into.add_squares(name, self._last[1], self._last[2])
        return True


def collect(
    model: Path,
    texts: list[CalibrationText],
    dataset: str = CALIBRATION,
    threads: int | None = None,
    progress: Progress = SILENT,
    gpu: tuple[int, list[float] | None] = (0, None),
) -> Imatrix:
    """Run MODEL (a GGUF, ideally F16) in embedding mode over TEXTS and return its importance matrix. GPU: layers
    to offload and their split across GPUs (the planner's), as llama-imatrix collects on a GPU: each matmul's
    input is copied to the host."""
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    imatrix = Imatrix(datasets=[dataset])
    collector = _Collector(imatrix)
    engine = Engine(model, n_threads=threads, n_gpu_layers=gpu[0], tensor_split=gpu[1])
    with engine, progress.bar("imatrix", len(texts), unit="text") as bar:
        engine.eval_callback = collector.callback
        pipeline = Pipeline(engine)
        for batch in _batches(texts):
            for query in (False, True):
                part = [t.text for t in batch if t.query == query]
                if part:
                    pipeline.embed(part, query=query)
            bar.update(len(batch))
    if not imatrix.sums:
        raise CorruptModelFile(f"{model}: no layer weight was multiplied while embedding; nothing to collect")
    imatrix.chunk_count = len(texts)
    imatrix.chunk_size = math.ceil(imatrix.tokens / len(texts))
    return imatrix


CHUNK = 512  # llama-imatrix's default context: tokens per chunk


def collect_causal_chunks(
    model: Path,
    texts: list[CalibrationText],
    dataset: str = CALIBRATION,
    chunk: int = CHUNK,
    threads: int | None = None,
    progress: Progress = SILENT,
) -> Imatrix:
    """MODEL's importance matrix as llama.cpp's `llama-imatrix` collects it (tools/imatrix/imatrix.cpp), for
    comparison with `collect`: TEXTS joined one per line, as the text file it reads, tokenized once with BOS, cut
    into CHUNK-token chunks (the remainder dropped; BOS first in each chunk where the vocabulary adds one), each
    run with causal attention, as a language model, without prompts."""
    from runner.engine import Engine

    imatrix = Imatrix(datasets=[dataset])
    collector = _Collector(imatrix)
    with Engine(model, n_threads=threads) as engine:
        tokens = engine.tokenize("\n".join(t.text for t in texts))
        n_chunks = len(tokens) // chunk
        if n_chunks < 2:
            raise BadInput(f"{dataset}: {len(tokens)} tokens; causal chunks of {chunk} need at least {2 * chunk}")
        engine.eval_callback, engine.causal = collector.callback, True
        with progress.bar("imatrix (causal chunks)", n_chunks, unit="chunk") as bar:
            for i in range(n_chunks):
                part = tokens[i * chunk : (i + 1) * chunk].copy()
                if engine.bos is not None:
                    part[0] = engine.bos
                engine.embed_tokens([part])
                bar.update(1)
    imatrix.chunk_count, imatrix.chunk_size = n_chunks, chunk
    return imatrix


def _batches(texts: list[CalibrationText]) -> Iterator[list[CalibrationText]]:
    for i in range(0, len(texts), _BATCH_TEXTS):
        yield texts[i : i + _BATCH_TEXTS]


def make(
    model: Path,
    texts: Path | None = None,
    output: Path | None = None,
    threads: int | None = None,
    progress: Progress = SILENT,
    gpu: tuple[int, list[float] | None] = (0, None),
) -> Path:
    """Collect MODEL's importance matrix over TEXTS (default: the shipped calibration set) and save it to OUTPUT
    (default: `<model stem>.imatrix.gguf` beside MODEL); returns OUTPUT."""
    started = time.perf_counter()
    importance = collect(Path(model), calibration_texts(texts), dataset_name(texts), threads, progress, gpu)
    path = save(importance, output or auto_path(Path(model)))
    seconds = time.perf_counter() - started
    progress.say(
        f"imatrix: {importance.chunk_count} texts, {importance.tokens} tokens in {seconds:.1f} s "
        f"({importance.tokens / max(seconds, 1e-9):.0f} tokens/s), {len(importance.sums)} weights -> {path}"
    )
    return path


def auto_path(model: Path) -> Path:
    """Where `--imatrix auto` keeps MODEL's importance matrix: beside it, `<stem>.imatrix.gguf`."""
    return model.with_name(f"{model.stem}.imatrix.gguf")


def for_quantize(
    choice: str,
    source: Path,
    threads: int | None = None,
    progress: Progress = SILENT,
    hardware: Hardware | None = None,
) -> Imatrix:
    """`--imatrix auto|FILE`: FILE, or SOURCE's own, collected on the shipped set unless one newer than SOURCE is
    already beside it (a new conversion of SOURCE makes it stale, so it is collected again), from the file and on
    the devices `collection_plan` chooses (HARDWARE: tests)."""
    if choice != "auto":
        return load(Path(choice))
    path = auto_path(source)
    if path.is_file() and path.stat().st_mtime >= source.stat().st_mtime:
        progress.say(f"imatrix: reusing {path}")
    else:
        model, plan = collection_source(source, threads, progress, hardware)
        make(model, output=path, threads=threads, progress=progress, gpu=_on_gpus(plan))
    return load(path)


COLLECTION_LENGTH = 512  # tokens: the shipped calibration texts are shorter


def collection_plan(source: Path, hardware: Hardware | None = None) -> tuple[str | None, Plan | None]:
    """Which file to collect SOURCE's matrix from, and where it runs: SOURCE itself (None) where the planner puts it
    whole on the GPU, or on the CPU of a machine with no GPU to use; else its Q8_0 where that goes whole on the GPU
    (an 8B model at F16 needs about 16 GiB, at Q8_0 about 9) or SOURCE does not fit at all; else SOURCE, part on
    the GPU. What collecting from the Q8_0 costs the matrix: `bench.retention --imatrix-from q8`. A type the
    planner does not size (F32, BF16, an i-quant) gives (None, None): SOURCE as it is, on the CPU."""
    from planner import plan_for
    from planner.shapes import file_quant

    try:
        own_quant = file_quant(source)
    except UserError:
        return None, None
    plans: dict[str | None, Plan] = {}
    errors: list[UserError] = []
    for quant in (None, "Q8_0") if own_quant == "F16" else (None,):
        try:
            plans[quant] = plan_for(str(source), quant, COLLECTION_LENGTH, hardware=hardware)
        except UserError as e:
            errors.append(e)
    own, q8 = plans.get(None), plans.get("Q8_0")
    if own is not None and own.chosen.fits in ("gpu", "cpu"):
        return None, own
    if q8 is not None and (own is None or q8.chosen.fits == "gpu"):
        return "Q8_0", q8
    if own is not None:
        return None, own
    raise errors[0]


def placement(model: Path, hardware: Hardware | None = None) -> tuple[int, list[float] | None]:
    """GPU layers and split for collecting from MODEL as it is (`runner imatrix -m`): the planner's placement, or
    the CPU where the planner does not size or fit it (llama.cpp then tries)."""
    from planner import plan_for

    try:
        return _on_gpus(plan_for(str(model), None, COLLECTION_LENGTH, hardware=hardware))
    except UserError:
        return 0, None


def _on_gpus(plan: Plan | None) -> tuple[int, list[float] | None]:
    """`collect`'s GPU argument from PLAN: its GPU layers and their split; none without a plan."""
    return (plan.chosen.n_gpu_layers, plan.tensor_split) if plan is not None else (0, None)


def collection_source(
    source: Path, threads: int | None = None, progress: Progress = SILENT, hardware: Hardware | None = None
) -> tuple[Path, Plan | None]:
    """`collection_plan`'s file (the Q8_0 beside SOURCE, quantized now if missing: quantizing streams tensors, so
    it needs little memory) and its plan."""
    from quantize.ladder import quantize
    from quantize.store import quant_path

    quant, plan = collection_plan(source, hardware)
    if quant is None:
        return source, plan
    q8 = quant_path(source, quant)
    progress.say(f"imatrix: {source.name} does not fit this machine as well as its Q8_0; collecting from {q8.name}")
    if not q8.is_file():
        quantize(source, [quant], threads=threads, progress=progress)
    return q8, plan


def uniform(model: Path) -> Imatrix:
    """An importance matrix that weighs every column alike, for MODEL's layer weights: what the i-quants need to
    be made at all where only their kernels' speed matters (runner calibrate's random weights), not fidelity."""
    from quantize.sizes import read_tensors

    out = Imatrix(datasets=["uniform"], chunk_count=1, chunk_size=1)
    for t in read_tensors(Path(model))[0]:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            out.sums[t.name] = np.ones((1, t.row), np.float32)
            out.counts[t.name] = np.ones(1, np.float32)
    return out


# --- the file ------------------------------------------------------------------------------------
def save(imatrix: Imatrix, path: Path) -> Path:
    """Write IMATRIX to PATH in llama.cpp's imatrix GGUF format (atomically); returns PATH."""
    path = Path(path)
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(tmp, arch="", endianess=gguf.GGUFEndian.LITTLE)
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)  # an imatrix file names no architecture
        writer.add_string(KEY_TYPE, "imatrix")
        writer.add_array(KEY_DATASETS, imatrix.datasets)
        writer.add_uint32(KEY_CHUNK_COUNT, imatrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, imatrix.chunk_size)
        for name in sorted(imatrix.sums):  # llama-imatrix's order: sorted names
            writer.add_tensor(name + SUM2, imatrix.sums[name])
            writer.add_tensor(name + COUNTS, imatrix.counts[name][:, None])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def load(path: Path) -> Imatrix:
    """Read an imatrix GGUF (ours or llama-imatrix's); a file that is not one is a BadInput naming it."""
    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise BadInput(f"--imatrix {path}: not an imatrix GGUF ({e})") from None
    fields = reader.fields
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in fields]
    if missing:
        why = f"no {', '.join(missing)}"
        raise BadInput(f"--imatrix {path}: not an imatrix GGUF ({why}); make one with `runner imatrix`")
    out = Imatrix(
        datasets=[str(v) for v in fields[KEY_DATASETS].contents()],
        chunk_count=int(fields[KEY_CHUNK_COUNT].contents()),
        chunk_size=int(fields[KEY_CHUNK_SIZE].contents()),
        file=Path(path).name,
        sha256=sha256(path),
    )
    tensors = {t.name: np.array(t.data, np.float32) for t in reader.tensors}
    for key, data in tensors.items():
        if key.endswith(SUM2):
            name = key[: -len(SUM2)]
            counts = tensors.get(name + COUNTS)
            if counts is None:
                raise BadInput(f"--imatrix {path}: {name} has sums but no counts")
            out.counts[name] = counts.reshape(-1)
            out.sums[name] = data.reshape(out.counts[name].size, -1)
    if not out.sums:
        raise BadInput(f"--imatrix {path}: holds no importance data")
    return out


def key_values(imatrix: Imatrix) -> dict[str, str | int]:
    """What a quant made with IMATRIX records of it in its GGUF: llama-quantize's keys, and the file's sha256."""
    values: dict[str, str | int] = {  # strings clipped to the 127 bytes llama.cpp's key/value overrides hold
        gguf_keys.IMATRIX_FILE: _clip(imatrix.file or "(not saved)"),
        gguf_keys.IMATRIX_DATASET: _clip(",".join(imatrix.datasets)),
        gguf_keys.IMATRIX_ENTRIES: len(imatrix.sums),
        gguf_keys.IMATRIX_CHUNKS: imatrix.chunk_count,
    }
    if imatrix.sha256:
        values[gguf_keys.IMATRIX_SHA256] = imatrix.sha256
    return values


def _clip(text: str, limit: int = 127) -> str:
    return text.encode()[:limit].decode("utf-8", "ignore")


def quantizer_entries(imatrix: Imatrix) -> ctypes.Array:
    """llama_model_imatrix_data entries, one per weight, ending in a NULL name: llama_model_quantize_params.imatrix.

    The array keeps the float arrays its entries point into (llama.cpp copies them when quantizing starts).
    """
    names = sorted(imatrix.sums)
    values = [imatrix.values(name) for name in names]
    entries = (llama_cpp.llama_model_imatrix_data * (len(names) + 1))()
    for entry, name, data in zip(entries, names, values, strict=False):
        entry.name = name.encode()
        entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entry.size = data.size
    entries.values = values
    return entries
