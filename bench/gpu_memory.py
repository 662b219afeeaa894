"""Predicted vs NVML-measured VRAM on a CUDA machine: F16, Q8_0, Q4_K_M of the Llama-3.1-8B shape, full and half
offload.

Needs a CUDA build of llama-cpp-python and nvidia-ml-py; `scripts/gpu-check run` installs both on a GPU machine
without network and takes this measurement as one of its steps (see the README). Alone, from the repository root:

    python -m bench.gpu_memory [--layers 32] [--max-length 512,4096] [--workdir DIR]

The files are tests/synth.py's `model_files`: random GGUFs of the real shape, written from a one-layer conversion
by our converter with each tensor of the type llama.cpp's quantizer gives it. The measurement is
tools/gpu_check/vram.py's: each (quant, GPU layers) in a child process, NVML's peak over the baseline per max
length, against planner/memory.py's prediction.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from tests.synth import model_files
from tools.gpu_check.vram import TABLE_HEAD, Nvml, markdown_rows, measure

QUANTS = ["F16", "Q8_0", "Q4_K_M"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--max-length", default="512,4096", help="comma-separated")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-memory")
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.max_length.split(",")]
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
