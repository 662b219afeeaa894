"""Cross-request batching for `runner serve`: one engine thread, many requests, one engine call per batch.

llama.cpp's contexts are not thread-safe, so one worker thread, the engine thread, owns the pipeline: it loads
the model and packs the tokens of all waiting requests into one `Pipeline.vectors` call of at most
`max_batch_tokens`, then hands each request its rows. A second thread, the tokenizer, tokenizes every request
as it arrives (each on its own, so one bad request fails alone), while the engine embeds the ones before it:
the engine thread runs engine calls and little else (tokenizing reads the vocabulary only; llama.cpp's own
server tokenizes in its HTTP threads too). Requests that arrive while the engine is busy wait and go together
into the next call: 64 clients sending one text each cost about what one client sending 64 does. A request's
future stays cancellable until its engine call starts, so the work of a client that hung up is dropped, not
embedded.

No HTTP here: the server maps what this raises to statuses (runner.serve.protocol.STATUS).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import numpy as np

from quantize.errors import EngineError

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
    """The model is still loading, failed to load, the engine stopped, or the server is shutting down."""


@dataclass(eq=False)
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

    LOAD opens the pipeline (in the worker thread, which then owns it). ON_LOADED(pipeline) says it is ready;
    ON_FAILED(exception) that it failed to load, or that the engine or the tokenizer thread died later (anything
    it raised, BaseException included: a panic in the tokenizer's Rust code is one) — then every request
    admitted and not in an engine call gets an EngineError, and the server should exit. ON_BATCH(BatchEvent)
    reports each engine call.
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
        self.crash: BaseException | None = None  # what killed the engine thread after loading
        self.ready = threading.Event()
        self._cond = threading.Condition()
        self._waiting: list[Job] = []  # submitted, for the tokenizer thread
        self._tokenized: deque = deque()  # (job, Tokenized) in arrival order, for the engine thread
        self._tokenizing = False  # the tokenizer thread holds jobs taken from _waiting
        self._admitted: set[Future] = set()  # accepted and not yet answered: what --max-queue bounds
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._tokenizer = threading.Thread(target=self._tokenize_loop, name="tokenizer", daemon=True)

    # --- any thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return len(self._admitted)

    @property
    def state(self) -> str:
        """'loading', 'ready', or why it serves nothing: 'failed' (to load) or 'stopped' (the engine died)."""
        if self.ready.is_set():
            return "ready"
        if self.load_error is not None:
            return "failed"
        return "stopped" if self.crash is not None else "loading"

    def check_ready(self) -> None:
        """A NotReady saying why, unless the model is loaded and the engine running."""
        if not self.ready.is_set():
            raise NotReady(
                {
                    "loading": "the model is still loading",
                    "failed": "the model failed to load",
                    "stopped": "the engine stopped; the server is exiting",
                }[self.state]
            )

    def submit(self, job: Job) -> Future:
        """Queue JOB; its future gets a Result, or the BadInput/EngineError that failed it."""
        self.check_ready()
        with self._cond:
            if self._stopping:
                raise NotReady("the server is shutting down")
            if len(self._admitted) >= self.max_queue:
                raise QueueFull(f"{len(self._admitted)} requests in flight, the limit of --max-queue {self.max_queue}")
            self._admitted.add(job.future)
            self._waiting.append(job)
            self._cond.notify_all()  # the tokenizer thread; the engine thread, waiting too, goes back to sleep
        job.future.add_done_callback(self._release)
        return job.future

    def _release(self, future: Future) -> None:
        with self._cond:
            self._admitted.discard(future)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was submitted, then close the pipeline. A worker still loading is left behind."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self.ready.is_set():
            self._thread.join(timeout)

    # --- the worker thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.pipeline = self._load()
            self._on_loaded(self.pipeline)  # before `ready`: a request that sees ready finds the model's names set
        except BaseException as e:  # reported to the server, which exits with it
            self.load_error = e
            self._on_failed(e)
            if self.pipeline is not None:
                self.pipeline.close()
            return
        self._tokenizer.start()
        self.ready.set()
        try:
            self._loop()
        except BaseException as e:  # the engine thread is dying: nobody would ever answer what is admitted
            self._fail_all(e)
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._tokenizer.join()  # it reads the pipeline's vocabulary: not closed under it
            self.pipeline.close()

    def _fail_all(self, cause: BaseException) -> None:
        """A worker thread is dying: fail every request admitted, less those in an engine call running now
        (that call still answers them), and tell the server."""
        with self._cond:
            if self.crash is not None:
                return
            self.crash = cause
            self.ready.clear()
            self._stopping = True
            self._waiting = []
            self._tokenized.clear()
            admitted = [f for f in self._admitted if not f.running() or threading.current_thread() is self._thread]
            self._cond.notify_all()
        why = (str(cause).splitlines() or [""])[0][:200]
        error = EngineError(f"the engine stopped ({type(cause).__name__}: {why}); the server is exiting")
        for future in admitted:
            _settle(future.set_exception, error)
        self._on_failed(cause)

    def _tokenize_loop(self) -> None:
        """The tokenizer thread: each submitted request's tokens, in arrival order, onto the engine's queue."""
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._stopping:
                        self._cond.wait()
                    if not self._waiting:
                        return  # stopping, and all that was submitted is tokenized
                    arrived, self._waiting = self._waiting, []
                    self._tokenizing = True
                done = []
                for job in arrived:
                    if job.future.cancelled():
                        continue  # the client went away before its turn
                    try:
                        done.append((job, self._tokenize(job)))
                    except Exception as e:  # BadInput: this request's 400; the others go on
                        _settle(job.future.set_exception, e)
                with self._cond:
                    self._tokenizing = False
                    if self.crash is None:
                        self._tokenized.extend(done)
                    self._cond.notify_all()
        except BaseException as e:  # a panic in the tokenizer: nobody would ever tokenize what is admitted
            with self._cond:
                self._tokenizing = False
            self._fail_all(e)

    def _drained(self) -> bool:
        """Stopping, and nothing submitted is left to tokenize (under _cond)."""
        return self._stopping and not self._waiting and not self._tokenizing

    def _loop(self) -> None:
        tokenized = self._tokenized
        while True:
            with self._cond:
                while not tokenized and not self._drained():
                    self._cond.wait()
                if self.crash is not None:
                    return
                # Requests whose clients hung up while they waited for the engine leave the queue unembedded.
                live = [item for item in tokenized if not item[0].future.cancelled()]
                tokenized.clear()
                if not live:
                    if self._drained():
                        return
                    continue
                n = next_batch([tok.tokens for _, tok in live], self.max_batch_tokens)
                batch = live[:n]
                tokenized.extend(live[n:])
            # From here a future can no longer be cancelled: its engine call is starting.
            batch = [(job, tok) for job, tok in batch if _start(job.future)]
            if batch:
                self._embed(batch)

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
                _settle(batch[0][0].future.set_exception, e)
            return
        self._on_batch(BatchEvent(len(batch), len(whole), whole.tokens, time.perf_counter() - started))
        row = 0
        for job, tok in batch:
            _settle(job.future.set_result, Result(vectors[row : row + len(tok)], tok.tokens, tok.truncated))
            row += len(tok)


def _start(future: Future) -> bool:
    """Mark FUTURE running; False if its client cancelled it, or a dying tokenizer thread failed it, meanwhile."""
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # already failed
        return False


def _settle(set_outcome: Callable[[object], None], outcome: object) -> None:
    """Answer a future that its client may have cancelled, or a dying thread failed, meanwhile (then there is
    nobody to tell, or the answer is given)."""
    try:
        set_outcome(outcome)
    except InvalidStateError:
        pass
