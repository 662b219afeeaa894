"""The HTTP side of `runner serve`: routes, API keys, body limits, error answers and /metrics.

Imported by `runner serve` only (FastAPI is not loaded for the other commands). Requests are parsed on the
event loop, handed to the Batcher (the engine thread) and awaited, so the loop keeps accepting while the
engine works. Every failure is an ApiError answered in the caller's API shape:
OpenAI's `{"error": {"message", "type", "param", "code"}}`, or Ollama's `{"error": "..."}` on /api/.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from quantize.errors import BadInput, UserError
from runner.server_batch import Batcher, BatchEvent, Job, NotReady, QueueFull, Result
from runner.server_protocol import (
    ApiError,
    EmbedRequest,
    ollama_response,
    openai_response,
    parse_json,
    parse_ollama,
    parse_openai,
)

log = logging.getLogger("runner.server")

RETRY_AFTER_S = 1  # what a 503 asks clients to wait: about one engine call


@dataclass(frozen=True)
class Limits:
    max_batch_tokens: int = 16384
    max_client_batch: int = 2048
    max_queue: int = 512
    max_body_bytes: int = 16 * 2**20


class Served:
    """The served model's identity, known once the engine thread has loaded it."""

    def __init__(self, model_arg: str) -> None:
        self.model_arg = model_arg
        self.name = model_arg
        self.names: tuple[str, ...] = ()
        self.dims = 0
        self.created = int(time.time())

    def loaded(self, pipe) -> None:
        resolved = pipe.model
        self.name = resolved.name
        # Accepted as `model`: the registry name (or file stem), the GGUF's stem (which names the quant) and
        # whatever was passed to -m.
        self.names = tuple(dict.fromkeys([resolved.name, resolved.path.stem, self.model_arg]))
        self.dims = pipe.dims


