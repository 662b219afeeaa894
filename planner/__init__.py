"""Planning: which quant, how many layers on which GPU, how long a sequence, for a model on a machine.

Pure and llama.cpp-free (a test holds it to that): shapes (planner.shapes, from the model family classes),
GGUF sizes (quantize.sizes), the memory model (planner.memory), batching (planner.batching) and the policy
(planner.policy) are plain functions of plain data. The edges, each patched by tests: the hardware probe
(planner.hardware: GPUs, RAM, cores, whether this llama.cpp build can offload), the filesystem (GGUF headers
and the models home, read by planner.shapes and planner.disk; free space, planner.disk.volume), the Hugging
Face hub and cache (planner.disk's download listing, planner.shapes.hub_config) and this CPU's calibration
(planner.calibration).

>>> from planner import HardwareOptions, plan_for
>>> plan_for("llama-embed-nemotron-8b", options=HardwareOptions(vram="12GiB", ram="32GiB")).chosen.quant  # CUDA build
'Q8_0'
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from planner import calibration, disk
from planner.hardware import Hardware, parse_size, probe, with_overrides
from planner.policy import Plan, max_length_for, plan
from planner.shapes import file_quant, resolve_shape
from quantize import manifest
from quantize.convert import output_path
from quantize.files import models_home
from quantize.reference import Kind, ModelRef
from quantize.source import resolve
from quantize.store import on_disk


@dataclass(frozen=True)
class HardwareOptions:
    """What the user says about the machine (`--vram`, `--ram`, `--reserve`, `--cpu`) and the quant bounds."""

    vram: str | None = None  # e.g. "12GiB", or "8GiB,8GiB" for two GPUs
    ram: str | None = None
    cpu: bool = False
    reserve: str = "1GiB"  # kept back on every device
    max_quant: str | None = None
    min_quant: str | None = None
    prefer: str = "balanced"  # CPU plans: fidelity | balanced | speed (planner.policy)


def plan_for(
    model: str | ModelRef,
    quant: str | None = None,
    max_length: int | None = None,
    options: HardwareOptions | None = None,
    hardware: Hardware | None = None,
) -> Plan:
    """The plan for MODEL (quantize.reference: a GGUF file, a model directory, an HF checkpoint, a registry name
    or a hub repo id) on this machine.

    HARDWARE replaces the probe (tests, other machines); OPTIONS are applied over it either way. A GGUF
    file is one quant: only its placement is planned. The plan's `disk` says what the run will write first
    (download, F16, the chosen quant) and where; `plan.disk.check()` refuses a run that cannot fit.
    """
    ref = ModelRef.parse(model)
    shape = resolve_shape(ref)
    if ref.kind is Kind.STORE and "BF16" not in on_disk(ref.path):
        # A folder of GGUFs without their checkpoint: an F16 file cannot become the exact BF16 one.
        shape = replace(shape, dtype=None)
    if quant is None and ref.kind is Kind.GGUF:
        quant = file_quant(ref.path)
    options = options or HardwareOptions()
    reserve = parse_size(options.reserve, "--reserve")
    hw = with_overrides(hardware or probe(), options.vram, options.ram, options.cpu, reserve)
    model_max = ref.entry.max_length if ref.entry else shape.max_length
    length = max_length_for(max_length, model_max, shape.context)
    measured = calibration.load(shape, hw.cores)
    speeds = measured.predict(shape) if measured else None
    kept = {q: f["mean_cosine"] for q, f in manifest.retention(store_of(ref)).items()}
    p = plan(shape, hw, length, quant, options.max_quant, options.min_quant, options.prefer, speeds, kept)
    # A GGUF file runs as it is; else the chosen quant may still need a download, a conversion and a quantization.
    where = disk.for_run(ref, None if ref.kind is Kind.GGUF else p.chosen.quant, shape)
    return replace(p, disk=where, calibration=measured)


def store_of(ref: ModelRef) -> Path:
    """The directory that holds (or will hold) REF's GGUF files and their manifest.json."""
    if ref.kind is Kind.GGUF:
        return ref.path.parent
    if ref.kind is Kind.STORE:
        return ref.path
    if ref.kind is Kind.CHECKPOINT:  # converted into the models home, named as convert names it
        return output_path(resolve(str(ref.path)), None, "f16").parent
    return models_home() / (ref.text if ref.kind is Kind.REGISTRY else ref.text.split("/")[-1])


__all__ = ["HardwareOptions", "Plan", "plan", "plan_for", "store_of"]
