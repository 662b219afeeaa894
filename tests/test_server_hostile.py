"""`runner serve` against hostile and careless clients, and the server as a unit: what it answers, what it
leaves behind in its process, and how it stops.

The app is driven in-process (Starlette's TestClient, a real MiniLM pipeline or a fake one) where HTTP alone
is under test; a real server in a subprocess where sockets, signals and exit codes are."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from starlette.testclient import TestClient

from quantize.errors import BadInput, EngineError
from runner.serve import Limits, serve
from runner.serve.app import Served, create_app
from runner.serve.batcher import Batcher, Job, NotReady
from runner.serve.metrics import Metrics
from runner.serve.protocol import Access, Forbidden, TooLarge, parse_json, parse_openai
from tests.conftest import run_cli
from tests.test_server import LONG, MINILM, serving

# --- the app in-process --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_gguf() -> Path:
    return Path(run_cli("convert", MINILM).stdout.strip())


@contextmanager
def app_client(load, access: Access | None = None, **limits) -> Iterator[TestClient]:
    """The app over the pipeline LOAD returns, its engine thread running, called as http://localhost."""
    served = Served()
    batcher = Batcher(load, max_batch_tokens=4096, max_queue=64, on_loaded=served.loaded)
    metrics = Metrics(lambda: batcher.in_flight)
    app = create_app(batcher, served, metrics, Limits(**limits), access or Access())
    with TestClient(app, base_url="http://localhost") as client:
        assert batcher.ready.wait(120), batcher.load_error
        yield client


@pytest.fixture(scope="module")
def minilm_app(minilm_gguf) -> Iterator[TestClient]:
    from runner.pipeline import open_pipeline

    # -m given as an absolute path: no answer may carry it.
    with app_client(lambda: open_pipeline(str(minilm_gguf)), max_client_batch=8) as client:
        yield client


def test_one_token_id_array_is_one_input(minilm_app) -> None:
    """19.1: an array of 300 token ids is one input, not 300 against --max-client-batch (8 here)."""
    assert len(parse_openai({"input": list(range(1, 301))}, 8)) == 1
    with pytest.raises(TooLarge):
        parse_openai({"input": [[101, 102]] * 9}, 8)
    r = minilm_app.post("/v1/embeddings", json={"input": [101] + [1996] * 298 + [102]})
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1 and r.json()["usage"]["prompt_tokens"] == 256  # cut at MiniLM's length


def test_unknown_api_paths_answer_in_ollamas_shape(minilm_app) -> None:
    """19.6: Ollama's clients read `error` as a string."""
    r = minilm_app.get("/api/nothing")
    assert r.status_code == 404 and r.json() == {"error": "GET /api/nothing: Not Found"}
    r = minilm_app.get("/api/embed")
    assert r.status_code == 405 and isinstance(r.json()["error"], str)
    r = minilm_app.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_unknown_model_answer_names_no_path(minilm_app, minilm_gguf) -> None:
    """20.15: the 404 lists the served names, never the -m path."""
    for path, body in [
        ("/v1/embeddings", {"input": "a", "model": "gpt-4"}),
        ("/api/embed", {"input": "a", "model": "x"}),
    ]:
        r = minilm_app.post(path, json=body)
        assert r.status_code == 404, r.text
        assert str(minilm_gguf.parent) not in r.text and "all-minilm-l6-v2" in r.text, r.text
    # Nor is the path a model name (the answer echoes what the client sent, and only that).
    assert minilm_app.post("/v1/embeddings", json={"input": "a", "model": str(minilm_gguf)}).status_code == 404
    assert minilm_app.post("/v1/embeddings", json={"input": "a", "model": f"{MINILM}-F16"}).status_code == 200


HOSTILE_BODIES = {
    # name: (raw body, what the 400's message says)
    "lone-surrogate": (b'{"input": ["fine", "\\ud800"]}', "input 1: not valid Unicode: a lone surrogate"),
    "lone-surrogate-ollama": (b'{"input": "a\\udfffb"}', "input 0: not valid Unicode: a lone surrogate"),
    "5000-digit-integer": (b'{"input": [[' + b"7" * 5000 + b"]]}", "5000-digit number"),
    "5000-digit-dimensions": (b'{"input": "a", "dimensions": ' + b"9" * 5000 + b"}", "5000-digit number"),
    "nested-100000-deep": (
        b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "nests arrays or objects too deeply",
    ),
    "negative-token-id": (b'{"input": [[101, -' + b"9" * 19 + b", 102]]}", "token id out of range"),
}


