"""`runner serve`: an OpenAI- and Ollama-compatible embedding server over the one embedding pipeline.

    runner serve -m all-minilm-l6-v2            # http://127.0.0.1:8080/v1/embeddings, /api/embed

A unit of its own, which never imports the CLI: `protocol` (wire formats, who may call, the one table from
error to HTTP status), `batcher` (the engine thread and cross-request batching, no HTTP), `app` (routes),
`metrics` (Prometheus), `limits` (the bounds and their defaults) and `serve` here, the process around them.

SIGINT and SIGTERM are caught from the moment `serve` starts: the port is bound (a port in use fails at
once, not after a long model load), /health answers 503 while the engine thread loads the model through
`open_pipeline` (the same path as `runner embed`), and a stop finishes every request admitted (within
Limits.shutdown_timeout), then returns; the handlers it found are put back.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from quantize.errors import BadInput, EngineError
from runner.serve.limits import Limits
from runner.serve.protocol import Access

if TYPE_CHECKING:
    from planner import HardwareOptions

__all__ = ["Limits", "serve"]

log = logging.getLogger("runner.serve")


def serve(
    model: str,
    *,
    quant: str | None = None,
    auto_quant: bool = False,
    hardware: HardwareOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    allowed_hosts: Sequence[str] = (),
    cors_origins: Sequence[str] = (),
    limits: Limits | None = None,
    max_length: int | None = None,
    threads: int | None = None,
    packed: bool | None = None,
) -> None:
    """Serve MODEL until SIGINT/SIGTERM: what `runner serve` runs. HARDWARE is what AUTO_QUANT plans for;
    API_KEY, ALLOWED_HOSTS and CORS_ORIGINS say who may call (protocol.Access); PACKED: the engine's micro-batches
    (runner.engine.Engine: None, the default, packs only with GPU layers).

    Raises what failed the model's load, or an EngineError when the engine thread died (every request it had
    admitted answered 500): the process should then exit non-zero, for a supervisor to restart it.
    """
    import uvicorn

    from planner import HardwareOptions
    from runner.pipeline import open_pipeline
    from runner.serve.app import Served, create_app, refuse_new_bodies
    from runner.serve.batcher import Batcher
    from runner.serve.metrics import Metrics

    access = Access(api_key, host, tuple(allowed_hosts), tuple(cors_origins))  # an empty key: refused now
    limits = limits or Limits()

    def load():
        return open_pipeline(
            model,
            quant,
            auto_quant=auto_quant,
            max_length=max_length,
            threads=threads,
            packed=packed,
            hardware=hardware or HardwareOptions(),
            on_plan=lambda plan: log.info("%s", plan.summary()),
        )

    def loaded(pipe) -> None:
        served.loaded(pipe)
        log.info(
            "ready: %s (%s, %d-d, max length %d) at %s/v1; model names: %s",
            served.name,
            pipe.model.path.name,
            pipe.dims,
            pipe.max_length,
            url,
            ", ".join(served.names),
        )

    def failed(_: BaseException) -> None:
        server.should_exit = True  # raised below, once uvicorn has stopped

    stop = _StopSignals()
    with stop.caught():
        sock = _bind(host, port)
        url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
        log.info("listening on %s; loading %s", url, model)
        served = Served()
        batcher = Batcher(
            load,
            max_batch_tokens=limits.max_batch_tokens,
            max_queue=limits.max_queue,
            on_loaded=loaded,
            on_failed=failed,
            on_batch=lambda event: metrics.batch(event),
        )
        metrics = Metrics(lambda: batcher.in_flight)
        app = create_app(batcher, served, metrics, limits, access)
        # Our own lines say what happens; uvicorn's access log would write one line per request.
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=limits.shutdown_timeout,
        )

        class Server(uvicorn.Server):
            def handle_exit(self, sig: int, frame) -> None:
                if not self.should_exit:
                    log.info("stopping: finishing %d request(s) in flight", batcher.in_flight)
                    refuse_new_bodies(app)
                super().handle_exit(sig, frame)

        server = Server(config)
        if stop.forward_to(server):
            server.run(sockets=[sock])
        else:
            sock.close()
    if batcher.load_error is not None:
        raise batcher.load_error
    if batcher.crash is not None:
        why = (str(batcher.crash).splitlines() or [""])[0][:200]
        raise EngineError(
            f"the engine stopped ({type(batcher.crash).__name__}: {why}); every request it held was answered 500"
        ) from batcher.crash
    log.info("stopped")


class _StopSignals:
    """SIGINT/SIGTERM handlers for the whole of `serve`: installed before the port is bound (a stop in the
    first moments is a stop, not death by the signal), handing the signal to uvicorn's server once there is
    one, and swallowing the signal uvicorn re-raises after a graceful stop (so that it ends in exit 0). The
    handlers found are put back at the end (in the main thread only: elsewhere there are none to catch)."""

    def __init__(self) -> None:
        self.requested = False
        self._server = None

    def __call__(self, sig: int, frame) -> None:
        if self._server is not None:
            self._server.handle_exit(sig, frame)
        self.requested = True

    def forward_to(self, server) -> bool:
        """Hand later signals to SERVER; False when a stop came before it (then there is nothing to run)."""
        self._server = server
        return not self.requested

    @contextmanager
    def caught(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        found = {sig: signal.signal(sig, self) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in found.items():
                if handler is not None:  # None: set outside Python, cannot be put back from here
                    signal.signal(sig, handler)


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on HOST:PORT (0: any free port)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise BadInput(f"{host}:{port}: cannot listen ({e.strerror or e}); pick another --host or --port") from None
    return sock
