"""This CPU's embedding speed per quant, as `runner calibrate` measured it: the cache the planner reads.

Kernel speed per quant type depends on the CPU (AVX2, AVX-512, VNNI, AMX, which K-quants llama.cpp
repacks), so no fixed ranking is right everywhere: on one 2-core EPYC F16 was the fastest quant on the 8B
layer shape, on another Q6_K was 1.9x faster than F16. A calibration is valid for one CPU model, its ISA
flags, a thread count, a llama.cpp build and one layer shape (hidden, FFN, heads, KV heads); it times
CALIBRATED_LAYERS layers, and a model's speed is predicted by scaling with its layer count (the layers are
nearly all of the work).

Pure: reads /proc/cpuinfo and package metadata, never loads llama.cpp.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib import metadata
from pathlib import Path

from planner.shapes import ModelShape
from quantize.files import models_home, write_text_atomic
from quantize.gguf_check import MAX_LAYERS
from quantize.quants import SIZED

log = logging.getLogger("runner")

CALIBRATED_LAYERS = 2  # with 2 layers, Q4_K_M/Q5_K_M's "more bits" layers are 1 in 2, as in 32-layer models
# The ISA features that pick llama.cpp's CPU kernels; other flags do not change which code runs.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "asimd", "sve", "i8mm")  # fmt: skip
# The ISA flags of BF16 units, which llama.cpp's BF16 kernels use (AVX512-BF16's dot products, AMX's tiles).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# Tokens/s over the timed layers above which a cache entry is not a measurement: CPUs manage thousands.
MAX_TOKENS_PER_S = 1e9
# The most a quant's repeats may disagree ((fastest - slowest) / median) for a calibration to be cached: on a
# quiet 2-core machine repeats agree within a few percent; under a load average of 6-8 they differed by 2x and
# flipped plans. The ranking of the quants, which is what a plan uses, is trusted to about this much.
MAX_SPREAD = 0.15


def cache_file() -> Path:
    return models_home() / "calibration.json"


def cpu_identity(threads: int) -> dict[str, object]:
    """What a calibration is valid for: CPU model, its kernel-relevant ISA flags, threads, llama.cpp version."""
    fields: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())  # the first processor's
    model = fields.get("model name") or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    try:
        version = metadata.version("llama_cpp_python")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "cpu": model,
        "isa": sorted(f for f in ISA_FLAGS if f in flags),
        "threads": threads,
        "llama_cpp_python": version,
    }


def has_bf16_units(identity: dict[str, object]) -> bool:
    """Whether the CPU a calibration identity describes (cpu_identity) has BF16 units: where BF16 is worth timing."""
    isa = identity.get("isa")
    return isinstance(isa, list) and any(f in isa for f in BF16_FLAGS)


def layer_shape(shape: ModelShape) -> dict[str, int]:
    return {"hidden": shape.hidden, "ffn": shape.ffn, "heads": shape.heads, "kv_heads": shape.kv_heads}


def _entry_key(identity: dict, layer: dict) -> str:
    return json.dumps({"machine": identity, "layer": layer}, sort_keys=True)


@dataclass(frozen=True)
class Calibration:
    identity: dict[str, object]
    layer: dict[str, int]
    layers: int  # how many layers were timed
    tokens_per_s: dict[str, float]  # quant -> tokens/s over `layers` layers (the median of its repeats)
    spread: dict[str, float] = field(default_factory=dict)  # quant -> (fastest - slowest) / median of its repeats
    measured_at: str | None = None  # ISO 8601 with its offset; None: a cache written before times were recorded
    load_average: float | None = None  # the 1-minute load average, the highest seen while timing

    def predict(self, shape: ModelShape) -> dict[str, float]:
        """Tokens/s per quant for SHAPE's full depth: the same layers, scaled by how many there are."""
        return {q: tps * self.layers / shape.layers for q, tps in self.tokens_per_s.items()}

    @property
    def worst_spread(self) -> float | None:
        return max(self.spread.values()) if self.spread else None

    def steady(self) -> bool:
        """Whether every quant's repeats agree within MAX_SPREAD (the condition to cache it)."""
        return self.worst_spread is not None and self.worst_spread <= MAX_SPREAD

    def taken(self) -> dict[str, object]:
        """When and under what load it was measured, and how far its repeats disagreed (`runner plan --json`)."""
        return {"measured_at": self.measured_at, "load_average": self.load_average, "cores": self.identity["threads"],
                "spread": self.worst_spread}  # fmt: skip

    def describe(self) -> str:
        """One line for `runner plan`: when, under what load, how steady."""
        if self.measured_at is None:
            return "calibrated at an unrecorded time (`runner calibrate` again records when and under what load)"
        when = datetime.fromisoformat(self.measured_at).strftime("%Y-%m-%d %H:%M %Z").strip()
        load = "load unknown" if self.load_average is None else f"load average {self.load_average:.1f}"
        load += f" (timed with {self.identity['threads']} threads)"
        spread = f"repeats within {self.worst_spread:.0%}" if self.worst_spread is not None else "one repeat each"
        return f"calibrated {when}, {load}, {spread}"