@pytest.mark.parametrize("case", HOSTILE_BODIES)
def test_hostile_json_is_a_400_naming_it(minilm_app, case: str) -> None:
    """20.16: valid-but-hostile JSON is the client's error, with a message that says which; never a 500."""
    body, says = HOSTILE_BODIES[case]
    path = "/api/embed" if case.endswith("ollama") else "/v1/embeddings"
    r = minilm_app.post(path, content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert says in (error if isinstance(error, str) else error["message"]), error


def test_json_bounds_are_in_the_parser() -> None:
    assert parse_json(b'{"input": [' + b"1" * 20 + b"]}")["input"] == [int("1" * 20)]
    with pytest.raises(Exception, match="21-digit number"):
        parse_json(b'{"input": [' + b"1" * 21 + b"]}")


# --- who may call (20.11, 20.14) ---------------------------------------------------------------------------


def test_empty_api_key_is_refused_before_anything_loads(tmp_path) -> None:
    with pytest.raises(BadInput, match="--api-key .*is empty"):
        Access(api_key="")
    for args, env in [(["--api-key", ""], {}), ([], {"RUNNER_API_KEY": ""}), (["--api-key", "  "], {})]:
        proc = run_cli("serve", "-m", str(tmp_path / "none.gguf"), "--port", "0", *args, env=env, check=False)
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "is empty" in lines[0] and "listening" not in proc.stderr, proc.stderr


def _fake_load():
    return FakePipeline()


def test_host_header_must_name_this_server() -> None:
    """DNS rebinding: a page at attacker.example whose name resolves to 127.0.0.1 sends `Host: attacker.example`."""
    access = Access(bound_host="127.0.0.1", allowed_hosts=("embed.lan", ".corp.example"))
    with app_client(_fake_load, access=access) as c:
        for host in ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "10.1.2.3", "LOCALHOST.", "a.localhost",
                     "embed.lan:8080", "gpu1.corp.example"]:  # fmt: skip
            r = c.post("/v1/embeddings", json={"input": "a"}, headers={"host": host})
            assert r.status_code == 200, (host, r.text)
        for host in ["attacker.example", "attacker.example:8080", "127.0.0.1.nip.io", "localhost.attacker.example",
                     "corp.example.evil", "embed.lan.evil"]:  # fmt: skip
            for path in ["/v1/embeddings", "/api/embed", "/health", "/metrics", "/v1/models"]:
                r = c.post(path, json={"input": "a"}, headers={"host": host})
                assert r.status_code == 403, (host, path, r.text)
                error = r.json()["error"]
                assert "--allowed-hosts" in (error if path.startswith("/api/") else error["message"])
    with app_client(_fake_load, access=Access(allowed_hosts=("*",))) as c:
        assert c.get("/health", headers={"host": "anything.example"}).status_code == 200


def test_origin_of_other_sites_is_refused_and_cors_only_where_asked() -> None:
    """A page on another site may not make the server work for it; CORS headers only for --cors-origin."""
    with app_client(_fake_load) as c:
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"origin": "https://attacker.example"})
        assert r.status_code == 403 and "--cors-origin https://attacker.example" in r.json()["error"]["message"]
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"origin": "null"})
        assert r.status_code == 403
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"origin": "http://localhost:3000"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with app_client(_fake_load, access=Access(cors_origins=("https://app.example",))) as c:
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"origin": "https://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
        preflight = {"origin": "https://app.example", "access-control-request-method": "POST",
                     "access-control-request-headers": "authorization, content-type"}  # fmt: skip
        assert c.options("/v1/embeddings", headers=preflight).status_code == 200
        r = c.post("/v1/embeddings", json={"input": "a"}, headers={"origin": "https://other.example"})
        assert r.status_code == 403


def test_host_check_unit() -> None:
    access = Access(bound_host="myhost.local")
    access.check_caller("myhost.local:8080", None)
    access.check_caller("", None)  # HTTP/1.0 without Host: no browser sends that
    with pytest.raises(Forbidden):
        access.check_caller("otherhost.local", None)


# --- the process: metrics, signals, exit codes (19.4, 19.5, 20.13) ----------------------------------------


def test_metrics_leave_prometheus_process_settings_alone() -> None:
    """19.5: a Metrics registry of its own, and nothing process-wide changed (another library's counters
    keep their `_created` series)."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    metrics = Metrics(lambda: 0)
    metrics.requests.labels("/v1/embeddings", "200").inc()
    assert b"_created" not in metrics.text()[0] and b"embedrunner_requests_total" in metrics.text()[0]
    other = CollectorRegistry()
    Counter("other_library_events", "x", registry=other).inc()
    assert b"other_library_events_created" in generate_latest(other)


def test_serve_puts_back_the_signal_handlers_it_found(tmp_path) -> None:
    """19.4: serve() as a library call leaves SIGINT/SIGTERM as it found them (here: a model that fails to load)."""
    mine = lambda *_: None  # noqa: E731
    before = signal.signal(signal.SIGTERM, mine), signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Exception, match="no such file|not found"):
            serve(str(tmp_path / "missing.gguf"), port=0)
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGINT) is before[1]
    finally:
        signal.signal(signal.SIGTERM, before[0])


def test_sigterm_right_after_listening_stops_cleanly(minilm_gguf, tmp_path) -> None:
    """20.13: the handlers are in place before the port is bound, so a stop in the first moments exits 0."""
    log = tmp_path / "early.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve", "--port", "0", "-m", str(minilm_gguf)],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    deadline = time.monotonic() + 120
    while "listening on" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 0, log.read_text()
    assert log.read_text().rstrip().endswith("info: stopped"), log.read_text()


# --- the engine thread dies (19.2) -------------------------------------------------------------------------


class Panic(BaseException):
    """What a panic in the tokenizer's Rust code raises: not an Exception."""


