"""What this machine has: each NVIDIA GPU's free memory (NVML, else nvidia-smi), free RAM, cores.

User overrides (`--vram 12GiB`, `--vram 8GiB,8GiB`, `--ram 16GiB`, `--cpu`) replace what the probe
finds, so plans can be made for other machines and tests can fabricate hardware.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field, replace

import psutil

from quantize.errors import BadInput

UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20}
UNITS |= {"g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
MAX_SIZE = 2**50  # 1 PiB: more memory than any one machine has, and far inside what the arithmetic holds
# What a plan says when GPUs are there (probed or --vram) but llama.cpp cannot put layers on them.
NO_OFFLOAD = (
    "this llama-cpp-python build cannot offload to a GPU (built for the CPU only, or it sees no GPU); "
    'for NVIDIA GPUs rebuild it with CMAKE_ARGS="-DGGML_CUDA=on" scripts/install'
)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    total: int
    free: int
    compute_capability: str = "?"


@dataclass(frozen=True)
class Hardware:
    gpus: tuple[Gpu, ...]
    ram_free: int
    ram_total: int
    cores: int
    offload: bool  # this llama-cpp-python build can put layers on a GPU
    source: str = "probe"
    notes: tuple[str, ...] = field(default_factory=tuple)
    # This llama.cpp build keeps no logits in embedding mode (scripts/install's; a stock build does keep them).
    embeddings_only: bool = False

    def usable_gpus(self) -> tuple[Gpu, ...]:
        return tuple(g for g in self.gpus if g.free > 0) if self.offload else ()

    def as_json(self) -> dict:
        return {
            "gpus": [g.__dict__ for g in self.gpus],
            "ram_free": self.ram_free,
            "ram_total": self.ram_total,
            "cores": self.cores,
            "gpu_offload_supported": self.offload,
            "engine_embeddings_only": self.embeddings_only,
            "source": self.source,
            "notes": list(self.notes),
        }


def parse_size(text: str, option: str) -> int:
    """'12GiB', '12G' (GiB), '16GB', '512MiB', '0' -> bytes, at most MAX_SIZE; else a one-line error naming
    OPTION."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if not m or m.group(2).lower() not in UNITS:
        raise BadInput(f"{option} {text!r}: not a size; write e.g. 12GiB, 16GB or 512MiB")
    size = float(m.group(1)) * UNITS[m.group(2).lower()]  # inf for a number with hundreds of digits
    if size > MAX_SIZE:
        raise BadInput(f"{option} {text[:40]!r}: more than 1 PiB; write the memory to plan for, e.g. 12GiB")
    return int(size)


def usable_cores() -> int:
    """Physical cores this process may run on: a CPU set (taskset, a container's --cpuset-cpus) can hold fewer
    than the machine has, and llama.cpp's threads spin at their barriers, so one thread more than the cores
    there are costs far more than it brings."""
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # Linux
        cores = min(cores, len(os.sched_getaffinity(0)) or cores)
    return cores


def probe() -> Hardware:
    mem = psutil.virtual_memory()
    cores = usable_cores()
    gpus, notes = _nvml()
    if gpus is None:
        gpus, more = _nvidia_smi()
        notes += more
    hw = Hardware(tuple(gpus or ()), int(mem.available), int(mem.total), cores, _offload_supported(), "probe", notes)
    return replace(hw, embeddings_only=_embeddings_only())


def with_overrides(
    hw: Hardware, vram: str | None = None, ram: str | None = None, cpu: bool = False, reserve: int = 0
) -> Hardware:
    """HW with the user's --vram/--ram/--cpu applied and RESERVE bytes kept back on every device.

    --vram says how much memory the GPUs have, not what this llama.cpp build can do: HW's `offload` stays.
    """
    if vram is not None:
        sizes = [parse_size(part, "--vram") for part in vram.split(",")]
        gpus = tuple(Gpu(i, "as given (--vram)", s, s) for i, s in enumerate(sizes))
        hw = replace(hw, gpus=gpus, source="override")
    if ram is not None:
        size = parse_size(ram, "--ram")
        hw = replace(hw, ram_free=size, ram_total=max(size, hw.ram_total), source="override")
    if cpu:
        hw = replace(hw, gpus=())
    if reserve:
        gpus = tuple(replace(g, free=max(0, g.free - reserve)) for g in hw.gpus)
        hw = replace(hw, gpus=gpus, ram_free=max(0, hw.ram_free - reserve))
    return hw


def _offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend with a device (asked without loading a model)."""
    import llama_cpp  # only here: the rest of the planner never loads llama.cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def _embeddings_only() -> bool:
    """Whether this llama.cpp build takes embeddings_only (scripts/engine-patches/), asked without a model."""
    from quantize import llamacpp

    return llamacpp.embeddings_only()


def _nvml() -> tuple[list[Gpu] | None, tuple[str, ...]]:
    """GPUs through NVML; None when NVML itself is unavailable (library or driver missing)."""
    try:
        import pynvml
    except ImportError:
        return None, ("nvidia-ml-py is not installed",)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, (f"NVML unavailable ({e})",)
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            name = pynvml.nvmlDeviceGetName(h)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
            name = name.decode() if isinstance(name, bytes) else name
            gpus.append(Gpu(i, name, int(mem.total), int(mem.free), f"{major}.{minor}"))
        return gpus, ()
    except pynvml.NVMLError as e:
        return None, (f"NVML error ({e})",)
    finally:
        pynvml.nvmlShutdown()


def _nvidia_smi() -> tuple[list[Gpu], tuple[str, ...]]:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return [], ("no nvidia-smi: no NVIDIA GPU",)
    query = "--query-gpu=index,name,memory.total,memory.free,compute_cap"
    try:
        out = subprocess.run([exe, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], (f"nvidia-smi failed ({e})",)
    if out.returncode != 0:
        return [], (f"nvidia-smi failed ({out.stderr.strip() or out.returncode}): no usable GPU",)
    return parse_nvidia_smi(out.stdout), ()


def parse_nvidia_smi(text: str) -> list[Gpu]:
    """Rows of `index, name, total MiB, free MiB, compute capability`."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 4 and parts[2].isdigit() and parts[3].isdigit():
            cc = parts[4] if len(parts) > 4 else "?"
            gpus.append(Gpu(int(parts[0]), parts[1], int(parts[2]) * 2**20, int(parts[3]) * 2**20, cc))
    return gpus
