"""The few process-wide facts about the llama.cpp bindings: quiet logging and this build's CPU features."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Callable, Iterator

import llama_cpp

from quantize.errors import BadInput

_LOG_LEVEL_INFO = 2
_LOG_LEVEL_WARN = 3
MAX_THREADS = 512  # GGML_MAX_N_THREADS
_log_lines: list[str] = []
_buffer_lines: list[str] = []
_listeners: list[Callable[[str], None]] = []


@llama_cpp.llama_log_callback
def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp logs every tensor at load; keep warnings and errors, to be quoted when something fails.
    if level in (_LOG_LEVEL_WARN, _LOG_LEVEL_WARN + 1):
        _log_lines.append(text.decode("utf-8", "replace").rstrip())
        del _log_lines[:-20]
    elif b"buffer size =" in text:  # what each context allocates, for checking runner/memory.py
        _buffer_lines.append(text.decode("utf-8", "replace").strip())
        del _buffer_lines[:-50]
    elif level == _LOG_LEVEL_INFO and _listeners:  # the quantizer's per-tensor lines, for its progress bar
        _listeners[-1](text.decode("utf-8", "replace"))


@contextlib.contextmanager
def listening(callback: Callable[[str], None]) -> Iterator[None]:
    """Hand llama.cpp's info messages (fragments, as logged) to CALLBACK while the block runs."""
    _listeners.append(callback)
    try:
        yield
    finally:
        _listeners.remove(callback)


@functools.cache
def init() -> None:
    """Route llama.cpp's logging through _log and initialise its backends (once per process)."""
    llama_cpp.llama_log_set(_log, ctypes.c_void_p())
    llama_cpp.llama_backend_init()


def buffer_sizes() -> dict[str, float]:
    """MiB of the buffers llama.cpp reported for the latest model and context ('CPU compute', 'CPU KV', ...)."""
    out = {}
    for line in _buffer_lines:
        head, _, size = line.rpartition("buffer size =")
        label = " ".join(head.split(":", 1)[-1].split())
        out[label] = float(size.split()[0])
    return out


def thread_count(threads: int | None, default: int) -> int:
    """THREADS (default DEFAULT), refused outside 1 .. this machine's logical CPUs: more threads only slow
    llama.cpp down, and past its 512 (GGML_MAX_N_THREADS) the process crashed (`--threads 100000`: exit 139)."""
    most = min(os.cpu_count() or 1, MAX_THREADS)
    if threads is None:
        return max(1, min(default, most))
    if not 1 <= threads <= most:
        raise BadInput(f"--threads {threads}: must be between 1 and {most} (the logical CPUs here)")
    return threads


def last_error() -> str:
    return _log_lines[-1] if _log_lines else "no message from llama.cpp"


@functools.cache
def system_info() -> dict[str, str]:
    """llama.cpp's feature report (`AVX512 = 1 | AMX_INT8 = 1 | ...`) as a dict."""
    text = llama_cpp.llama_print_system_info().decode()
    pairs = (part.split("=", 1) for part in text.replace("CPU :", "|").split("|") if "=" in part)
    return {k.strip(): v.strip() for k, v in pairs}


def embeddings_only() -> bool:
    """True when this build takes llama_context_params.embeddings_only (scripts/engine-patches/): its embedding
    contexts reserve no logits and run no LM head. A stock llama-cpp-python reserves logits for every token
    and runs the qwen2/qwen3 LM head in embedding mode too (planner.memory counts either)."""
    return hasattr(llama_cpp.llama_context_params, "embeddings_only")


def has_amx_kernels() -> bool:
    """True when this build compiled ggml's AMX matmul (which crashed on these machines' CPUs)."""
    return system_info().get("AMX_INT8") == "1"
