"""`runner embed-dataset` with 1 and 2 Ray workers against single-process `runner embed`, on the same texts.

    python -m bench.ray_scaling [--texts 4000] [--model all-minilm-l6-v2] [--shard-rows 500]

Writes --texts texts of tests.corpus to a .txt file, then times (wall clock, one run each, in this order):
`runner embed` (one process, all cores), and `runner embed-dataset` on a local Ray cluster with 1 and with
2 workers sharing the machine's cores (--cpus-per-worker's default; Ray start-up, actor start-up and model
loads included, as a user waits for them). On a 2-core machine this shows Ray's overhead, not scaling.
Prints a markdown table.
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


def timed(args: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runner", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"runner {shlex.join(args)} failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--texts", type=int, default=4000)
    p.add_argument("--model", default="all-minilm-l6-v2")
    p.add_argument("--shard-rows", type=int, default=500)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "texts.txt"
        src.write_text("\n".join(corpus(args.texts)) + "\n")
        timed(["convert", args.model])  # outside the timings: every row below starts from the same GGUF
        rows = [("runner embed (1 process)", timed(["embed", "-m", args.model, "--input", str(src), "-o",
                                                     str(Path(tmp) / "v.npy"), "-q"]))]  # fmt: skip
        for workers in (1, 2):
            out = Path(tmp) / f"out-{workers}"
            seconds = timed(["embed-dataset", str(src), str(out), "-m", args.model, "--quant", "F16", "--workers",
                             str(workers), "--shard-rows", str(args.shard_rows), "-q"])  # fmt: skip
            rows.append((f"runner embed-dataset, {workers} worker{'s' if workers > 1 else ''}", seconds))
    print(f"`python -m bench.ray_scaling {shlex.join(sys.argv[1:])}`".replace(" `", "`"))
    print(f"\n{args.texts} texts of tests.corpus, {args.model}, one run each:\n")
    print("| run | seconds | texts/s | vs one process |")
    print("|---|---:|---:|---:|")
    base = rows[0][1]
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {args.texts / seconds:.0f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    main()
