"""How llama.cpp's threads should wait for each other, on an idle CPU and one other processes also use.

    python -m bench.threads_under_load [--models minilm,llama8b] [--loads 0,1] [--spins 0] [--rounds 5]
        [--texts 24] [--workdir DIR]

Every op of llama.cpp's graph ends in a barrier (GCC's OpenMP in the engine scripts/install builds), where the
threads that are done wait for the rest: libgomp spins GOMP_SPINCOUNT times (300,000 when nothing is set),
then sleeps. For each background load (in cores: 0.5 = a process busy 5 ms of every 10 ms), this starts those
processes, then embeds the same texts through engines in processes of their own (OpenMP reads its settings
once, at load): one thread; every usable core with libgomp's own 300,000 spins; every core with each of
--spins; and the runner's default (quantize/openmp.py), in interleaved rounds after one untimed round each.
It prints the median seconds per engine and its speed relative to the fastest. Models: MiniLM F16 (real
weights; many small ops, so many barriers) and 2 layers of the Llama-3.1-8B shape at Q8_0 (bench.cpu_quants;
few large matmuls).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu_peers import build_model, cpu_flags, load_average, log, passages, short_texts
from planner.hardware import usable_cores
from quantize.openmp import SPIN_COUNT, WAIT_SETTINGS

MODELS = {"minilm": ("all-MiniLM-L6-v2 F16", "F16"), "llama8b": ("Llama-3.1-8B shape, 2 layers, Q8_0", "Q8_0")}
PERIOD_S = 0.01  # a partly busy process's duty cycle: busy for a share of every PERIOD_S
LIBGOMP_SPINS = 300_000  # libgomp's own spin count when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set


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
    """An engine in a process of its own, so that each can have its own OpenMP settings (read once, when
    llama.cpp's CPU library loads)."""

    name: str
    threads: int | None  # None: the runner's default
    env: dict[str, str]  # OpenMP settings for its process; none: the runner's default
    seconds: list[float] = field(default_factory=list)
    conn: object = None
    proc: object = None

    def start(self, path: Path) -> None:
        """Load PATH in a process of its own with ENV as its OpenMP settings (nothing set: the runner's default)."""
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        saved = {k: os.environ.get(k) for k in WAIT_SETTINGS}
        try:  # a spawned process starts with this process's environment as it is at start()
            for k in WAIT_SETTINGS:
                os.environ.pop(k, None)
            os.environ.update(self.env)
            self.proc = ctx.Process(target=serve_engine, args=(str(path), self.threads, child), daemon=True)
            self.proc.start()
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        self.conn.recv()  # loaded

    def embed(self, texts: list[str]) -> float:
        self.conn.send(texts)
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(None)
        self.proc.join(30)


def serve_engine(path: str, threads: int | None, conn) -> None:
    """A child process: load PATH, then embed what CONN sends, answering the seconds it took, until None."""
    from runner.engine import Engine
    from runner.pipeline import Pipeline

    pipeline = Pipeline(Engine(Path(path), threads))
    conn.send("ready")
    while (texts := conn.recv()) is not None:
        start = time.perf_counter()
        pipeline.embed(texts)
        conn.send(time.perf_counter() - start)
    pipeline.engine.close()


def contenders(cores: int, spins: list[int]) -> list[Contender]:
    plural = "s" if cores > 1 else ""
    libgomp = {"GOMP_SPINCOUNT": str(LIBGOMP_SPINS)}
    out = [Contender("1 thread", 1, libgomp)]
    if cores > 1:
        out.append(Contender(f"{cores} threads, libgomp's {LIBGOMP_SPINS} spins", cores, libgomp))
    out += [Contender(f"{cores} thread{plural}, {n} spins", cores, {"GOMP_SPINCOUNT": str(n)}) for n in spins]
    out.append(Contender(f"default ({cores} thread{plural}, {SPIN_COUNT} spins)", None, {}))
    return out


def run_load(cs: list[Contender], texts: list[str], rounds: int) -> None:
    for c in cs:  # untimed: warms each engine
        c.embed(texts)
    for r in range(rounds):
        for c in cs:
            c.seconds.append(c.embed(texts))
            log(f"  round {r + 1}/{rounds} {c.name}: {c.seconds[-1]:.2f} s")


def rows(label: str, load: float, cs: list[Contender]) -> list[str]:
    fastest = min(statistics.median(c.seconds) for c in cs)
    out = []
    for c in cs:
        sec = statistics.median(c.seconds)
        out.append(f"| {label} | {load:g} | {c.name} | {sec:.2f} | {fastest / sec:.2f}x |")
    return out


HEADER = [
    "| model | other load (cores) | threads, waiting | seconds (median) | vs the fastest |",
    "|---|---:|---|---:|---:|",
]


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.threads_under_load", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="minilm,llama8b", help="Comma-separated, of %(default)s.")
    p.add_argument("--loads", default="0,1", help="Background loads in cores (default %(default)s).")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--texts", type=int, default=24, help="Short texts per embed (MiniLM; the 8B shape: passages).")
    p.add_argument("--spins", default="0", help="GOMP_SPINCOUNT values to try at all cores (default %(default)s).")
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
    try:
        args.spins = [int(x) for x in args.spins.split(",") if x.strip()]
    except ValueError:
        p.error(f"--spins {args.spins!r}: write spin counts, e.g. 0,10000")
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
            cs = contenders(cores, args.spins)
            for c in cs:
                c.start(path)
            with Background(load):
                run_load(cs, texts, args.rounds)
            table += rows(label, load, cs)
            for c in cs:
                c.stop()
    print(f"`{shlex.join(['python', '-m', 'bench.threads_under_load', *argv])}`")
    print("CPU flags: " + ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in cpu_flags().items()))
    print(f"{cores} usable cores; median of {args.rounds} interleaved rounds after one untimed round")
    print(f"load average (1/5/15 min): {load_start} at start, {load_average()} at end (the background included)")
    print()
    print("\n".join(HEADER + table))


if __name__ == "__main__":
    main()