class Metrics:
    """Prometheus series in a registry of this app's own (two apps in one process do not collide)."""

    def __init__(self, batcher: Batcher) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

        disable_created_metrics()  # the `_created` timestamp series only double the page
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embedrunner_requests", "HTTP requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "embedrunner_request_seconds",
            "Time from request to answer",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.input_tokens = Counter("embedrunner_input_tokens", "Tokens embedded, after truncation", registry=r)
        self.inputs = Counter("embedrunner_inputs", "Texts or token sequences embedded", registry=r)
        self.truncated = Counter("embedrunner_truncated_inputs", "Inputs cut at the max length", registry=r)
        # One engine call = the requests batched together; llama.cpp packs it into micro-batches itself.
        self.batch_tokens = Histogram(
            "embedrunner_batch_tokens",
            "Tokens per engine call",
            buckets=tuple(2**k for k in range(5, 18)),
            registry=r,
        )
        self.batch_requests = Histogram(
            "embedrunner_batch_requests",
            "Requests per engine call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.batch_seconds = Histogram(
            "embedrunner_batch_seconds",
            "Seconds per engine call",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        queue = Gauge("embedrunner_queue_depth", "Requests admitted and not yet answered", registry=r)
        queue.set_function(lambda: batcher.in_flight)

    def batch(self, e: BatchEvent) -> None:
        self.batch_tokens.observe(e.tokens)
        self.batch_requests.observe(e.requests)
        self.batch_seconds.observe(e.seconds)

    def text(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def create_app(batcher: Batcher, served: Served, metrics: Metrics, limits: Limits, api_key: str | None):
    """The FastAPI app; its lifespan starts the engine thread and, at shutdown, lets it finish and close."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        # uvicorn has already waited for every request in flight: the engine thread has nothing left to do.
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="runner serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
        # Vectors are most of the body: plain json.dumps, no validation pass over the floats.
        content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        return Response(content, status_code=status, headers=headers, media_type="application/json")

    def error_response(e: ApiError, ollama: bool) -> Response:
        return json_response(e.ollama_body() if ollama else e.openai_body(), e.status, e.headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise ApiError(
                401,
                "missing API key: send the header `Authorization: Bearer KEY`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def read_body(request: Request) -> bytes:
        limit = limits.max_body_bytes
        too_big = ApiError(
            413, f"request body over {limit} bytes (--max-body-bytes); split the request", code="request_too_large"
        )
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    async def answer(
        request: Request, endpoint: str, handle: Callable[[Request], Awaitable[Response]], ollama: bool = False
    ) -> Response:
        started = time.perf_counter()
        try:
            response = await handle(request)
        except ApiError as e:
            response = error_response(e, ollama)
        except Exception as e:  # a bug: still an answer in the API's shape, and a traceback on stderr
            log.exception("%s failed", endpoint)
            error = ApiError(
                500, f"internal error: {type(e).__name__}: {e}", type="server_error", code="internal_error"
            )
            response = error_response(error, ollama)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def embed(request: Request, parse: Callable[[dict, int], EmbedRequest]) -> tuple[EmbedRequest, Result]:
        """Checks common to both APIs, then the engine's answer (a server_batch.Result)."""
        check_key(request)
        body = parse_json(await read_body(request))
        if not batcher.ready.is_set():
            raise ApiError(
                503, "the model is still loading", type="server_error", code="loading", headers=_retry_after()
            )
        req = parse(body, limits.max_client_batch)
        if req.model is not None and req.model not in served.names:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server runs {', '.join(map(repr, served.names))}",
                param="model",
                code="model_not_found",
            )
        try:  # Matryoshka: the model's own rule (runner/compact.py), read from metadata, no engine call
            dims = batcher.pipeline.check_dimensions(req.dimensions)
        except BadInput as e:
            message = str(e).replace("--dimensions", "dimensions")
            raise ApiError(400, message, param="dimensions", code="invalid_value") from None
        try:
            future = batcher.submit(Job(texts=req.texts, ids=req.ids, query=req.query, truncate=req.truncate))
        except QueueFull as e:
            raise ApiError(
                503, f"server busy: {e}; retry later", type="server_error", code="queue_full", headers=_retry_after()
            ) from None
        except NotReady as e:
            raise ApiError(503, str(e), type="server_error", code="unavailable", headers=_retry_after()) from None
        try:
            result = await asyncio.wrap_future(future)
        except BadInput as e:
            raise ApiError(400, str(e), param="input", code="invalid_input") from None
        except UserError as e:  # EngineError: a failure of the engine, not of the request
            raise ApiError(500, str(e), type="server_error", code="engine_error") from None
        metrics.inputs.inc(len(req))
        metrics.input_tokens.inc(result.tokens)
        metrics.truncated.inc(result.truncated)
        if dims is not None:  # cut the unit vectors, then re-normalise: the same as cutting before normalising
            cut = result.vectors[:, :dims]
            result = replace(result, vectors=cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12))
        return req, result

    async def openai_embeddings(request: Request) -> Response:
        req, result = await embed(request, parse_openai)
        return json_response(openai_response(result.vectors, served.name, result.tokens, req.base64))

    async def ollama_embed(request: Request) -> Response:
        started = time.perf_counter_ns()
        _, result = await embed(request, parse_ollama)
        return json_response(
            ollama_response(result.vectors, served.name, result.tokens, time.perf_counter_ns() - started)
        )

    async def list_models(request: Request) -> Response:
        check_key(request)
        data = [{"id": served.name, "object": "model", "created": served.created, "owned_by": "embedrunner"}]
        return json_response({"object": "list", "data": data})

    @app.post("/v1/embeddings")
    async def _v1_embeddings(request: Request) -> Response:
        return await answer(request, "/v1/embeddings", openai_embeddings)

    @app.post("/api/embed")
    async def _api_embed(request: Request) -> Response:
        return await answer(request, "/api/embed", ollama_embed, ollama=True)

    @app.get("/v1/models")
    async def _v1_models(request: Request) -> Response:
        return await answer(request, "/v1/models", list_models)

    @app.get("/health")
    async def _health() -> Response:
        # Open without a key, for load balancers and container health checks.
        if batcher.ready.is_set():
            return json_response({"status": "ok", "model": served.name})
        return json_response({"status": "loading"}, 503, _retry_after())

    @app.get("/metrics")
    async def _metrics() -> Response:
        content, media_type = metrics.text()
        return Response(content, media_type=media_type)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # Unknown paths and wrong methods, in OpenAI's error shape too.
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(ApiError(exc.status_code, message, code=code).openai_body(), exc.status_code)

    return app


def _retry_after() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_S)}