def load(shape: ModelShape, threads: int, path: Path | None = None) -> Calibration | None:
    """The calibration for SHAPE's layer on this CPU at THREADS threads, or None when there is none.

    The cache is a plain file in the models home, which may be edited by hand or copied from elsewhere: an
    entry that is not a plausible measurement is ignored with one warning, never planned with.
    """
    path = path or cache_file()
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as e:
        log.warning("%s is not a readable calibration cache (%s); ignored", path, str(e)[:80])
        return None
    identity, layer = cpu_identity(threads), layer_shape(shape)
    found = entries.get(_entry_key(identity, layer)) if isinstance(entries, dict) else None
    if found is None:
        return None
    try:
        layers, speeds = _checked(found)
        spread, measured_at, load_average = _checked_conditions(found)
    except ValueError as e:
        log.warning(
            "%s: the entry for this CPU and layer shape is not a measurement (%s); ignored: "
            "`runner calibrate -m MODEL` measures it again",
            path,
            e,
        )
        return None
    return Calibration(identity, layer, layers, speeds, spread, measured_at, load_average)


def _checked_conditions(entry: dict) -> tuple[dict[str, float], str | None, float | None]:
    """An entry's spread per quant, time and load average (absent in caches written before they were recorded),
    or a ValueError saying what is wrong."""
    spread = entry.get("spread", {})
    if not isinstance(spread, dict) or not all(
        q in SIZED and _number(v) and 0 <= v <= MAX_TOKENS_PER_S for q, v in spread.items()
    ):
        raise ValueError("spread is not a table of quants to fractions")
    measured_at = entry.get("measured_at")
    if measured_at is not None:
        try:
            if not isinstance(measured_at, str) or datetime.fromisoformat(measured_at).tzinfo is None:
                raise ValueError
        except ValueError:
            raise ValueError(f"measured_at {str(measured_at)[:30]!r} is not a time with its offset") from None
    load_average = entry.get("load_average")
    if load_average is not None and not (_number(load_average) and 0 <= load_average < 1e6):
        raise ValueError(f"load_average {str(load_average)[:20]!r} is not a load average")
    return {q: float(v) for q, v in spread.items()}, measured_at, load_average


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _checked(entry: object) -> tuple[int, dict[str, float]]:
    """An entry's timed layer count and tokens/s per quant, or a ValueError saying what is wrong."""
    if not isinstance(entry, dict) or not isinstance(entry.get("tokens_per_s"), dict):
        raise ValueError("no tokens_per_s table")
    layers = entry.get("layers")
    if not isinstance(layers, int) or isinstance(layers, bool) or not 1 <= layers <= MAX_LAYERS:
        raise ValueError(f"layers {str(layers)[:20]!r} is not a whole number from 1 to {MAX_LAYERS}")
    speeds = {}
    for quant, rate in entry["tokens_per_s"].items():
        if quant not in SIZED:
            raise ValueError(f"{quant[:20]!r} is not a quant")
        if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 < rate <= MAX_TOKENS_PER_S:
            raise ValueError(f"{quant} at {str(rate)[:20]} tokens/s is not above 0 and at most {MAX_TOKENS_PER_S:g}")
        speeds[quant] = float(rate)
    return layers, speeds


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def save(calibration: Calibration, path: Path | None = None) -> Path:
    """Add CALIBRATION to the cache (read-modify-write under a lock, so concurrent runs keep each other's)."""
    path = path or cache_file()
    with _locked(path):
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError):
            entries = {}
        if not isinstance(entries, dict):  # a cache that is not a table is replaced, not crashed on
            entries = {}
        entries[_entry_key(calibration.identity, calibration.layer)] = {
            "identity": calibration.identity,
            "layer": calibration.layer,
            "layers": calibration.layers,
            "tokens_per_s": calibration.tokens_per_s,
            "spread": calibration.spread,
            "measured_at": calibration.measured_at,
            "load_average": calibration.load_average,
        }
        write_text_atomic(path, json.dumps(entries, indent=2, sort_keys=True) + "\n")
    return path
