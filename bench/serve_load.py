"""A bounded load test of `runner serve` on loopback, against offline embedding of the same texts.

    python -m bench.serve_load [-m all-minilm-l6-v2] [--clients 64] [--request-texts 1-8] [--max-texts 1024]
        [--budget 100]

Runs over the same `tests.corpus` texts (seed 0), one after the other on the same machine:
1. offline: `runner embed`'s pipeline in this process (`open_pipeline(...).embed(texts)`), the ceiling;
   measured before the server starts and again after it stops, so a machine whose load drifts (other jobs
   on shared cores) is averaged out;
2. CLIENTS concurrent clients sending requests of REQUEST_TEXTS texts (1-8 by default, sizes seeded) to
   /v1/embeddings, base64 (what the official `openai` client asks for by default), each sending its next
   request when its last returns, over keep-alive connections (RawHttp: a lean client, since it shares the
   cores with the server it measures);
3. one sequential client sending one text per request.
The four timed runs share BUDGET seconds (less 15 for start-up): the number of texts is calibrated on the
offline speed so that one run takes a quarter of that (capped at MAX_TEXTS), and the sequential client stops
after its quarter. Every client gets at least one request, and a machine that slows down mid-run (shared
cores) overshoots.
Prints requests/s, texts/s, p50/p95/p99 latency and errors (must be 0) per run, the server's RSS at start
and end, served / offline and served / sequential texts/s (targets: >= 0.8 and >= 3), and the lowest cosine
between a served vector and the offline one (batching must not change results beyond float noise).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from planner.calibration import cpu_identity
from tests.corpus import corpus


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Run:
    name: str
    texts: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # one per request, seconds
    errors: int = 0

    def row(self) -> str:
        ms = sorted(x * 1000 for x in self.latencies)

        def pct(p: float) -> str:
            return f"{ms[min(len(ms) - 1, int(p / 100 * len(ms)))]:.0f}" if ms else ""

        requests = f"{len(ms)}" if ms else ""
        rps = f"{len(ms) / self.seconds:.1f}" if ms else ""
        return (
            f"| {self.name} | {requests} | {self.texts} | {self.seconds:.1f} | {rps} | "
            f"{self.texts / self.seconds:.1f} | {pct(50)} | {pct(95)} | {pct(99)} | {self.errors if ms else ''} |"
        )


def split_requests(n_texts: int, seed: int = 1, sizes: tuple[int, int] = (1, 8)) -> list[tuple[int, int]]:
    """(start, stop) slices of SIZES[0]-SIZES[1] texts (seeded) covering 0..N_TEXTS."""
    rng = random.Random(seed)
    out, start = [], 0
    while start < n_texts:
        stop = min(n_texts, start + rng.randint(*sizes))
        out.append((start, stop))
        start = stop
    return out


def request_sizes(spec: str) -> tuple[int, int]:
    """'1-8' -> (1, 8); '32' -> (32, 32)."""
    low, _, high = spec.partition("-")
    try:
        sizes = int(low), int(high or low)
    except ValueError:
        sizes = 0, 0
    if not 1 <= sizes[0] <= sizes[1]:
        raise SystemExit(f"--request-texts {spec!r}: give N or LOW-HIGH texts per request, e.g. 1, 32 or 1-8")
    return sizes


class RawHttp:
    """One keep-alive HTTP/1.1 connection over asyncio streams: POST a prepared body, read the answer.

    The load generator shares the machine's cores with the server it measures, so it should cost little:
    this costs about a tenth of what an `httpx.AsyncClient` request does (no request model, no header
    objects), and sends the same bytes a JSON client does. Answers must carry Content-Length (uvicorn's do).
    """

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").rstrip("/").rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        try:
            self.writer.write(head.encode() + body)
            status_line, *headers = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            fields = dict(h.lower().split(": ", 1) for h in headers if ": " in h)
            content = await self.reader.readexactly(int(fields["content-length"]))
        except (OSError, asyncio.IncompleteReadError, KeyError, ValueError):
            await self.close()
            raise
        if fields.get("connection") == "close":
            await self.close()
        return int(status_line.split()[1]), content

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def offline(pipe, texts: list[str]) -> tuple[Run, np.ndarray]:
    started = time.perf_counter()
    vectors = pipe.embed(texts)
    return Run("offline", len(texts), time.perf_counter() - started), vectors


class Server:
    def __init__(self, model: str, extra: list[str], logfile: Path) -> None:
        self.logfile = logfile
        with open(logfile, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "runner", "serve", "-m", model, "--port", "0", *extra],
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + 600
        while True:
            text = logfile.read_text(errors="replace")
            if (m := re.search(r"listening on (http://\S+);", text)) and "ready:" in text:
                self.url = m.group(1)
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"server did not start:\n{text[-2000:]}")
            time.sleep(0.1)

    def rss_mib(self) -> float:
        import psutil

        return psutil.Process(self.proc.pid).memory_info().rss / 2**20

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(120)


def decode_embeddings(content: bytes) -> list[tuple[int, np.ndarray]]:
    """(index, vector) of each item of an OpenAI embeddings answer, base64 or a list of floats."""
    out = []
    for d in json.loads(content)["data"]:
        e = d["embedding"]
        out.append((d["index"], np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str) else np.asarray(e)))
    return out


async def load(
    url: str,
    name: str,
    texts: list[str],
    slices: list[tuple[int, int]],
    clients: int,
    seconds: float,
    dims: int,
    body: dict | None = None,
) -> tuple[Run, np.ndarray]:
    """CLIENTS connections sending the requests of SLICES (OpenAI /v1/embeddings, base64 asked for; BODY: more
    fields), each its next request when its last returns, until all are sent or SECONDS have passed. Returns the
    run and the vectors received (NaN rows: not sent or failed). A one-text request sends `input` as a string."""
    run = Run(name)
    vectors = np.full((len(texts), dims), np.nan, np.float32)
    queue = iter(slices)
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        http = RawHttp(url)
        try:
            for start, stop in queue:
                if time.perf_counter() > deadline:
                    return
                data = texts[start] if stop - start == 1 else texts[start:stop]
                payload = json.dumps({"input": data, "encoding_format": "base64", **(body or {})}).encode()
                t = time.perf_counter()
                try:
                    status, content = await asyncio.wait_for(http.post("/v1/embeddings", payload), 300)
                    rows = decode_embeddings(content) if status == 200 else None
                except (TimeoutError, OSError, asyncio.IncompleteReadError, KeyError, ValueError):
                    rows = None
                run.latencies.append(time.perf_counter() - t)
                if rows is None or len(rows) != stop - start:
                    run.errors += 1
                    continue
                for index, vector in rows:
                    vectors[start + index] = vector[:dims] if len(vector) >= dims else np.nan
                run.texts += stop - start
        finally:
            await http.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    run.seconds = time.perf_counter() - started
    return run, vectors


def main() -> None:
    from runner.pipeline import open_pipeline

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default="all-minilm-l6-v2")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--request-texts", default="1-8", help="Texts per request: N, or LOW-HIGH (seeded sizes).")
    ap.add_argument("--max-texts", type=int, default=1024)
    ap.add_argument("--budget", type=float, default=100.0, help="About how many seconds the whole run may take.")
    ap.add_argument("--threads", type=int, help="Engine threads, offline and served (default: physical cores).")
    ap.add_argument("--server-args", default="", help="More `runner serve` options, e.g. '--max-batch-tokens 8192'.")
    args = ap.parse_args()
    sizes = request_sizes(args.request_texts)

    # Four timed runs share the budget (offline twice, concurrent, sequential) after start-up and warm-up.
    phase = (args.budget - 15) / 4
    load_start = os.getloadavg()[0]
    pool = corpus(args.max_texts + 32, seed=0)
    with open_pipeline(args.model, threads=args.threads) as pipe:
        pipe.embed(pool[-32:-24])  # warm-up: the first decode allocates
        calibration, _ = offline(pipe, pool[-24:])
        # Every client gets at least one request, even if that overshoots the budget on a slow machine.
        slices = split_requests(args.max_texts, sizes=sizes)
        floor = slices[min(args.clients, len(slices)) - 1][1]
        n = max(floor, min(args.max_texts, int(calibration.texts / calibration.seconds * phase)))
        texts = pool[:n]
        slices = split_requests(n, sizes=sizes)
        log(f"offline: {n} texts (calibrated: {calibration.texts / calibration.seconds:.1f} texts/s)")
        off1, reference = offline(pipe, texts)
    extra = shlex.split(args.server_args) + (["--threads", str(args.threads)] if args.threads else [])
    per = args.request_texts if sizes[0] != sizes[1] else str(sizes[0])
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(args.model, extra, Path(tmp) / "server.log")
        try:
            rss_start = server.rss_mib()
            import httpx

            httpx.post(server.url + "/v1/embeddings", json={"input": pool[-32:-24]}, timeout=300)  # warm-up
            log(f"{args.clients} concurrent clients")
            conc, served = asyncio.run(
                load(
                    server.url,
                    f"{args.clients} concurrent clients, {per} text(s)/request",
                    texts,
                    slices,
                    args.clients,
                    3 * phase,
                    reference.shape[1],
                )
            )
            log("sequential client")
            ones = [(i, i + 1) for i in range(n)]
            seq, _ = asyncio.run(
                load(server.url, "1 sequential client, 1 text/request", texts, ones, 1, phase, reference.shape[1])
            )
            rss_end = server.rss_mib()
        finally:
            rc = server.stop()
    log("offline again")
    with open_pipeline(args.model, threads=args.threads) as pipe:
        pipe.embed(pool[-32:-24])
        off2, _ = offline(pipe, texts)
    off = Run(
        "offline: `runner embed`'s pipeline in-process (mean of before and after)",
        off1.texts + off2.texts,
        off1.seconds + off2.seconds,
    )
    done = ~np.isnan(served).any(axis=1)
    cos = (served[done] * reference[done]).sum(axis=1)

    cpu = cpu_identity(1)["cpu"]
    print(f"python -m bench.serve_load {' '.join(sys.argv[1:])}".rstrip())
    print(
        f"model {args.model}; {len(texts)} texts of tests.corpus; {cpu}, {os.cpu_count()} cores; "
        f"load average {load_start:.1f} at start, {os.getloadavg()[0]:.1f} at end\n"
    )
    print("| run | requests | texts | seconds | requests/s | texts/s | p50 ms | p95 ms | p99 ms | errors |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in (conc, seq, off):
        print(run.row())
    conc_tps = conc.texts / conc.seconds
    print(
        f"\nserved / offline: {conc_tps / (off.texts / off.seconds):.2f}x (target >= 0.8; offline before "
        f"{off1.texts / off1.seconds:.1f}, after {off2.texts / off2.seconds:.1f} texts/s); "
        f"served / sequential: {conc_tps / (seq.texts / seq.seconds):.2f}x (target >= 3); "
        f"server RSS {rss_start:.0f} MiB at start, {rss_end:.0f} MiB at end; "
        f"lowest cosine served vs offline {cos.min():.6f} over {int(done.sum())} texts; server exit code {rc}"
    )
    if conc.errors or seq.errors or rc != 0:
        sys.exit(1)


if __name__ == "__main__":
    main()