class FakePipeline:
    """Tokens = the text's bytes; vectors = [length, 1]; "panic" raises Panic; "slow" takes a while."""

    def __init__(self) -> None:
        from runner.model import Prompts, ResolvedModel

        # An empty file: the server lists its size and time, and never shows its path to a client.
        path = Path(tempfile.mkdtemp(prefix="secret-")) / "fake-F16.gguf"
        path.touch()
        self.model = ResolvedModel(path, Prompts.plain(), None, None, "fake", "F16", "mean")
        self.embedded: list[list[bytes]] = []
        self.started = threading.Event()

    def tokenize(self, texts, *, query, truncate, first_index):
        from runner.pipeline import Tokenized

        if "panic" in texts:
            raise Panic("tokenizer panicked")
        return Tokenized([np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts], [0] * len(texts))

    def check_dimensions(self, dims):
        return dims

    def vectors(self, tok, *, normalize, first_index):
        texts = [bytes(s.astype(np.uint8)) for s in tok.seqs]
        self.started.set()
        if b"slow" in texts:
            time.sleep(1.0)
        self.embedded.append(texts)
        return np.array([[len(s), 1] for s in tok.seqs], np.float32)

    def close(self) -> None:
        pass


def test_engine_thread_death_fails_what_is_pending_and_says_so() -> None:
    failed: list[BaseException] = []
    pipe = FakePipeline()
    batcher = Batcher(lambda: pipe, max_batch_tokens=1000, max_queue=100, on_failed=failed.append)
    batcher.start()
    assert batcher.ready.wait(10)
    slow = batcher.submit(Job(texts=["slow"]))
    assert pipe.started.wait(10)
    waiting = [batcher.submit(Job(texts=[f"text {i}"])) for i in range(3)]
    panic = batcher.submit(Job(texts=["panic"]))
    assert slow.result(10).vectors.tolist() == [[4, 1]]
    for future in [*waiting, panic]:  # before: they waited forever
        error = future.exception(10)
        assert isinstance(error, EngineError) and "Panic: tokenizer panicked" in str(error), error
    assert batcher.state == "stopped" and len(failed) == 1 and isinstance(failed[0], Panic)
    with pytest.raises(NotReady, match="the engine stopped"):
        batcher.submit(Job(texts=["after"]))
    assert batcher.in_flight == 0


def test_engine_thread_death_turns_health_to_503() -> None:
    with app_client(_fake_load) as c:
        assert c.get("/health").json()["status"] == "ok"
        r = c.post("/v1/embeddings", json={"input": ["panic"]})
        assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error", r.text
        health = c.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "stopped"}
        r = c.post("/api/embed", json={"input": "a"})
        assert r.status_code == 503 and "the engine stopped" in r.json()["error"]


PANICKING_SERVER = """
import sys
from runner import pipeline

class Panic(BaseException):
    pass

tokenize = pipeline.Pipeline.tokenize

def panicking(self, texts, **options):
    if "panic" in texts:
        raise Panic("tokenizer panicked")
    return tokenize(self, texts, **options)

pipeline.Pipeline.tokenize = panicking
from runner.cli import main
main(["serve", *sys.argv[1:]])
"""


def test_server_exits_non_zero_when_its_engine_dies(minilm_gguf, tmp_path) -> None:
    """19.2 end to end: the panicking request and those queued behind it get 500s, and the process exits 1 with
    one line saying why (a supervisor restarts it)."""
    script = tmp_path / "panicking_server.py"
    script.write_text(PANICKING_SERVER)
    log = tmp_path / "panic.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, str(script), "--port", "0", "-m", str(minilm_gguf), "--max-batch-tokens", "256"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=Path(__file__).parent.parent,
        )
    try:
        url = _wait_ready(proc, log)
        with ThreadPoolExecutor(6) as pool:
            queued = [pool.submit(httpx.post, url + "/v1/embeddings", json={"input": [LONG] * 4}, timeout=120)
                      for _ in range(5)]  # fmt: skip
            time.sleep(0.2)
            panic = httpx.post(url + "/v1/embeddings", json={"input": ["panic"]}, timeout=120)
            answers = [f.result() for f in queued]
        assert panic.status_code == 500 and "Panic: tokenizer panicked" in panic.json()["error"]["message"]
        assert {r.status_code for r in answers} <= {200, 500, 503}, [r.text for r in answers]
        assert proc.wait(60) == 1, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("error: the engine stopped (Panic: tokenizer panicked)"), log.read_text()[-2000:]


