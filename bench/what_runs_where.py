"""The README's "what runs where" table: planner/policy.py's choice for each registry LLM on typical machines.

    python -m bench.what_runs_where [--max-length 4096] [--reserve 1GiB] [--engine patched|stock]

Computed from the models.toml shapes and the memory model (planner/memory.py), nothing downloaded: one row
per machine, the chosen quant, where it runs, and the predicted GPU and RAM bytes. `--engine` says which
llama.cpp build to plan for: the one scripts/install builds (patched: no logits in embedding mode, the
default) or a stock `pip install llama-cpp-python` (logits reserved, and computed by the Qwen graphs).
"""

from __future__ import annotations

import argparse

from planner.hardware import Gpu, Hardware, parse_size, with_overrides
from planner.policy import plan
from planner.shapes import resolve_shape

GIB = 2**30
# sfr-embedding-mistral and linq-embed-mistral have e5-mistral-7b-instruct's shapes: the same column.
MODELS = [
    "llama-embed-nemotron-8b",
    "nv-embed-v2",
    "qwen3-embedding-8b",
    "gte-qwen2-7b-instruct",
    "e5-mistral-7b-instruct",
]
# (label, GPU sizes in GiB, RAM in GiB)
MACHINES = [
    ("24 GiB GPU", [24], 32),
    ("16 GiB GPU", [16], 32),
    ("12 GiB GPU", [12], 32),
    ("8 GiB GPU", [8], 16),
    ("6 GiB GPU", [6], 16),
    ("4 GiB GPU", [4], 16),
    ("2 x 8 GiB GPUs", [8, 8], 32),
    ("no GPU", [], 32),
    ("no GPU", [], 16),
    ("no GPU", [], 8),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-length", type=int, default=4096)
    p.add_argument("--reserve", default="1GiB")
    p.add_argument("--engine", choices=("patched", "stock"), default="patched")
    args = p.parse_args()
    embeddings_only = args.engine == "patched"
    reserve = parse_size(args.reserve, "--reserve")
    print(f"| machine (free memory; {args.reserve} kept back per device) | " + " | ".join(MODELS) + " |")
    print("|---|" + "---|" * len(MODELS))
    for label, vram, ram in MACHINES:
        gpus = tuple(Gpu(i, label, int(v * GIB), int(v * GIB)) for i, v in enumerate(vram))
        hw = Hardware(gpus, ram * GIB, ram * GIB, 8, True, "table", embeddings_only=embeddings_only)
        hw = with_overrides(hw, reserve=reserve)
        cells = []
        for model in MODELS:
            shape = resolve_shape(model)
            try:
                c = plan(shape, hw, args.max_length).chosen
            except Exception as e:  # a machine too small: say so in the cell
                cells.append(f"does not fit ({str(e).split(':')[1].strip()})")
                continue
            layers = f"{c.n_gpu_layers}/{shape.layers} layers on GPU"
            where = {"gpu": "all on GPU", "split": layers, "cpu": "CPU"}[c.fits]
            mem = f"GPU {c.needs.gpu_total / GIB:.1f} + RAM {c.needs.ram / GIB:.1f} GiB"
            cells.append(f"**{c.quant}** {where} ({mem})")
        print(f"| {label}, {ram} GiB RAM | " + " | ".join(cells) + " |")
    print(f"\n`python -m bench.what_runs_where --max-length {args.max_length} --engine {args.engine}`; GGUF sizes:")
    from quantize.quants import FIDELITY
    from quantize.sizes import file_bytes

    for model in MODELS:
        shape = resolve_shape(model)
        sizes = [file_bytes(list(shape.tensors), q, shape.header_bytes, shape.layers, shape.n_gqa) for q in FIDELITY]
        print(f"{model}: " + ", ".join(f"{q} {b / GIB:.2f} GiB" for q, b in zip(FIDELITY, sizes, strict=True)) + "\n")


if __name__ == "__main__":
    main()
