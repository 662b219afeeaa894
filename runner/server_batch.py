"""Cross-request batching for `runner serve`: one engine thread, many requests, one engine call per batch.

llama.cpp is not thread-safe, so one worker thread owns the pipeline: it loads the model, tokenizes every
request (each on its own, so one bad request fails alone) and packs the tokens of all waiting requests into
one `Pipeline.vectors` call of at most `max_batch_tokens`, then hands each request its rows. Requests that
arrive while the engine is busy wait and go together into the next call: 64 clients sending one text each
cost about what one client sending 64 does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

# OpenAI numbers inputs from 0 (data[].index); the pipeline names input first_index + i + 1.
FIRST_INDEX = -1


def next_batch(token_counts: Sequence[int], max_tokens: int) -> int:
    """How many requests from the head of the queue go into the next engine call.

    Requests keep their arrival order; they are added while their tokens fit in MAX_TOKENS, and the first
    one always goes (a request larger than the budget runs alone rather than never).

    >>> next_batch([100, 200, 300], 350)
    2
    >>> next_batch([900, 10], 500)
    1
    """
    total, n = 0, 0
    for count in token_counts:
        if n and total + count > max_tokens:
            break
        total += count
        n += 1
    return n


class QueueFull(Exception):
    """More requests waiting or being embedded than --max-queue allows."""


class NotReady(Exception):
    """The model is still loading (or failed to load)."""


@dataclass
class Job:
    """One request: its texts (or token ids) and how to tokenize them; the result arrives in `future`."""

    texts: list[str] | None = None
    ids: list[list[int]] | None = None
    query: bool = False
    truncate: bool = True
    future: Future = field(default_factory=Future)


@dataclass(frozen=True)
class Result:
    vectors: np.ndarray  # float32, one L2-normalised row per input, in input order
    tokens: int  # tokens sent to the engine for this request (after truncation)
    truncated: int


@dataclass(frozen=True)
class BatchEvent:
    """What one engine call did, for /metrics."""

    requests: int
    sequences: int
    tokens: int
    seconds: float


class Batcher:
    """The engine worker. `submit` from any thread; the worker thread does everything that touches llama.cpp.

    LOAD opens the pipeline (in the worker thread, which then owns it). ON_LOADED(pipeline) or
    ON_FAILED(exception) tell the server how loading went; ON_BATCH(BatchEvent) reports each engine call.
    """

    def __init__(
        self,
        load: Callable[[], object],
        *,
        max_batch_tokens: int,
        max_queue: int,
        on_loaded: Callable[[object], None] = lambda pipe: None,
        on_failed: Callable[[BaseException], None] = lambda e: None,
        on_batch: Callable[[BatchEvent], None] = lambda e: None,
    ) -> None:
        self._load = load
        self.max_batch_tokens = max_batch_tokens
        self.max_queue = max_queue
        self._on_loaded, self._on_failed, self._on_batch = on_loaded, on_failed, on_batch
        self.pipeline = None
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self._cond = threading.Condition()
        self._waiting: list[Job] = []
        self._admitted = 0  # requests accepted and not yet answered: what --max-queue bounds
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    # --- any thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return self._admitted

    def submit(self, job: Job) -> Future:
        """Queue JOB; its future gets a Result, or the BadInput/EngineError that failed it."""
        if not self.ready.is_set():
            raise NotReady("the model is still loading" if self.load_error is None else "the model failed to load")
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if self._admitted >= self.max_queue:
                raise QueueFull(f"{self._admitted} requests in flight, the limit of --max-queue {self.max_queue}")
            self._admitted += 1
            self._waiting.append(job)
            self._cond.notify()
        job.future.add_done_callback(self._release)
        return job.future

    def _release(self, _: Future) -> None:
        with self._cond:
            self._admitted -= 1

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then close the pipeline. A worker still loading is left behind."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self.ready.is_set():
            self._thread.join(timeout)

    # --- the worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.pipeline = self._load()
        except BaseException as e:  # reported to the server, which exits with it
            self.load_error = e
            self._on_failed(e)
            return
        self._on_loaded(self.pipeline)  # before `ready`: a request that sees ready finds the model's names set
        self.ready.set()
        try:
            self._loop()
        finally:
            self.pipeline.close()

    def _loop(self) -> None:
        tokenized: deque = deque()  # (job, Tokenized) in arrival order, waiting for an engine call
        while True:
            with self._cond:
                while not self._waiting and not tokenized and not self._stopping:
                    self._cond.wait()
                if self._stopping and not self._waiting and not tokenized:
                    return
                arrived, self._waiting = self._waiting, []
            for job in arrived:
                if not job.future.set_running_or_notify_cancel():
                    continue  # the client went away before its turn
                try:
                    tokenized.append((job, self._tokenize(job)))
                except Exception as e:  # BadInput: this request's 400; the others go on
                    job.future.set_exception(e)
            n = next_batch([tok.tokens for _, tok in tokenized], self.max_batch_tokens)
            if n:
                self._embed([tokenized.popleft() for _ in range(n)])

    def _tokenize(self, job: Job):
        pipe = self.pipeline
        if job.ids is not None:
            return pipe.from_token_ids(job.ids, truncate=job.truncate, first_index=FIRST_INDEX)
        return pipe.tokenize(job.texts, query=job.query, truncate=job.truncate, first_index=FIRST_INDEX)

    def _embed(self, batch: list) -> None:
        from runner.pipeline import Tokenized

        started = time.perf_counter()
        whole = Tokenized.concat([tok for _, tok in batch])
        try:
            vectors = self.pipeline.vectors(whole, normalize=True, first_index=FIRST_INDEX)
        except Exception as e:
            if len(batch) > 1:
                # Whatever failed belongs to one request: run them one by one so only that one fails.
                for item in batch:
                    self._embed([item])
            else:
                batch[0][0].future.set_exception(e)
            return
        self._on_batch(BatchEvent(len(batch), len(whole), whole.tokens, time.perf_counter() - started))
        row = 0
        for job, tok in batch:
            job.future.set_result(Result(vectors[row : row + len(tok)], tok.tokens, tok.truncated))
            row += len(tok)
