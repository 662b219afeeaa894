"""Predicted vs NVML-measured VRAM on a CUDA machine: F16, Q8_0, Q4_K_M of the Llama-3.1-8B shape, full and half
offload.

Needs a CUDA build of llama-cpp-python and nvidia-ml-py (`scripts/gpu-check run` installs both on the GPU
machine and calls this module; see the README). Alone, from the repository root:

    python -m bench.gpu_memory [--layers 32] [--max-length 512,4096] [--workdir DIR]

The files: `template` converts a random one-layer checkpoint of the 8B shape with our own converter (so
the metadata and the Llama-3 vocabulary are what `runner convert` writes), and `synthesize` stretches it to
N layers of any quant. Each tensor gets the type llama.cpp's quantizer would give it (quantize/sizes.py
replays its rules) and random blocks with small fixed scales, so 32 layers are written in seconds rather
than the minutes a 16 GB conversion plus llama.cpp's quantizer take. The weights are random: the vectors
mean nothing, the memory and the speed are those of the real shape.

Each (quant, GPU layers) runs in a child process, so the CUDA context is counted: the parent (which never
touches CUDA) reads NVML's used bytes on GPU 0 before the child starts and every 5 ms while it runs. The
child loads the model, then per max length makes the context and decodes one full-length sequence; the peak
of each phase, minus the parent's baseline, is set against planner/memory.py's prediction.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

    Tensor = tuple[str, tuple[int, ...], int, np.ndarray]  # name, numpy shape, ggml type, the bytes

GIB = 2**30
LLAMA8B = dict(hidden=4096, ffn=14336, vocab=128256)
QUANTS = ["F16", "Q8_0", "Q4_K_M"]
# Byte offsets of the f16 scale fields in each block (ggml-common.h's block_q4_0 ... block_q6_K): random
# bytes elsewhere are valid quants; scales are pinned small so activations stay finite through 32 layers.
SCALE_OFFSETS = {
    "Q4_0": (0,),
    "Q4_1": (0, 2),
    "Q5_0": (0,),
    "Q5_1": (0, 2),
    "Q8_0": (0,),
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
}
SCALE = 2.0**-10
# GGUF value types (gguf-py's GGUFValueType): the scalar formats, string, array, uint32.
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY, _U32 = 8, 9, 4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the files ------------------------------------------------------------------------------------
def template(workdir: Path) -> Path:
    """A one-layer F16 GGUF of the 8B shape, converted by quantize/convert.py from a random bf16 checkpoint."""
    from bench.convert_memory import Shape, build_checkpoint
    from quantize.convert import convert

    out = workdir / "template"
    done = sorted(out.glob("*-F16.gguf"))
    if done:
        return done[0]
    ckpt = workdir / "llama-8b-shape-1l"
    if not (ckpt / "config.json").is_file():
        build_checkpoint(ckpt, Shape(1, **LLAMA8B), "bf16", workdir)
    path = Path(convert(str(ckpt), out, "f16"))
    shutil.rmtree(ckpt)  # 1.5 GB, maybe of tmpfs
    return path


@dataclass(frozen=True)
class RawGguf:
    """A GGUF file's metadata entries as raw bytes and its tensors' places, read without decoding the vocabulary
    (gguf.GGUFReader takes ~20 s and a GB on Llama-3's); enough to copy a file with a few keys or tensors changed."""

    path: Path
    entries: dict[str, bytes]  # key -> the whole entry (key, type, value) as in the file
    tensors: dict[str, tuple[tuple[int, ...], int, int]]  # name -> (numpy shape, ggml type, absolute offset)
    values: dict[str, int | float | bool | str]  # scalars and strings
    alignment: int

    def data(self, name: str) -> np.ndarray:
        import numpy as np

        shape, qtype, offset = self.tensors[name]
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(_nbytes(shape, qtype),))


