"""How many engine threads to run while other processes use the CPU: what the default `--threads` follows.

    python -m bench.threads_under_load [--models minilm,llama8b] [--loads 0,0.5,1] [--rounds 3] [--texts 24]
        [--workdir DIR]

For each background load (in cores: 1.5 = one process busy all the time and one busy 5 ms of every 10 ms),
this starts those processes, then embeds the same texts through engines with fixed thread counts (1 and every
usable core, plus the count the load leaves free) and through an engine with the default thread count, which
follows the load (runner.engine, planner.hardware.threads_for_load), in interleaved rounds after one untimed
round per engine. It prints the median seconds per engine, the speed relative to the best fixed count and the
threads the default engine ran with. Models: MiniLM F16 (real weights; many small ops, a barrier each) and
2 layers of the Llama-3.1-8B shape at Q8_0 (bench.cpu_quants; few large matmuls).

llama.cpp's CPU threads wait for each other at a spinning barrier after every op: a thread the scheduler
parks beside another process holds up all the others for a time slice, so a thread too many costs far more
than a thread too few.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu_peers import build_model, cpu_flags, load_average, log, passages, short_texts
from planner.hardware import usable_cores

MODELS = {"minilm": ("all-MiniLM-L6-v2 F16", "F16"), "llama8b": ("Llama-3.1-8B shape, 2 layers, Q8_0", "Q8_0")}
PERIOD_S = 0.01  # a partly busy process's duty cycle: busy for a share of every PERIOD_S


def burn(share: float, stop) -> None:
    """Keep a core busy SHARE of the time until STOP is set."""
    while not stop.is_set():
        start = time.perf_counter()
        while time.perf_counter() - start < share * PERIOD_S:
            pass
        if share < 1:
            time.sleep((1 - share) * PERIOD_S)


class Background:
    """Processes that keep CORES cores busy between start and stop (whole cores, then one for the fraction)."""

    def __init__(self, cores: float) -> None:
        shares = [1.0] * int(cores) + ([cores - int(cores)] if cores % 1 else [])
        ctx = multiprocessing.get_context("spawn")  # no copy of this process's loaded models
        self.stop = ctx.Event()
        self.procs = [ctx.Process(target=burn, args=(s, self.stop), daemon=True) for s in shares]

    def __enter__(self) -> Background:
        for p in self.procs:
            p.start()
        time.sleep(0.5)  # started and spinning before the first timing
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for p in self.procs:
            p.join(5)


@dataclass
class Contender:
    name: str
    pipeline: object
    fixed: int | None  # threads; None: the default, which follows the load
    seconds: list[float] = field(default_factory=list)
    threads_seen: set[int] = field(default_factory=set)


def contenders(path: Path, cores: int, load: float) -> list[Contender]:
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    counts = sorted({1, max(1, cores - math.ceil(load - 0.5)), cores})
    out = [Contender(f"{n} thread{'s' if n > 1 else ''}", Pipeline(Engine(path, n)), n) for n in counts]
    out.append(Contender("default (follows the load)", Pipeline(Engine(path)), None))
    return out


def run_load(cs: list[Contender], texts: list[str], rounds: int) -> None:
    for c in cs:  # untimed: warms each engine and gives the default engine its first look at the load
        c.pipeline.embed(texts)
    for r in range(rounds):
        for c in cs:
            start = time.perf_counter()
            c.pipeline.embed(texts)
            c.seconds.append(time.perf_counter() - start)
            c.threads_seen.add(c.pipeline.engine.n_threads)
            log(f"  round {r + 1}/{rounds} {c.name}: {c.seconds[-1]:.2f} s ({c.pipeline.engine.n_threads} threads)")


def rows(label: str, load: float, cs: list[Contender]) -> list[str]:
    best = min(statistics.median(c.seconds) for c in cs if c.fixed is not None)
    out = []
    for c in cs:
        sec = statistics.median(c.seconds)
        threads = ", ".join(str(n) for n in sorted(c.threads_seen))
        out.append(f"| {label} | {load:g} | {c.name} | {sec:.2f} | {best / sec:.2f}x | {threads} |")
    return out


HEADER = [
    "| model | other load (cores) | engine | seconds (median) | vs best fixed count | threads run |",
    "|---|---:|---|---:|---:|---|",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.threads_under_load", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm,llama8b", help="Comma-separated, of %(default)s.")
    p.add_argument("--loads", default="0,0.5,1", help="Background loads in cores (default %(default)s).")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--texts", type=int, default=24, help="Short texts per embed (MiniLM; the 8B shape: passages).")
    p.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "cpu-peers")
    args = p.parse_args(argv)
    args.models = [m.strip().lower() for m in args.models.split(",") if m.strip()]
    if bad := [m for m in args.models if m not in MODELS]:
        p.error(f"unknown model {', '.join(bad)} in --models; choose from {', '.join(MODELS)}")
    try:
        args.loads = [float(x) for x in args.loads.split(",") if x.strip()]
    except ValueError:
        p.error(f"--loads {args.loads!r}: write cores as numbers, e.g. 0,0.5,1")
    if not args.loads or any(not 0 <= x <= 64 for x in args.loads):
        p.error("--loads: each load between 0 and 64 cores")
    if args.rounds < 1 or args.texts < 1:
        p.error("--rounds and --texts must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cores = usable_cores()
    load_start = load_average()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    table = []
    for key in args.models:
        label, quant = MODELS[key]
        path = build_model(key, workdir, [quant]).ggufs[quant]
        texts = short_texts(args.texts) if key == "minilm" else passages(max(2, args.texts // 8))
        for load in args.loads:
            log(f"{label}, other load {load:g} cores")
            cs = contenders(path, cores, load)
            with Background(load):
                run_load(cs, texts, args.rounds)
            table += rows(label, load, cs)
            for c in cs:
                c.pipeline.engine.close()
    print(f"`{shlex.join(['python', '-m', 'bench.threads_under_load', *argv])}`")
    print("CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu_flags().items()))
    print(f"{cores} usable cores; median of {args.rounds} interleaved rounds after one untimed round")
    print(f"load average (1/5/15 min): {load_start} at start, {load_average()} at end (the background included)")
    print()
    print("\n".join(HEADER + table))


if __name__ == "__main__":
    main()
