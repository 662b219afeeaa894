"""`runner serve`: an OpenAI- and Ollama-compatible embedding server over the one embedding pipeline.

    runner serve -m all-minilm-l6-v2            # http://127.0.0.1:8080/v1/embeddings, /api/embed

The port is bound first (a port in use fails at once, not after a long model load), the HTTP server starts
answering /health with 503 while the engine thread loads the model through `open_pipeline` (the same path
as `runner embed`), and embedding requests are batched across clients by runner.server_batch. SIGINT or
SIGTERM stop accepting, finish every request in flight, and exit 0.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys
from typing import TYPE_CHECKING

import click

from quantize.errors import BadInput
from runner.cli.options import hardware_options

if TYPE_CHECKING:
    from planner import HardwareOptions
    from runner.server_app import Limits

log = logging.getLogger("runner.server")


def serve(
    model: str,
    *,
    quant: str | None = None,
    auto_quant: bool = False,
    hardware: HardwareOptions | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    limits: Limits | None = None,
    max_length: int | None = None,
    threads: int | None = None,
) -> None:
    """Serve MODEL until SIGINT/SIGTERM: what `runner serve` runs. HARDWARE is what AUTO_QUANT plans for."""
    import uvicorn

    from planner import HardwareOptions
    from runner.pipeline import open_pipeline
    from runner.server_app import Limits, Metrics, Served, create_app
    from runner.server_batch import Batcher

    limits = limits or Limits()
    sock = _bind(host, port)
    url = f"http://{f'[{host}]' if ':' in host else host}:{sock.getsockname()[1]}"
    log.info("listening on %s; loading %s", url, model)

    def load():
        return open_pipeline(
            model,
            quant,
            auto_quant=auto_quant,
            max_length=max_length,
            threads=threads,
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
        server.should_exit = True  # the error itself is raised below, once uvicorn has stopped

    served = Served(model)
    batcher = Batcher(
        load,
        max_batch_tokens=limits.max_batch_tokens,
        max_queue=limits.max_queue,
        on_loaded=loaded,
        on_failed=failed,
        on_batch=lambda event: metrics.batch(event),
    )
    metrics = Metrics(batcher)
    app = create_app(batcher, served, metrics, limits, api_key)
    # Our own lines say what happens; uvicorn's access log would write one line per request.
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=None)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            if not self.should_exit:
                log.info("stopping: finishing %d request(s) in flight", batcher.in_flight)
            super().handle_exit(sig, frame)

    server = Server(config)
    # uvicorn re-raises a signal it handled once it has shut down; with no-op handlers underneath, a
    # graceful stop ends in exit 0 instead of death by SIGTERM.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run(sockets=[sock])
    if batcher.load_error is not None:
        raise batcher.load_error
    log.info("stopped")


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


@click.command("serve")
@click.option("-m", "--model", required=True, help="GGUF file, model directory, or models.toml name.")
@click.option("--quant", help="Which quant of a model directory/name to serve (default: highest fidelity on disk).")
@click.option("--auto-quant", is_flag=True, help="Pick the quant and GPU layers for this machine (runner plan).")
@hardware_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the server.")
@click.option("--port", type=int, default=8080, show_default=True, help="0 picks a free port (printed at start).")
@click.option("--api-key", envvar="RUNNER_API_KEY", help="Require `Authorization: Bearer KEY` [env RUNNER_API_KEY].")
@click.option("--max-batch-tokens", type=int, default=16384, show_default=True, help="Tokens per engine call.")
@click.option("--max-client-batch", type=int, default=2048, show_default=True, help="Inputs per request (413 above).")
@click.option(
    "--max-queue", type=int, default=512, show_default=True, help="Requests waiting or in the engine (503 above)."
)
@click.option(
    "--max-body-bytes", type=int, default=16 * 2**20, show_default=True, help="Request body size (413 above)."
)
@click.option("--max-length", type=int, help="Truncate inputs to this many tokens (default: the model's).")
@click.option("--threads", type=int, help="Engine threads (default: physical cores).")
def serve_command(
    model: str,
    quant: str | None,
    auto_quant: bool,
    host: str,
    port: int,
    api_key: str | None,
    max_batch_tokens: int,
    max_client_batch: int,
    max_queue: int,
    max_body_bytes: int,
    max_length: int | None,
    threads: int | None,
    **hw_opts,
) -> None:
    """Serve embeddings over HTTP: OpenAI's /v1/embeddings and Ollama's /api/embed, batched across clients."""
    from planner import HardwareOptions
    from runner.server_app import Limits

    for name, value in [
        ("--max-batch-tokens", max_batch_tokens),
        ("--max-client-batch", max_client_batch),
        ("--max-queue", max_queue),
        ("--max-body-bytes", max_body_bytes),
    ]:
        if value < 1:
            raise BadInput(f"{name} {value}: must be at least 1")
    if not 0 <= port <= 65535:
        raise BadInput(f"--port {port}: must be between 0 and 65535")
    serve(
        model,
        quant=quant,
        auto_quant=auto_quant,
        hardware=HardwareOptions(**hw_opts),
        host=host,
        port=port,
        api_key=api_key or None,
        limits=Limits(max_batch_tokens, max_client_batch, max_queue, max_body_bytes),
        max_length=max_length,
        threads=threads,
    )


if __name__ == "__main__":
    # `python -m runner.server ARGS` = `runner serve ARGS`, through the CLI's error handling and logging.
    from runner.cli import main

    main.add_command(serve_command)
    main(args=["serve", *sys.argv[1:]], prog_name="runner")
