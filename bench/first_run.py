"""The first run of an 8B embedder in numbers: bytes on disk and seconds per step, against the disk plan.

Builds tests/synth.py's random Llama-3.1-8B-shaped checkpoint (4096 wide, ffn 14336, 32 heads / 8 KV
heads, the Llama-3 tokenizer, bf16 shards) cut to each of two --layers depths, then runs the steps a first run
takes, as separate CLI commands with EMBEDRUNNER_HOME in the work directory (each one's wall and CPU seconds):

1. `runner plan -m CKPT --cpu --ram 16GiB --quant Q --json` for each quant: the disk plan, before any write;
2. `runner convert CKPT`: the F16 GGUF (what `embed --auto-quant` does first);
3. `runner quantize F16 --quant Q` for each quant (the first is what the plan picks for a 16 GiB laptop);
4. `runner embed -m CKPT --auto-quant ... --quant Q TEXT`: the second run, nothing left to write.

Bytes for 32 layers come from `runner plan -m llama-embed-nemotron-8b` (the GGUFs exact from shapes, the
download estimated: the hub is not reachable here, so it cannot be timed either). Seconds: every step is a
loop over layers plus a fixed part (the 128256 x 4096 token embedding, the tokenizer, process start), so CPU
seconds at 32 layers are read off the line through the two depths; wall seconds depend on the machine's load.

    python -m bench.first_run [--layers 4 12] [--quants Q8_0 Q4_K_M] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.convert_memory import free_bytes
from tests.synth import llama3_checkpoint

GIB = 2**30
FULL_LAYERS = 32
REGISTRY = "llama-embed-nemotron-8b"
TEXT = "how do llamas sleep?"
HARDWARE = ["--cpu", "--ram", "16GiB"]  # a 16 GiB laptop without a GPU: the plan picks Q8_0 for the 8B model


@dataclass
class Depth:
    layers: int
    bytes: dict[str, int] = field(default_factory=dict)  # checkpoint, F16, each quant: on disk
    predicted: dict[str, int] = field(default_factory=dict)  # the disk plan's, before anything was written
    wall: dict[str, float] = field(default_factory=dict)  # seconds per step, as the user waits
    cpu: dict[str, float] = field(default_factory=dict)  # user + system seconds per step: the work itself
    load: dict[str, float] = field(default_factory=dict)  # 1-minute load average after each step


def runner(*args: str, env: dict[str, str]) -> tuple[str, str, float, float]:
    """`runner ARGS` (stderr is a pipe: summary lines, no bars): stdout, stderr, wall and CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "runner", *args], capture_output=True, text=True, env={**os.environ, **env}
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"runner {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return proc.stdout, proc.stderr, wall, cpu