def read_raw(path: Path) -> RawGguf:
    with open(path, "rb") as f:
        buf = f.read(64 * 2**20)  # headers of our files are < 20 MB; checked below
    pos = 0

    def take(fmt: str):
        nonlocal pos
        out = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return out[0] if len(out) == 1 else out

    def string() -> str:
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n : pos].decode()

    magic, version, n_tensors, n_kv = take("4sIQQ")
    if magic != b"GGUF" or version != 3:
        raise ValueError(f"{path}: not a GGUF v3 file")
    entries, values = {}, {}
    for _ in range(n_kv):
        start = pos
        key = string()
        vtype = take("I")
        if vtype == _ARRAY:
            etype, count = take("IQ")
            if etype == _STRING:
                for _ in range(count):
                    n = take("Q")  # not `pos += take(...)`: take() moves pos itself
                    pos += n
            else:
                pos += struct.calcsize("<" + _SCALARS[etype]) * count
        elif vtype == _STRING:
            values[key] = string()
        else:
            values[key] = take(_SCALARS[vtype])
        entries[key] = buf[start:pos]
    infos = []
    for _ in range(n_tensors):
        name = string()
        dims = [take("Q") for _ in range(take("I"))]
        qtype, offset = take("IQ")
        infos.append((name, tuple(reversed(dims)), qtype, offset))
    if pos >= len(buf):
        raise ValueError(f"{path}: header over {len(buf)} bytes")
    alignment = int(values.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    tensors = {name: (shape, qtype, data_start + offset) for name, shape, qtype, offset in infos}
    return RawGguf(Path(path), entries, tensors, values, alignment)


def write_raw(dest: Path, entries: Sequence[bytes], tensors: Sequence[Tensor]) -> Path:
    """A GGUF v3 file of ENTRIES (raw metadata entries) and TENSORS (name, numpy shape, ggml type, uint8 data),
    written under a temporary name and renamed when complete. Data is aligned to 32 bytes (general.alignment unset)."""
    align = 32
    info = b""
    offset = 0
    for name, shape, qtype, data in tensors:
        if data.nbytes != _nbytes(shape, qtype):
            raise ValueError(f"{name}: {data.nbytes} bytes of data for {_nbytes(shape, qtype)}")
        info += _string(name) + struct.pack("<I", len(shape)) + struct.pack(f"<{len(shape)}Q", *reversed(shape))
        info += struct.pack("<IQ", qtype, offset)
        offset += -(-data.nbytes // align) * align
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(entries)) + b"".join(entries) + info
    tmp = dest.with_name(dest.name + ".partial")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as f:
        f.write(head + bytes(-len(head) % align))
        for *_, data in tensors:
            f.write(memoryview(data))
            f.write(bytes(-data.nbytes % align))
    tmp.rename(dest)
    return dest


def _string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def u32_entry(key: str, value: int) -> bytes:
    return _string(key) + struct.pack("<II", _U32, value)


def str_entry(key: str, value: str) -> bytes:
    return _string(key) + struct.pack("<I", _STRING) + _string(value)


def synthesize(source: Path, layers: int, quant: str, dest: Path) -> Path:
    """SOURCE (a one-layer F16 GGUF) stretched to LAYERS copies of its layer, as QUANT, written to DEST.

    Metadata is copied with block_count and file_type changed; F16/F32 tensors keep the source's data (layer 0's
    for every layer); quantized tensors are random blocks of their type.
    """
    import gguf
    import numpy as np

    from quantize.sizes import TensorSpec, tensor_types

    raw = read_raw(source)
    arch = str(raw.values["general.architecture"])
    heads, kv_heads = (int(raw.values[f"{arch}.attention.{k}"]) for k in ("head_count", "head_count_kv"))

    def origin(name: str) -> str:
        parts = name.split(".")
        return ".".join(["blk", "0", *parts[2:]]) if parts[0] == "blk" else name

    names = [n for n in raw.tensors if not n.startswith("blk.")]
    names += [f"blk.{i}.{n.split('.', 2)[2]}" for i in range(layers) for n in raw.tensors if n.startswith("blk.0.")]
    Q = gguf.GGMLQuantizationType
    specs = [TensorSpec(n, raw.tensors[origin(n)][0], Q(raw.tensors[origin(n)][1])) for n in names]
    types = tensor_types(specs, quant, layers, heads // kv_heads)

    rng = np.random.default_rng(0)
    pools: dict = {}
    for spec in specs:  # one random buffer per quantized type, as big as its largest tensor; tensors are slices
        qtype = types[spec.name]
        if qtype.name in SCALE_OFFSETS:
            need = _nbytes(spec.shape, qtype)
            if qtype not in pools or pools[qtype].size < need:
                pools[qtype] = _random_blocks(qtype, need, rng)
    plan = []
    for spec in sorted(specs, key=lambda s: _natural_key(s.name)):
        qtype = types[spec.name]
        if qtype.name in SCALE_OFFSETS:
            data = pools[qtype][: _nbytes(spec.shape, qtype)]
        elif qtype == spec.type:
            data = raw.data(origin(spec.name))
        else:
            raise ValueError(f"{spec.name}: no data for {qtype.name} from a {spec.type.name} source")
        plan.append((spec.name, spec.shape, int(qtype), data))
    ftype = gguf.LlamaFileType.MOSTLY_F16 if quant == "F16" else gguf.LlamaFileType[f"MOSTLY_{quant}"]
    changed = {
        f"{arch}.block_count": u32_entry(f"{arch}.block_count", layers),
        "general.file_type": u32_entry("general.file_type", int(ftype)),
        "general.name": str_entry("general.name", dest.stem.removesuffix(f"-{quant}")),  # not the template's
    }
    entries = [changed.pop(k, v) for k, v in raw.entries.items()] + list(changed.values())
    return write_raw(dest, entries, plan)


def cut_layers(source: Path, layers: int, dest: Path) -> Path:
    """SOURCE with only its first LAYERS layers (real weights kept byte for byte), written to DEST."""
    raw = read_raw(source)
    key = f"{raw.values['general.architecture']}.block_count"
    entries = [u32_entry(key, layers) if k == key else v for k, v in raw.entries.items()]
    kept = [n for n in raw.tensors if not n.startswith("blk.") or int(n.split(".")[1]) < layers]
    return write_raw(dest, entries, [(n, raw.tensors[n][0], raw.tensors[n][1], raw.data(n)) for n in kept])


def _nbytes(shape: Sequence[int], qtype: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(qtype)]
    n = 1
    for d in shape:
        n *= d
    return n // block * size


def _random_blocks(qtype, nbytes: int, rng):
    import gguf
    import numpy as np

    size = gguf.GGML_QUANT_SIZES[qtype][1]
    data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    blocks = data.reshape(-1, size)
    scale = np.frombuffer(np.float16(SCALE).tobytes(), dtype=np.uint8)
    for offset in SCALE_OFFSETS[qtype.name]:
        blocks[:, offset : offset + 2] = scale
    return data


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def model_files(workdir: Path, layers: int, quants: Sequence[str], source: Path | None = None) -> dict[str, Path]:
    """{quant: `<dir>/llama-8b-shape-<L>l-<QUANT>.gguf`}, each synthesized once from the template."""
    directory = workdir / f"llama-8b-shape-{layers}l"
    files = {q: directory / f"llama-8b-shape-{layers}l-{q}.gguf" for q in quants}
    missing = [q for q, p in files.items() if not p.is_file()]
    if missing:
        source = source or template(workdir)
        for q in missing:
            t0 = time.perf_counter()
            synthesize(source, layers, q, files[q])
            log(f"wrote {files[q].name}: {files[q].stat().st_size / GIB:.2f} GiB in {time.perf_counter() - t0:.1f} s")
    return files


# --- measuring --------------------------------------------------------------------------------------
class Nvml:
    """NVML's used bytes on one GPU: a baseline, and the peak per phase while something runs."""

    def __init__(self, index: int = 0) -> None:
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def used(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).used)

    def total(self) -> int:
        return int(self._nvml.nvmlDeviceGetMemoryInfo(self._handle).total)

    def close(self) -> None:
        self._nvml.nvmlShutdown()


@dataclass
class PhaseSampler:
    """Polls NVML every INTERVAL seconds in a thread; the peak is kept per phase (set by whoever reads the child)."""

    nvml: Nvml
    interval: float = 0.005
    phase: str = "run"
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> PhaseSampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self.nvml.used()
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), used)
            self._stop.wait(self.interval)

    @property
    def peak(self) -> int:
        return max(self.peaks.values(), default=0)


