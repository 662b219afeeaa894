"""GPU memory as NVML sees it: a baseline, the peak per phase while a child process runs, and the VRAM
predicted by planner/memory.py against the measured peak.

Each (quant, GPU layers) runs in a child process (`children.vram`), so the CUDA context is counted: the parent
(which never touches CUDA) reads NVML's used bytes on GPU 0 before the child starts and every 5 ms while it runs.
The child loads the model, then per max length makes the context and decodes one full-length sequence; the peak
of each phase, minus the parent's baseline, is set against the prediction.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tools.gpu_check import GIB, log


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
            cmd = [python, "-m", "tools.gpu_check", "child", "vram", str(path), "--gpu-layers", str(gpu_layers)]
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
