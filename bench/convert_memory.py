"""Peak memory of `runner convert` on a large random Llama checkpoint: does the converter stream?

Builds a random LlamaBidirectionalModel checkpoint (safetensors shards of ~2 GB, written one tensor at
a time without instantiating a torch model; Llama-3 tokenizer from tests/hf_tokenizers.py), converts it
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
import json
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

import numpy as np

DTYPE_BYTES = {"bf16": 2, "f16": 2, "f32": 4}
SHARD_BYTES = 2 * 10**9
HEAD_DIM = 128
LLAMA3_VOCAB = 128256  # tokens in the Llama-3 tokenizer (128000 BPE + 256 special)
GGUF_OVERHEAD = 64 * 2**20  # tokenizer metadata, rope factors, alignment padding
MIB = 2**20


@dataclass(frozen=True)
class Shape:
    layers: int
    hidden: int
    ffn: int
    vocab: int

    @property
    def heads(self) -> int:
        return self.hidden // HEAD_DIM

    @property
    def kv_heads(self) -> int:
        return min(8, self.heads)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(name, shape) of every tensor, as LlamaModel.save_pretrained names them (no "model." prefix)."""
        h, kv = self.hidden, self.kv_heads * HEAD_DIM
        out: list[tuple[str, tuple[int, ...]]] = [("embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"layers.{i}"
            out += [
                (f"{p}.self_attn.q_proj.weight", (h, h)),
                (f"{p}.self_attn.k_proj.weight", (kv, h)),
                (f"{p}.self_attn.v_proj.weight", (kv, h)),
                (f"{p}.self_attn.o_proj.weight", (h, h)),
                (f"{p}.mlp.gate_proj.weight", (self.ffn, h)),
                (f"{p}.mlp.up_proj.weight", (self.ffn, h)),
                (f"{p}.mlp.down_proj.weight", (h, self.ffn)),
                (f"{p}.input_layernorm.weight", (h,)),
                (f"{p}.post_attention_layernorm.weight", (h,)),
            ]
        out.append(("norm.weight", (h,)))
        return out

    def config(self, dtype: str) -> dict:
        return {
            "architectures": ["LlamaBidirectionalModel"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": HEAD_DIM,
            "hidden_act": "silu",
            "vocab_size": self.vocab,
            "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "max_position_embeddings": 131072,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "torch_dtype": {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}[dtype],
        }


def plan_shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Group tensors in order into shards of at most SHARD_BYTES (a bigger single tensor gets its own)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def build_checkpoint(dest: Path, shape: Shape, dtype: str, scratch: Path) -> None:
    """Write a random checkpoint into DEST, holding at most one shard's tensors in memory."""
    import torch
    from safetensors.torch import save_file

    from tests.hf_tokenizers import llama3_tokenizer_dir

    torch_dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[dtype]
    torch.manual_seed(0)
    dest.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(shape.tensors(), DTYPE_BYTES[dtype])
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards, 1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for name, tshape in shard:
            if len(tshape) == 1:  # RMSNorm weights
                tensors[name] = torch.ones(tshape, dtype=torch_dtype)
            else:
                tensors[name] = torch.empty(tshape, dtype=torch_dtype).normal_(0, 0.02)
            weight_map[name] = file
        save_file(tensors, dest / file, metadata={"format": "pt"})
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        total += nbytes
        del tensors
        # Progress on stderr: the benches that build checkpoints print their tables on stdout.
        print(f"  {file}: {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (dest / "config.json").write_text(json.dumps(shape.config(dtype), indent=2) + "\n")
    tok = llama3_tokenizer_dir(scratch / "tokenizer")
    for f in tok.iterdir():
        if f.is_file():
            shutil.copy2(f, dest / f.name)
    shutil.rmtree(tok)


def llama8b_ggufs(workdir: Path, layers: int, quants: list[str]) -> dict[str, Path]:
    """{quant: GGUF} ("F16" or a ladder quant) of a random Llama-3.1-8B-shaped checkpoint cut to LAYERS
    layers, each file built once in WORKDIR and reused after. Progress goes to stderr."""

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    from quantize.convert import convert
    from quantize.ladder import quant_path, quantize
    from quantize.progress import Progress

    ckpt = workdir / f"llama-8b-shape-{layers}l"
    if not (ckpt / "config.json").is_file():
        progress(f"building {ckpt}")
        build_checkpoint(ckpt, Shape(layers, 4096, 14336, 128256), "bf16", workdir)
    f16 = workdir / "gguf" / f"{ckpt.name}-F16.gguf"
    if not f16.is_file():
        f16 = convert(str(ckpt), workdir / "gguf", "f16")
    missing = [q for q in quants if q != "F16" and not quant_path(f16, q).is_file()]
    if missing:
        quantize(f16, missing, f16.parent, progress=Progress(say=progress))
    return {q: f16 if q == "F16" else quant_path(f16, q) for q in quants}


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
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="checkpoint dtype")
    ap.add_argument("--workdir", type=Path, help="default: a new directory under $TMPDIR")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUF")
    args = ap.parse_args(argv)
    if args.hidden % HEAD_DIM:
        ap.error(f"--hidden must be a multiple of {HEAD_DIM}")
    if args.vocab < LLAMA3_VOCAB:
        ap.error(f"--vocab must be at least {LLAMA3_VOCAB}, the Llama-3 tokenizer's size")

    shape = Shape(args.layers, args.hidden, args.ffn, args.vocab)
    tensors = shape.tensors()
    itemsize = DTYPE_BYTES[args.dtype]
    n_params = sum(int(np.prod(s)) for _, s in tensors)
    largest_name, largest_shape = max(tensors, key=lambda t: int(np.prod(t[1])))
    largest = int(np.prod(largest_shape))
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
        build_checkpoint(ckpt, shape, args.dtype, scratch)
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
