"""Peak memory of `runner convert` on a large random Llama checkpoint: does the converter stream?

Builds a random LlamaBidirectionalModel checkpoint (tests/synth.py: safetensors shards of ~2 GB, written
one shard at a time without instantiating a torch model; the Llama-3 tokenizer), converts it
to an F16 GGUF in a child process and reports the child's peak RSS next to the checkpoint size and the
largest single tensor. Run from the repository root (defaults: Llama-3.2-3B shape, ~6.4 GB bf16):

    python -m bench.convert_memory [--layers 28] [--hidden 3072] [--ffn 8192] [--vocab 128256] \
        [--dtype bf16] [--workdir DIR] [--keep]

Peak RSS comes from `/usr/bin/time -v` (apt package `time`; else getrusage(RUSAGE_CHILDREN)). It counts
file-backed pages the converter has memory-mapped (np.memmap of the shards) as well as anonymous memory,
so /proc/<pid>/status RssAnon and RssFile are also sampled every 20 ms to tell the two apart.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.synth import hf_config, llama3_checkpoint, llama3_shape, tensor_shapes

LLAMA3_VOCAB = 128256  # tokens in the Llama-3 tokenizer (128000 BPE + 256 special)
GGUF_OVERHEAD = 64 * 2**20  # tokenizer metadata, rope factors, alignment padding
MIB = 2**20
ITEMSIZE = {"bf16": 2, "f16": 2, "f32": 4}


@dataclass
class RssSampler:
    """Polls /proc/<pid>/status of a process tree; keeps the peak of each field (kB) over all its processes."""

    root: int
    interval: float = 0.02
    peaks: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root)
        except psutil.NoSuchProcess:
            return
        while not self._stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for p in procs:
                self._sample(p.pid)
            self._stop.wait(self.interval)

    def _sample(self, pid: int) -> None:
        try:
            lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        except OSError:
            return
        for line in lines:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                self.peaks[key] = max(self.peaks.get(key, 0), int(value.split()[0]))


@dataclass
class ConvertRun:
    peak_rss_kb: int
    peak_source: str
    wall_s: float
    sampled: dict[str, int]
    gguf: Path


def run_convert(ckpt: Path, outdir: Path, scratch: Path) -> ConvertRun:
    """`runner convert CKPT --outdir OUTDIR --outtype f16` in a child process, with its peak RSS."""
    runner = Path(sys.executable).parent / "runner"
    cmd = [str(runner)] if runner.exists() else [sys.executable, "-m", "runner"]
    cmd += ["convert", str(ckpt), "--outdir", str(outdir), "--outtype", "f16"]
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    report = scratch / "time-v.txt"
    if time_bin:
        cmd = [time_bin, "-v", "-o", str(report), *cmd]
    else:
        print("  /usr/bin/time not found (apt-get install -y time); using getrusage(RUSAGE_CHILDREN)")
    print("  $ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    stdout, _ = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"runner convert failed with exit code {proc.returncode}")
    if time_bin:
        lines = [line.strip() for line in report.read_text().splitlines()]
        peak = next(int(line.rsplit(":", 1)[1]) for line in lines if line.startswith("Maximum resident set size"))
        source = "/usr/bin/time -v"
    else:
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        source = "getrusage(RUSAGE_CHILDREN)"
    return ConvertRun(peak, source, wall, sampler.peaks, Path(stdout.strip().splitlines()[-1]))


def free_bytes(path: Path) -> int:
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=3072, help="a multiple of 128 (head_dim)")
    ap.add_argument("--ffn", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=LLAMA3_VOCAB, help=f">= {LLAMA3_VOCAB} (the tokenizer's size)")
    ap.add_argument("--dtype", choices=sorted(ITEMSIZE), default="bf16", help="checkpoint dtype")
    ap.add_argument("--workdir", type=Path, help="default: a new directory under $TMPDIR")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUF")
    args = ap.parse_args(argv)
    if args.hidden % 128:
        ap.error("--hidden must be a multiple of 128 (head_dim)")
    if args.vocab < LLAMA3_VOCAB:
        ap.error(f"--vocab must be at least {LLAMA3_VOCAB}, the Llama-3 tokenizer's size")

    shape = llama3_shape(args.hidden, args.ffn, args.vocab)
    tensors = tensor_shapes(
        "LlamaBidirectionalModel", hf_config("LlamaBidirectionalModel", layers=args.layers, **shape)
    )
    itemsize = ITEMSIZE[args.dtype]
    sizes = {name: math.prod(s) for name, s in tensors}
    n_params = sum(sizes.values())
    largest_name = max(sizes, key=sizes.__getitem__)
    largest = sizes[largest_name]
    ckpt_est, gguf_est = n_params * itemsize, n_params * 2 + GGUF_OVERHEAD
    need = int((ckpt_est + gguf_est) * 1.05)
    workdir = args.workdir.resolve() if args.workdir else None
    free = free_bytes(workdir or Path(tempfile.gettempdir()))
    print(
        f"Llama {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
        f"{args.dtype}: {n_params / 1e9:.2f} B params; checkpoint ~{ckpt_est / 1e9:.2f} GB + F16 GGUF "
        f"~{gguf_est / 1e9:.2f} GB; {free / 1e9:.1f} GB free"
    )
    if free < need:
        raise SystemExit(f"not enough disk: need ~{need / 1e9:.1f} GB for checkpoint + GGUF, have {free / 1e9:.1f} GB")

    created = workdir is None or not workdir.exists()
    workdir = workdir or Path(tempfile.mkdtemp(prefix="convert-memory-"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt, outdir, scratch = workdir / "llama-random", workdir / "out", workdir / "scratch"
    scratch.mkdir(exist_ok=True)
    try:
        print(f"building {ckpt}", flush=True)
        t0 = time.perf_counter()
        llama3_checkpoint(ckpt, args.layers, args.dtype, hidden=args.hidden, ffn=args.ffn, vocab=args.vocab)
        print(f"  built in {time.perf_counter() - t0:.1f} s", flush=True)
        print("converting", flush=True)
        run = run_convert(ckpt, outdir, scratch)
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
        gguf_bytes = run.gguf.stat().st_size
        peak = run.peak_rss_kb * 1024
        rows = [
            ("peak RSS of `runner convert`", f"{peak / MIB:,.0f} MiB  ({run.peak_source})"),
            ("  sampled peak VmRSS", f"{run.sampled.get('VmRSS', 0) / 1024:,.0f} MiB  (20 ms polling of /proc)"),
            ("  sampled peak RssAnon", f"{run.sampled.get('RssAnon', 0) / 1024:,.0f} MiB  (anonymous: numpy arrays)"),
            ("  sampled peak RssFile", f"{run.sampled.get('RssFile', 0) / 1024:,.0f} MiB  (file-backed: memmap, libs)"),
            ("", "(each sampled peak is its own maximum; they need not coincide)"),
            ("wall time", f"{run.wall_s:,.1f} s  (includes manifest sha256 of the GGUF)"),
            ("checkpoint (safetensors)", f"{ckpt_bytes:,} B  ({ckpt_bytes / MIB:,.0f} MiB)"),
            ("GGUF (F16)", f"{gguf_bytes:,} B  ({gguf_bytes / MIB:,.0f} MiB)"),
            (
                f"largest tensor ({largest_name})",
                f"{largest * itemsize / MIB:,.0f} MiB {args.dtype}, {largest * 4 / MIB:,.0f} MiB float32",
            ),
            ("peak RSS / checkpoint", f"{peak / ckpt_bytes:.3f}"),
            ("peak RSS / largest tensor (f32)", f"{peak / (largest * 4):.2f}"),
        ]
        width = max(len(k) for k, _ in rows)
        print()
        for key, value in rows:
            print(f"{key:<{width}}  {value}")
    finally:
        if args.keep:
            print(f"\nkept {workdir}")
        else:
            for path in (ckpt, outdir, scratch):
                shutil.rmtree(path, ignore_errors=True)
            if created:
                shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