def measure(layers: int, quants: list[str], workdir: Path, repeats: int) -> Depth:
    """The first run's steps as separate commands (each one's own wall and CPU time, the least of REPEATS runs:
    other jobs share the cores), then the second run."""
    d = Depth(layers)
    ckpt, home = workdir / f"llama-8b-shape-{layers}l", workdir / f"home-{layers}l"
    env = {"EMBEDRUNNER_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    llama3_checkpoint(ckpt, layers)
    d.wall["build"] = time.perf_counter() - t0
    d.bytes["checkpoint"] = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    for q in quants:
        doc = json.loads(runner("plan", "-m", str(ckpt), *HARDWARE, "--quant", q, "--json", env=env)[0])["disk"]
        d.predicted |= {i["what"]: i["bytes"] for i in doc["items"]}  # all before anything is written

    def step(name: str, *args: str) -> str:
        _, err, wall, cpu = runner(*args, env=env)
        d.wall[name], d.cpu[name] = min(wall, d.wall.get(name, wall)), min(cpu, d.cpu.get(name, cpu))
        d.load[name] = max(os.getloadavg()[0], d.load.get(name, 0.0))
        print(f"  {layers} layers, {name}: {wall:.1f} s wall, {cpu:.1f} s CPU, load "
              f"{os.getloadavg()[0]:.1f}; " + err.strip().replace("\n", " | "), flush=True)  # fmt: skip
        return err

    f16 = home / ckpt.name / f"{ckpt.name}-F16.gguf"
    for _ in range(repeats):
        f16.unlink(missing_ok=True)  # else convert reuses it
        step("convert", "convert", str(ckpt))
    for q in quants:
        for _ in range(repeats):
            step(q, "quantize", str(f16), "--quant", q)
    for tag in ("F16", *quants):
        d.bytes[tag] = (home / ckpt.name / f"{ckpt.name}-{tag}.gguf").stat().st_size
    err = step("second run", "embed", "-m", str(ckpt), "--auto-quant", *HARDWARE, "--quant", quants[0], TEXT)
    assert "nothing to write" in err, err
    return d


def extrapolate(a: Depth, b: Depth, table: str, key: str) -> float:
    """KEY of TABLE at FULL_LAYERS on the line through depths A and B."""
    ya, yb = getattr(a, table)[key], getattr(b, table)[key]
    return ya + (yb - ya) * (FULL_LAYERS - a.layers) / (b.layers - a.layers)


def registry_plan(quants: list[str], workdir: Path) -> dict[str, int]:
    """Bytes of each item of llama-embed-nemotron-8b's first run, from `runner plan` on a fresh machine (offline:
    the download from models.toml shapes, the GGUFs exact from the tensor shapes)."""
    env = {"EMBEDRUNNER_HOME": str(workdir / "fresh"), "HF_HOME": str(workdir / "fresh-hf"), "HF_HUB_OFFLINE": "1"}
    out: dict[str, int] = {}
    for q in quants:
        doc = json.loads(runner("plan", "-m", REGISTRY, *HARDWARE, "--quant", q, "--json", env=env)[0])
        out |= {i["what"]: i["bytes"] for i in doc["disk"]["items"]}
    return out


def report(depths: list[Depth], quants: list[str], full: dict[str, int]) -> None:
    """Bytes: the disk plan (before) and what was written, per depth; for 32 layers the registry model's plan (a
    K-quant's mix depends on the layer count: bytes are planned, not extrapolated). Seconds: wall and CPU per
    step; for 32 layers the CPU seconds on the line through the two depths (wall depends on the machine's load)."""
    a, b = depths[0], depths[-1]

    def gib(n: float) -> str:
        return f"{n / GIB:.2f} GiB"

    print(f"\n| on disk | {' | '.join(f'{d.layers} layers: plan / written' for d in depths)} | 32 layers: plan |")
    print("|---|" + "---:|" * (len(depths) + 1))
    names = {"checkpoint": "download (bf16 safetensors)", "F16": "F16 GGUF", **{q: f"{q} GGUF" for q in quants}}
    for key, name in names.items():
        cells = [
            f"{gib(d.bytes[key])}" if key == "checkpoint" else f"{gib(d.predicted[key])} / {gib(d.bytes[key])}"
            for d in depths
        ]
        print(f"| {name} | {' | '.join(cells)} | {gib(full['download' if key == 'checkpoint' else key])} |")
    first = full["download"] + full["F16"] + full[quants[0]]
    print(f"| first run with {quants[0]}, F16 kept | | | {gib(first)} |")

    print(f"\n| step | {' | '.join(f'{d.layers} layers: wall (CPU)' for d in depths)} | 32 layers: CPU (fit) |")
    print("|---|" + "---:|" * (len(depths) + 1))
    steps = {"convert": "convert to F16", **{q: f"quantize F16 -> {q}" for q in quants}, "second run": "second run"}
    for key, name in steps.items():
        cells = [f"{d.wall[key]:.1f} s ({d.cpu[key]:.1f} s)" for d in depths]
        print(f"| {name} | {' | '.join(cells)} | {extrapolate(a, b, 'cpu', key):.0f} s |")
    loads = ", ".join(f"{max(d.load.values()):.1f}" for d in depths)
    print(f"\nleast of the repeats per step; highest 1-minute load average after a step, per depth: {loads}")
    print("building the random checkpoints: " + ", ".join(f"{d.wall['build']:.0f} s" for d in depths))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 12], help="two depths for the line")
    ap.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_K_M"], help="the first is the planned one")
    ap.add_argument("--workdir", type=Path, help="default: a new directory under $TMPDIR")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each step; the least time counts")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints and GGUFs")
    args = ap.parse_args(argv)
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="first-run-"))
    workdir.mkdir(parents=True, exist_ok=True)
    depths = []
    try:
        for layers in sorted(args.layers):
            # One depth at a time on disk: the checkpoint, the F16 and the quants (~18 GB at 12 layers).
            need = (1 + 1 + 0.9) * 2 * (525e6 + layers * 218e6)
            if free_bytes(workdir) < need:
                raise SystemExit(f"not enough disk in {workdir}: need ~{need / 1e9:.0f} GB for {layers} layers")
            print(f"{layers} layers in {workdir}", flush=True)
            depths.append(measure(layers, args.quants, workdir, args.repeats))
            if not args.keep:
                for p in workdir.iterdir():
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        report(depths, args.quants, registry_plan(args.quants, workdir))
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