def _wait_ready(proc: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 120
    while True:
        text = log.read_text(errors="replace")
        if (url := re.search(r"listening on (http://\S+);", text)) and "ready:" in text:
            return url.group(1)
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"server did not start (exit {proc.poll()}):\n{text[-3000:]}")
        time.sleep(0.05)


# --- clients that hang up or stall (20.10, 20.12) -----------------------------------------------------------


def test_queued_work_of_a_client_that_hung_up_is_dropped() -> None:
    """The batcher: a request tokenized and waiting for its engine call is still cancellable, and then skipped."""
    pipe = FakePipeline()
    batcher = Batcher(lambda: pipe, max_batch_tokens=4, max_queue=100)
    batcher.start()
    assert batcher.ready.wait(10)
    slow = batcher.submit(Job(texts=["slow"]))
    assert pipe.started.wait(10)
    # Both arrive while the first runs, are tokenized together after it, and only the first of them fits the
    # next call: "gone" waits in the tokenized queue while that call (slow too) runs.
    after, gone = batcher.submit(Job(texts=["slow"])), batcher.submit(Job(texts=["gone"]))
    slow.result(10)
    deadline = time.monotonic() + 10
    while not after.running() and not after.done() and time.monotonic() < deadline:
        time.sleep(0.001)
    assert gone.cancel(), "a request waiting for the engine could not be cancelled"
    after.result(10)
    batcher.stop()
    assert [b"gone"] not in pipe.embedded, pipe.embedded


def test_requests_of_clients_that_hung_up_are_not_embedded(minilm_gguf, tmp_path) -> None:
    """End to end: clients that give up while the engine is busy cost the engine nothing."""

    def give_up(i: int) -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/embeddings", json={"input": [f"abandoned {i}"] * 50}, timeout=0.5)

    with serving(tmp_path, "-m", str(minilm_gguf)) as s:
        requests_before = s.metric("embedrunner_batch_requests_sum")
        with ThreadPoolExecutor(7) as pool:
            busy = pool.submit(httpx.post, s.url + "/v1/embeddings", json={"input": [LONG] * 24}, timeout=600)
            deadline = time.monotonic() + 60
            while not s.metric("embedrunner_queue_depth") and time.monotonic() < deadline:
                time.sleep(0.01)
            list(pool.map(give_up, range(6)))  # all six give up long before the engine is free
            assert busy.result().status_code == 200
        assert s.embed(["after them"]).shape == (1, 384)
        assert s.metric("embedrunner_batch_requests_sum") - requests_before == 2  # the busy one and the last
        text = httpx.get(s.url + "/metrics").text
        assert 'embedrunner_requests_total{endpoint="/v1/embeddings",status="499"} 6.0' in text


def test_stalled_body_does_not_hold_the_stop(minilm_gguf, tmp_path) -> None:
    """20.12: a client that sent half a body and stalled gets a 503 when the server stops; the server exits 0."""
    with serving(tmp_path, "-m", str(minilm_gguf)) as s:
        host, port = s.url.removeprefix("http://").rsplit(":", 1)
        stalled = socket.create_connection((host, int(port)))
        stalled.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b'Content-Length: 1000\r\n\r\n{"input": "half a'
        )
        time.sleep(0.5)
        started = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(30) == 0
        assert time.monotonic() - started < 10
        stalled.settimeout(10)
        answer = stalled.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 503") and "the server is stopping" in answer, answer


# --- long inputs (20.8) -------------------------------------------------------------------------------------


def test_a_15mb_text_costs_the_server_little_memory(minilm_gguf, tmp_path) -> None:
    """20.8: a 15 MB string is cut before it is tokenized (it lifted the server's RSS by 1.6 GB)."""
    with serving(tmp_path, "-m", str(minilm_gguf)) as s:
        s.embed(["warm up"])
        before = _peak_rss(s.proc.pid)
        text = "the quick brown fox jumps over the lazy dog " * (15 * 2**20 // 44)
        r = httpx.post(s.url + "/v1/embeddings", json={"input": text}, timeout=120)
        assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 256
        grown = _peak_rss(s.proc.pid) - before
        assert grown < 250 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"
        r = httpx.post(s.url + "/v1/embeddings", json={"input": text + " more", "truncate": "NONE"}, timeout=120)
        assert r.status_code == 400 and "more than 256 tokens, over the limit" in r.json()["error"]["message"]


def _peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024