def run_child(
    cmd: list[str], nvml: Nvml, timeout: float, log_file: Path, env: dict[str, str] | None = None
) -> tuple[dict, dict[str, int]]:
    """Run CMD, sampling NVML; the child may print `phase NAME` lines to start a phase and `result JSON` at the end.

    Returns (the child's result, {phase: peak bytes over the baseline taken before the child started}); the
    phase before any `phase` line is "run". Its stderr is appended to LOG_FILE. A non-zero exit raises.
    """
    baseline = nvml.used()
    result: dict = {}
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "a") as err, PhaseSampler(nvml) as sampler:
        err.write(f"$ {' '.join(cmd)}\n")
        err.flush()
        # Its own process group, so a timeout ends what it started too.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, start_new_session=True)
        timer = threading.Timer(timeout, os.killpg, (proc.pid, signal.SIGKILL))
        timer.start()
        try:
            for line in proc.stdout or ():
                kind, _, rest = line.strip().partition(" ")
                if kind == "phase":
                    sampler.phase = rest
                elif kind == "result":
                    result = json.loads(rest)
            rc = proc.wait()
        finally:
            timer.cancel()
    if rc != 0:
        killed = " (killed: over its time)" if rc == -9 else " (aborted)" if rc in (-6, 134) else ""
        raise ChildFailed(rc, f"`{' '.join(cmd[2:8])} ...` exited {rc}{killed}; see {log_file.name}")
    return result, {p: max(0, v - baseline) for p, v in sampler.peaks.items()}


