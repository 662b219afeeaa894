"""`runner serve`: the command parses its options; runner.serve.serve does the work."""

from __future__ import annotations

import os

import click

from runner.cli.options import (
    AT_LEAST_1,
    field_option,
    hardware_options,
    max_length_option,
    model_option,
    packed_option,
    threads_option,
)
from runner.serve import Limits


@click.command("serve")
@model_option
@click.option(
    "--quant",
    help="Which quant of a model directory/name to serve, pinned for its later runs (default: the pinned quant, "
    "else the highest fidelity on disk).",
)
@click.option(
    "--auto-quant",
    is_flag=True,
    help="Pick the quant and GPU layers for this machine (runner plan); a pinned model keeps its quant.",
)
@hardware_options
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; 0.0.0.0 exposes the server.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port (printed)."
)
@click.option(
    "--api-key", envvar="RUNNER_API_KEY", help="Require `Authorization: Bearer KEY` [env RUNNER_API_KEY]; not empty."
)
@click.option(
    "--allowed-hosts",
    multiple=True,
    help="Host names clients may call this server by, besides localhost, IP addresses and --host (against DNS "
    "rebinding); `.example.com` allows it and its subdomains, `*` any. Repeat, or separate with commas.",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="A web origin (https://app.example) whose pages may call the server and read its answers; `*` any. "
    "Repeatable. Without it, only pages on this host or on the loopback may call, and browsers read nothing.",
)
@field_option(Limits, "max_batch_tokens", type=AT_LEAST_1)
@field_option(Limits, "max_client_batch", type=AT_LEAST_1)
@field_option(Limits, "max_queue", type=AT_LEAST_1)
@field_option(Limits, "max_body_bytes", type=AT_LEAST_1)
@field_option(Limits, "shutdown_timeout", type=click.FloatRange(min=0))
@max_length_option
@threads_option
@packed_option
def serve(
    model: str,
    quant: str | None,
    auto_quant: bool,
    host: str,
    port: int,
    api_key: str | None,
    allowed_hosts: tuple[str, ...],
    cors_origins: tuple[str, ...],
    max_batch_tokens: int,
    max_client_batch: int,
    max_queue: int,
    max_body_bytes: int,
    shutdown_timeout: float,
    max_length: int | None,
    threads: int | None,
    packed: bool | None,
    **hw_opts,
) -> None:
    """Serve embeddings over HTTP: OpenAI's /v1/embeddings and Ollama's /api/embed, batched across clients."""
    from planner import HardwareOptions
    from runner.serve import serve as run_server

    if api_key is None and os.environ.get("RUNNER_API_KEY") == "":
        api_key = ""  # click reads an empty variable as unset: that would serve without a key, silently

    run_server(
        model,
        quant=quant,
        auto_quant=auto_quant,
        hardware=HardwareOptions(**hw_opts),
        host=host,
        port=port,
        api_key=api_key,
        allowed_hosts=[name.strip() for names in allowed_hosts for name in names.split(",") if name.strip()],
        cors_origins=cors_origins,
        limits=Limits(
            max_batch_tokens=max_batch_tokens,
            max_client_batch=max_client_batch,
            max_queue=max_queue,
            max_body_bytes=max_body_bytes,
            shutdown_timeout=shutdown_timeout,
        ),
        max_length=max_length,
        threads=threads,
        packed=packed,
    )
