"""Which quant embeds fastest on this CPU, on the real 7-8B layer shape (the planner's CPU question).

    python -m bench.cpu_quants [--layers 2] [--texts 24] [--repeats 3] [--quants F16,Q8_0,...] [--workdir DIR]
        [--calibrate]

The small real models of bench.speed are 384 and 576 wide, so their K-quants fall back to other types and
never reach llama.cpp's repacked CPU kernels. This builds a random Llama-3.1-8B-shaped checkpoint (hidden
4096, FFN 14336, 32/8 heads, Llama-3 vocabulary) cut to --layers layers, converts it to F16, quantizes it,
and times `Engine.embed_tokens` on the same `tests.corpus` texts for each file: tokens/s (median of
--repeats after a warm-up) and the speed relative to Q8_0. Speed per layer does not depend on the weights'
values or on the depth, so a few layers stand for the 32 of llama-embed-nemotron-8b and NV-Embed-v2's trunk.

--calibrate also times `runner calibrate`'s benchmark (runner/calibrate.py: its synthetic 2-layer file with a
tiny vocabulary, one full micro-batch of token ids) at each quant, in turns with the bench texts on both
files at once (these machines are shared and noisy: drift then falls on both alike), and prints its
prediction for --layers layers next to the measured tokens/s: the check that the planner's CPU speeds hold.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from planner.calibration import CALIBRATED_LAYERS
from planner.hardware import usable_cores
from quantize.ladder import quant_path, quantize
from quantize.quants import LADDER
from runner.calibrate import median_rate
from runner.engine import Engine
from tests.corpus import corpus
from tests.synth import llama3_checkpoint

DEFAULT_QUANTS = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def llama8b_ggufs(workdir: Path, layers: int, quants: list[str]) -> dict[str, Path]:
    """{quant: GGUF} ("F16", "BF16" or a ladder quant) of a random Llama-3.1-8B-shaped checkpoint cut to LAYERS
    layers, converted and quantized by llama.cpp's own quantizer (the kernels the CPU runs), each built once in
    WORKDIR."""
    from bench.speed import ggufs
    from quantize.progress import Progress

    ckpt = workdir / f"llama-8b-shape-{layers}l"
    if not (ckpt / "config.json").is_file():
        log(f"building {ckpt}")
        llama3_checkpoint(ckpt, layers)
    return ggufs(str(ckpt), workdir / "gguf", False, quants, Progress(say=log))


def tokens_per_second(path: Path, texts: list[str], repeats: int) -> float:
    with Engine(path) as engine:
        return median_rate(engine, [engine.tokenize(t) for t in texts], repeats)


def calibration_file(workdir: Path, bench_file: Path, quant: str) -> Path:
    """`runner calibrate`'s synthetic file (2 layers of the bench file's layer shape) at QUANT, built once."""
    from planner.shapes import from_gguf
    from runner.calibrate import synthetic_gguf

    f16 = workdir / "calibration" / "calibration-F16.gguf"
    if not f16.is_file():
        f16.parent.mkdir(parents=True, exist_ok=True)
        synthetic_gguf(f16, from_gguf(bench_file))
    path = quant_path(f16, quant)
    return f16 if quant == "F16" else path if path.is_file() else quantize(f16, [quant])[0]


def interleaved(bench_file: Path, calib_file: Path, texts: list[str], repeats: int) -> tuple[float, float]:
    """Tokens/s of the bench texts and of runner calibrate's batch, timed in turns on both files at once, so a
    noisy machine's drift falls on both alike: (bench, calibration), medians of REPEATS."""
    from runner.calibrate import calibration_batch

    with Engine(bench_file) as a, Engine(calib_file) as b:
        runs = [(a, [a.tokenize(t) for t in texts], []), (b, calibration_batch(), [])]
        for engine, seqs, _ in runs:
            engine.embed_tokens(seqs)  # warm-up: context, page-in, repacking
        for _ in range(repeats):
            for engine, seqs, times in runs:
                start = time.perf_counter()
                engine.embed_tokens(seqs)
                times.append(time.perf_counter() - start)
    return tuple(sum(len(s) for s in seqs) / statistics.median(times) for _, seqs, times in runs)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m bench.cpu_quants", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--texts", type=int, default=24)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quants", default=",".join(DEFAULT_QUANTS))
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpu-quants")
    p.add_argument("--calibrate", action="store_true", help="Compare with runner calibrate's prediction.")
    args = p.parse_args(argv)
    quants = [q.strip().upper() for q in args.quants.split(",") if q.strip()]
    if unknown := [q for q in quants if q not in ("F16", *LADDER)]:
        p.error(f"unknown quant {', '.join(unknown)}; choose from F16, {', '.join(LADDER)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = llama8b_ggufs(args.workdir.resolve(), args.layers, quants)
    texts = corpus(args.texts)
    speed, predicted = {}, {}
    if not args.calibrate:
        for quant, path in files.items():
            speed[quant] = tokens_per_second(path, texts, args.repeats)
            log(f"{quant}: {speed[quant]:.1f} tokens/s")
    else:
        for quant, path in files.items():
            calib = calibration_file(args.workdir, path, quant)
            speed[quant], calibrated = interleaved(path, calib, texts, args.repeats)
            predicted[quant] = calibrated * CALIBRATED_LAYERS / args.layers
            log(f"{quant}: {speed[quant]:.1f} tokens/s, calibration predicts {predicted[quant]:.1f}")
    base = speed.get("Q8_0")
    print(f"`{shlex.join(['python', '-m', 'bench.cpu_quants', *argv])}`: {args.layers} layers of the Llama-3.1-8B")
    print(f"shape, {len(texts)} texts, {usable_cores()} threads, median of {args.repeats}")
    extra = " runner calibrate predicts | predicted / measured |" if predicted else ""
    print("| quant | tokens/s | vs Q8_0 |" + extra)
    print("|---|---:|---:|" + ("---:|---:|" if predicted else ""))
    for quant, tps in speed.items():
        row = f"| {quant} | {tps:.1f} | {f'{tps / base:.2f}x' if base else ''} |"
        if predicted:
            row += f" {predicted[quant]:.1f} | {predicted[quant] / tps:.2f} |"
        print(row)


if __name__ == "__main__":
    main()