class ChildFailed(RuntimeError):
    def __init__(self, rc: int, message: str) -> None:
        super().__init__(message)
        self.rc = rc


def child(path: Path, gpu_layers: int, lengths: Sequence[int]) -> None:
    """In the child: load PATH with GPU_LAYERS, then per length make the context and decode one full sequence."""
    import numpy as np

    from planner.memory import Settings, needs
    from planner.shapes import file_quant, from_gguf
    from runner.engine import Engine

    shape = from_gguf(path)
    quant = file_quant(path)
    rows = []
    print(f"phase {lengths[0]}", flush=True)
    with Engine(path, n_gpu_layers=gpu_layers) as engine:
        for i, length in enumerate(lengths):
            if i:
                print(f"phase {length}", flush=True)
            engine.reserve(length)
            t0 = time.perf_counter()
            engine.embed_tokens([np.full(length, 1000, dtype=np.int32)])
            predicted = needs(shape, quant, Settings(length), (gpu_layers,))
            rows.append(
                dict(
                    quant=quant,
                    gpu_layers=gpu_layers,
                    layers=shape.layers,
                    max_length=length,
                    predicted_gpu=predicted.gpu_total,
                    predicted_ram=predicted.ram,
                    decode_s=time.perf_counter() - t0,
                )
            )
    print("result " + json.dumps({"rows": rows}), flush=True)


@dataclass(frozen=True)
class VramRow:
    quant: str
    gpu_layers: int
    layers: int
    max_length: int
    predicted_gpu: int
    measured_gpu: int  # NVML peak of the phase over the baseline before the child started

    @property
    def ratio(self) -> float:
        return self.predicted_gpu / self.measured_gpu if self.measured_gpu else float("nan")


def measure(
    files: dict[str, Path],
    layers: int,
    lengths: Sequence[int],
    nvml: Nvml,
    log_file: Path,
    timeout: float = 600.0,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
) -> list[VramRow]:
    """Every quant at full and half offload, each in a child process, each length a phase of it; all within TIMEOUT."""
    end = time.monotonic() + timeout
    rows = []
    for quant, path in files.items():
        for gpu_layers in (layers, layers // 2):
            cmd = [python, "-m", "bench.gpu_memory", "--child", str(path), "--gpu-layers", str(gpu_layers)]
            cmd += ["--max-length", ",".join(map(str, lengths))]
            result, peaks = run_child(cmd, nvml, end - time.monotonic(), log_file, env)
            for r in result["rows"]:
                measured = peaks.get(str(r["max_length"]), 0)
                rows.append(VramRow(quant, gpu_layers, r["layers"], r["max_length"], r["predicted_gpu"], measured))
                log(markdown_rows([rows[-1]]))
    return rows


def markdown_rows(rows: Sequence[VramRow]) -> str:
    return "\n".join(
        f"| {r.quant} | {r.gpu_layers}/{r.layers} | {r.max_length} | {r.predicted_gpu / GIB:.2f} "
        f"| {r.measured_gpu / GIB:.2f} | {r.ratio:.2f} |"
        for r in rows
    )


TABLE_HEAD = (
    "| quant | GPU layers | max length | predicted GiB | measured GiB | predicted / measured |\n"
    "|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--max-length", default="512,4096", help="comma-separated")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-memory")
    p.add_argument("--prepare", metavar="QUANTS", help="only write the GGUFs of these quants (comma-separated)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--gpu-layers", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.max_length.split(",")]
    if args.child:
        child(args.child, args.gpu_layers, lengths)
        return
    if args.prepare:
        files = model_files(args.workdir, args.layers, args.prepare.split(","))
        print(json.dumps({q: str(p) for q, p in files.items()}))
        return
    files = model_files(args.workdir, args.layers, QUANTS)
    nvml = Nvml()
    try:
        rows = measure(files, args.layers, lengths, nvml, args.workdir / "gpu-memory.log")
    finally:
        nvml.close()
    print(TABLE_HEAD)
    print(markdown_rows(rows))
    print(json.dumps([asdict(r) for r in rows]))


if __name__ == "__main__":
    main()
