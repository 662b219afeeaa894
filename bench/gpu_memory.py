"""Predicted vs actual VRAM on a CUDA machine: F16, Q8_0, Q4_K_M of an 8B-shaped random model, full and half offload.

Needs a CUDA build of llama-cpp-python (on the GPU machine, from the repository root):

    CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" pip install --no-binary :all: llama-cpp-python==0.3.36
    pip install -e . nvidia-ml-py torch==2.13.0 safetensors
    python -m bench.gpu_memory [--layers 32] [--max-length 4096] [--workdir DIR]

For each quant and offload (all layers, half the layers): NVML's used memory on GPU 0 before loading and
after the model is loaded, the context made for --max-length and one full-length decode run, against
runner/memory.py's prediction for the same placement. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.convert_memory import llama8b_ggufs
from runner.engine import Engine
from runner.memory import Settings, needs
from runner.shapes import from_gguf

GIB = 2**30


def used_bytes() -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    finally:
        pynvml.nvmlShutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "gpu-memory")
    args = p.parse_args()
    work = args.workdir
    files = llama8b_ggufs(work, args.layers, ["F16", "Q8_0", "Q4_K_M"])
    f16 = files["F16"]
    shape, s = from_gguf(f16), Settings(args.max_length)
    seq = [np.full(args.max_length, 1000, dtype=np.int32)]
    print(f"| quant | GPU layers | predicted GiB | measured GiB | ratio |  (max length {args.max_length})")
    print("|---|---|---|---|---|")
    for quant, path in files.items():
        for layers in (shape.layers, shape.layers // 2):
            before = used_bytes()
            with Engine(path, n_gpu_layers=layers) as engine:
                engine.reserve(args.max_length)
                engine.embed_tokens(seq)
                time.sleep(0.5)
                measured = used_bytes() - before
            predicted = needs(shape, quant, s, (layers,)).gpu_total
            print(
                f"| {quant} | {layers}/{shape.layers} | {predicted / GIB:.2f} | {measured / GIB:.2f} "
                f"| {predicted / measured:.2f} |"
            )


if __name__ == "__main__":
    main()
