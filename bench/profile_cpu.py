"""Where CPU embedding time goes: a `perf` profile of `Pipeline.embed` on one GGUF, split by library and kernel.

    python -m bench.profile_cpu GGUF [--texts 200]

Needs Linux `perf` (Debian: linux-perf). Records the embedding of --texts texts of `tests.corpus` in a
child process, then prints the share of samples per library (ggml's CPU backend, OpenMP, Python, ...)
and the hottest places inside ggml's CPU backend. That library is stripped: a place is named by the
nearest exported symbol below it, and by the SIMD instructions around it, which tell an int8 dot product
(vpmaddubsw/vpmaddwd: Q8_0 x Q8_0) from a float one (vfmadd on converted halves: F16).
"""

from __future__ import annotations

import argparse
import bisect
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import llama_cpp

CHILD = """
import sys
from pathlib import Path
from tests.corpus import corpus
from runner.engine import Engine
from runner.pipeline import Pipeline
with Engine(Path(sys.argv[1])) as engine:
    Pipeline(engine).embed(corpus(int(sys.argv[2])))
"""
SAMPLE = re.compile(r"\s+([\d.]+)%\s+(\S+)\s+\[.\]\s+(\S+)")


def ggml_cpu() -> Path:
    return next((Path(llama_cpp.__file__).parent / "lib").glob("libggml-cpu.so"))


def exported(lib: Path) -> tuple[list[int], list[str]]:
    out = subprocess.run(["nm", "-D", "--defined-only", str(lib)], capture_output=True, text=True, check=True)
    syms = sorted((int(a, 16), n) for a, _, n in (line.split()[:3] for line in out.stdout.splitlines()))
    return [a for a, _ in syms], [n for _, n in syms]


def simd_mix(lib: Path, address: int) -> str:
    """The most common vector instructions in the 256 bytes around ADDRESS."""
    dump = subprocess.run(
        ["objdump", "-d", f"--start-address={address - 128}", f"--stop-address={address + 128}", str(lib)],
        capture_output=True,
        text=True,
    ).stdout
    ops = collections.Counter(m for line in dump.splitlines()[7:] for m in re.findall(r"\t(v[a-z0-9]+)\s", line))
    return " ".join(op for op, _ in ops.most_common(5))


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.profile_cpu", description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--texts", type=int, default=200)
    args = p.parse_args()
    data = Path(tempfile.mkdtemp()) / "perf.data"
    subprocess.run(
        [
            "perf",
            "record",
            "-q",
            "-F",
            "499",
            "-o",
            str(data),
            "--",
            sys.executable,
            "-c",
            CHILD,
            str(args.gguf),
            str(args.texts),
        ],
        check=True,
    )
    report = subprocess.run(
        ["perf", "report", "-i", str(data), "--sort", "dso,symbol", "--stdio"], capture_output=True, text=True
    ).stdout
    lib = ggml_cpu()
    addrs, names = exported(lib)
    by_dso: collections.Counter[str] = collections.Counter()
    in_ggml: collections.Counter[str] = collections.Counter()
    hottest: dict[str, tuple[float, int]] = {}  # static region -> (share, address) of its hottest sample
    for m in map(SAMPLE.match, report.splitlines()):
        if not m:
            continue
        pct, dso, sym = float(m[1]), m[2], m[3]
        by_dso[re.sub(r"\.so.*", "", dso)] += pct
        if dso.startswith("libggml-cpu"):
            if sym.startswith("0x"):  # static code: named by the nearest exported symbol below it
                x = int(sym, 16)
                sym = f"static code after {names[max(bisect.bisect_right(addrs, x) - 1, 0)][:60]}"
                hottest[sym] = max(hottest.get(sym, (0.0, x)), (pct, x))
            in_ggml[sym] += pct
    print(f"{args.gguf.name}, {args.texts} texts: share of samples")
    for dso, pct in by_dso.most_common(6):
        print(f"  {pct:5.1f} %  {dso}")
    print("hottest in libggml-cpu:")
    for sym, pct in in_ggml.most_common(8):
        mix = f" [{simd_mix(lib, hottest[sym][1])}]" if sym in hottest else ""
        print(f"  {pct:5.1f} %  {sym}{mix}")


if __name__ == "__main__":
    main()
