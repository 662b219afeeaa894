"""Streaming, measured: `runner embed` peak memory on a large input vs a small one (issue: memory stays flat).

    python -m bench.streaming [--small 500] [--large 50000] [--line-bytes 4096] [--max-length 8]

Writes two .txt inputs of --line-bytes per line (sentences from tests.corpus, joined until long enough),
then runs `runner embed -m all-minilm-l6-v2 --max-length N --input FILE -o out.npy -q` on each in a fresh
process and reads that process's VmHWM (peak resident set). The output .npy is assembled through a
memory map, so its pages count in the peak: the table shows the peak with the output array's bytes taken
off, which is what must stay flat. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.corpus import corpus

MIB = 2**20
DIMS = 384  # all-MiniLM-L6-v2
CHILD = """
import runpy, sys
sys.argv = ["runner", *sys.argv[1:]]
try:
    runpy.run_module("runner", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print([int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def write_input(path: Path, lines: int, line_bytes: int) -> None:
    sentences = [s.replace("\n", " ") for s in corpus(2000)]  # one text per line
    with open(path, "w", encoding="utf-8") as f:
        k = 0
        for _ in range(lines):
            parts, size = [], 0
            while size < line_bytes:
                s = sentences[k % len(sentences)]
                parts.append(s)
                size += len(s) + 1
                k += 1
            f.write(" ".join(parts)[:line_bytes] + "\n")


def peak(input_file: Path, out: Path, max_length: int) -> tuple[int, float]:
    """(VmHWM bytes, seconds) of one `runner embed` run."""
    args = ["embed", "-m", "all-minilm-l6-v2", "--max-length", str(max_length), "--input", str(input_file)]
    args += ["-o", str(out), "-q"]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"runner {shlex.join(args)} failed:\n{proc.stderr[-2000:]}")
    return int(proc.stdout.split()[-1]), time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", type=int, default=500)
    p.add_argument("--large", type=int, default=50_000)
    p.add_argument("--line-bytes", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=8)
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for lines in (args.small, args.large):
            src = Path(tmp) / f"in-{lines}.txt"
            write_input(src, lines, args.line_bytes)
            hwm, seconds = peak(src, Path(tmp) / f"out-{lines}.npy", args.max_length)
            output = lines * DIMS * 4
            rows.append((lines, src.stat().st_size, hwm, output, seconds))
            print(f"{lines} lines: peak {hwm / MIB:.0f} MiB in {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"`python -m bench.streaming {shlex.join(sys.argv[1:])}`".replace(" `", "`"))
    print()
    print("| lines | input MiB | peak RSS MiB | output array MiB | peak - output MiB | seconds |")
    print("|---|---|---|---|---|---|")
    for lines, size, hwm, output, seconds in rows:
        print(
            f"| {lines} | {size / MIB:.0f} | {hwm / MIB:.0f} | {output / MIB:.0f} | {(hwm - output) / MIB:.0f} "
            f"| {seconds:.0f} |"
        )
    grown = (rows[1][2] - rows[1][3]) - (rows[0][2] - rows[0][3])
    print(f"\nGrowth apart from the output array: {grown / MIB:.0f} MiB (target: within 100 MiB).")


if __name__ == "__main__":
    main()
