"""Prove the GPU path in one short run on an NVIDIA GPU machine that has no network.

    scripts/gpu-check pack                  # CPU + PyPI: .gpu-pack/ (git-ignored, <= 60 MiB), size checked
    scripts/gpu-check dry-run [--out DIR]   # CPU: every step that needs no CUDA, report from fabricated numbers
    scripts/gpu-check run --out DIR         # GPU machine, repository root, .gpu-pack carried along

The pack (`pack.py`) holds what the GPU machine lacks (it has Python 3.12, torch, transformers,
sentence-transformers, nvidia-ml-py, cmake, ninja and nvcc): llama-cpp-python's sdist trimmed to what a CUDA
build of the library needs, wheels for CPython 3.12 of every package the run needs that torch and transformers
do not surely bring, and SmolLM2-135M's real weights cut to their first layers.

`run` (`steps.py`) builds the CUDA wheel for the local GPU architecture only, installs the project without
network, runs `pytest -m gpu`, then measures, each step with its own time budget inside one deadline (9
minutes): VRAM predicted vs NVML-measured (`vram.py`), the plans for --vram 12GiB and 8GiB executed by `runner
embed --auto-quant`, tokens/s against transformers bf16 with sdpa, SmolLM2's cosines to its float32 reference,
single-sentence latency, and the fallback of an inflated --vram; what it measures runs in child processes
(`children.py`). It writes report.md (`report.py`), results.json and logs/ to --out, and stops at the first
broken step (the report says which; exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACK = REPO / ".gpu-pack"
MIB, GIB = 2**20, 2**30
LAYERS = 32  # of the Llama-3.1-8B shape, in every measurement
LENGTHS = [512, 4096]  # max lengths the VRAM is measured at
SMOLLM2_LAYERS = 4  # of 30: 39 MiB with its Q8_0 token embedding; the whole 89 MiB file would not fit the pack
TEXTS = 256
SENTENCE = "A man is eating a piece of bread."  # the README's example: a typical sentence for latency


def log(msg: str) -> None:
    print(f"gpu-check: {msg}", file=sys.stderr, flush=True)
