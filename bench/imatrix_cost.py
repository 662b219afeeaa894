"""What an importance matrix costs on the 7-8B shape: collection and quantization, measured on a few layers.

    python -m bench.imatrix_cost [--layers 2] [--texts 150] [--quant Q4_K_M] [--workdir DIR]

Builds bench.cpu_quants' random Llama-3.1-8B-shaped checkpoint cut to --layers layers (hidden 4096, FFN 14336,
the Llama-3 vocabulary) in F16, then, in turns: embeds the first --texts texts of the shipped calibration set
as `runner imatrix` does (quantize.imatrix.collect: the embedding run plus the callback that copies every
matmul input to the host and sums its squares) and the same texts without the callback; then quantizes the F16
file to --quant without and with the matrix. Prints tokens/s of both runs, the callback's share, the
quantizer's speed in source bytes/s, and what those measurements give for the whole model (32 layers, the F16
file's bytes) with the whole calibration set: the time per layer and per byte does not depend on depth.

The GPU line is an estimate, not a measurement: the model's forward pass there is fast, and the time is the
callback's host work (copying and summing the same floats), taken from this run's measured cost per float.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench.cpu_quants import llama8b_ggufs
from planner.hardware import usable_cores
from quantize import imatrix
from quantize.ladder import quantize
from runner.engine import Engine
from runner.pipeline import Pipeline

FULL_LAYERS = 32  # Llama-3.1-8B, llama-embed-nemotron-8b
HIDDEN, FFN = 4096, 14336


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(path: Path, texts: list[imatrix.CalibrationText], collect: bool) -> tuple[float, int]:
    """Seconds and tokens to embed TEXTS as runner imatrix does, with or without the collecting callback."""
    if collect:
        started = time.perf_counter()
        found = imatrix.collect(path, texts, dataset="bench")
        return time.perf_counter() - started, found.tokens
    with Engine(path) as engine:
        pipeline = Pipeline(engine)
        tokens = 0
        started = time.perf_counter()
        for query in (False, True):
            part = [t.text for t in texts if t.query == query]
            if part:
                tokens += pipeline.tokenize(part, query=query).tokens
                pipeline.embed(part, query=query)
        return time.perf_counter() - started, tokens


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.imatrix_cost", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--texts", type=int, default=150, help="calibration texts to time (default: the whole set)")
    p.add_argument("--quant", default="Q4_K_M")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpu-quants")
    args = p.parse_args(argv)
    f16 = llama8b_ggufs(args.workdir.resolve(), args.layers, ["F16"])["F16"]
    shipped = imatrix.calibration_texts()
    texts = shipped[: args.texts]

    plain_s, tokens = run(f16, texts, collect=False)
    collect_s, collected_tokens = run(f16, texts, collect=True)
    plain_s = min(plain_s, run(f16, texts, collect=False)[0])  # in turns: plain, collect, plain
    log(f"{tokens} tokens ({collected_tokens} collected): plain {plain_s:.1f} s, collecting {collect_s:.1f} s")
    importance = imatrix.collect(f16, texts[:8], dataset="bench")
    out = args.workdir.resolve() / "imatrix-cost"
    started = time.perf_counter()
    quantize(f16, [args.quant], out / "plain")
    quant_plain_s = time.perf_counter() - started
    started = time.perf_counter()
    quantize(f16, [args.quant], out / "imatrix", importance=importance)
    quant_imatrix_s = time.perf_counter() - started
    source = f16.stat().st_size

    # The whole model: per-layer times scale with depth; the token embedding lookup and pooling are negligible.
    with Engine(f16) as engine:
        pipeline = Pipeline(engine)
        all_tokens = sum(
            pipeline.tokenize([t.text for t in shipped if t.query == q], query=q).tokens for q in (False, True)
        )
    scale = FULL_LAYERS / args.layers * all_tokens / tokens
    full_bytes = source + (FULL_LAYERS - args.layers) * layer_bytes(f16)
    # The callback reads each distinct matmul input once: q/k/v's, o's, gate/up's (HIDDEN wide) and down's (FFN).
    floats = collected_tokens * args.layers * (3 * HIDDEN + FFN)
    host_s_per_float = max(collect_s - plain_s, 0.0) / floats
    full_floats = all_tokens * FULL_LAYERS * (3 * HIDDEN + FFN)
    rows = [
        ("measured", f"{args.layers} layers, {len(texts)} texts, {tokens} tokens"),
        ("embedding run", f"{tokens / plain_s:.1f} tokens/s"),
        ("with the collecting callback",
         f"{collected_tokens / collect_s:.1f} tokens/s ({collect_s / plain_s:.2f}x the time)"),
        (f"quantize to {args.quant}", f"{source / quant_plain_s / 2**20:.0f} MiB/s of F16 without, "
         f"{source / quant_imatrix_s / 2**20:.0f} MiB/s with the matrix"),
        ("whole model, CPU: collection", f"{collect_s * scale / 60:.0f} min for the shipped set ({all_tokens} tokens)"),
        ("whole model, CPU: quantization", f"{full_bytes / (source / quant_imatrix_s) / 60:.1f} min per quant "
         f"({full_bytes / 2**30:.1f} GiB of F16)"),
        ("whole model, GPU (estimate)", f"{full_floats * host_s_per_float / 60:.1f} min of host work for the callback "
         f"({host_s_per_float * 1e9:.2f} ns per float here) plus the forward pass"),
    ]  # fmt: skip
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in rows))
    print(f"\n`{shlex.join(['python', '-m', 'bench.imatrix_cost', *argv])}` on {usable_cores()} cores.")


def layer_bytes(f16: Path) -> int:
    """Bytes of one repeating layer of the F16 file (quantize.sizes, as the planner counts them)."""
    from planner.shapes import from_gguf
    from quantize import sizes

    shape = from_gguf(f16)
    return sizes.layer_bytes(list(shape.tensors), "F16", shape.layers, shape.n_gqa)[0][0]


if __name__ == "__main__":
    main()
