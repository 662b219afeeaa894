"""The HTTP side of `runner serve`: routes, who may call, body limits, error answers and /metrics.

Requests are parsed on the event loop, handed to the Batcher (the engine thread) and awaited, so the loop
keeps accepting while the engine works; a client that hangs up meanwhile has its request dropped from the
queue. Every error is answered in the caller's API shape (OpenAI's `{"error": {...}}`, Ollama's
`{"error": "..."}` on /api/) with the status protocol.STATUS gives its type.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware

from quantize.errors import BadInput, UserError
from quantize.manifest import recorded_sha256
from runner.serve.batcher import Batcher, Job, Result
from runner.serve.limits import Limits
from runner.serve.metrics import Metrics
from runner.serve.protocol import (
    RETRY_AFTER_S,
    Access,
    ClientGone,
    EmbedRequest,
    Forbidden,
    Invalid,
    MethodNotAllowed,
    NotFound,
    TooLarge,
    Unavailable,
    error_answer,
    ollama_response,
    openai_response,
    parse_json,
    parse_ollama,
    parse_openai,
    status_of,
)

log = logging.getLogger("runner.serve")
NO_BODY = "the server is stopping and the request body had not arrived; retry"


class Served:
    """The served model's identity, known once the engine thread has loaded it."""

    def __init__(self) -> None:
        self.name = ""
        self.names: tuple[str, ...] = ()
        self.created = int(time.time())
        self.ollama_entry: dict = {}  # its entry in Ollama's /api/tags

    def loaded(self, pipe) -> None:
        resolved = pipe.model
        # Its id is Ollama's name:tag with the file's quant as the tag (all-minilm-l6-v2:Q6_K): every response's
        # `model` says which file made the vectors.
        self.name = resolved.tag
        # Accepted as `model`: the id, the bare name (an alias) and the GGUF's stem. Never the -m argument: a path
        # says where the server's files are to anyone who asks for a wrong model.
        self.names = tuple(dict.fromkeys([resolved.tag, resolved.name, resolved.path.stem]))
        st = resolved.path.stat()
        self.ollama_entry = {
            "name": self.name,
            "model": self.name,
            "modified_at": datetime.fromtimestamp(st.st_mtime, UTC).isoformat(),
            "size": st.st_size,
            "digest": recorded_sha256(resolved.path) or "",  # manifest.json's record: an 8B file is not hashed here
            "details": {"format": "gguf", "quantization_level": resolved.quant or ""},
        }


def json_response(status: int, body: dict, headers: dict[str, str] | None = None) -> Response:
    # Vectors are most of the body: plain json.dumps, no validation pass over the floats.
    content = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    return Response(content, status_code=status, headers=headers, media_type="application/json")


def refuse_new_bodies(app: FastAPI) -> None:
    """The server is stopping: bodies still arriving are answered 503 instead of awaited (a client that sent
    half a body and stalled would hold the stop forever). Safe from a signal handler."""
    loop = getattr(app.state, "loop", None)
    if loop is not None:
        loop.call_soon_threadsafe(_refuse, app)


def _refuse(app: FastAPI) -> None:
    app.state.stopping.set()
    for task in list(app.state.reading):
        task.cancel()  # read_body answers it 503


def create_app(batcher: Batcher, served: Served, metrics: Metrics, limits: Limits, access: Access) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine thread and, at shutdown, lets it finish and close."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        batcher.start()
        yield
        # uvicorn has already waited for the requests in flight: the engine thread has nothing left to answer.
        await asyncio.to_thread(batcher.stop)

    app = FastAPI(title="runner serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stopping = asyncio.Event()
    # The request tasks now waiting for their bodies, for a stop to cancel: no task of its own per request
    # (a body's wait costs no more than the body).
    app.state.reading = set()
    if access.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(access.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type"],
        )
    app.add_middleware(CallerCheck, access=access)  # added last: runs first, before CORS answers a preflight

    async def read_body(request: Request) -> bytes:
        limit = limits.max_body_bytes
        too_big = TooLarge(f"request body over {limit} bytes (--max-body-bytes); split the request")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big
        if app.state.stopping.is_set():
            raise Unavailable(NO_BODY)
        task = asyncio.current_task()
        app.state.reading.add(task)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
        except asyncio.CancelledError:
            if not app.state.stopping.is_set():
                raise
            task.uncancel()  # ours, from _refuse: answered, not propagated
            raise Unavailable(NO_BODY) from None
        finally:
            app.state.reading.discard(task)
        return b"".join(chunks)

    async def answer(
        request: Request, endpoint: str, handle: Callable[[Request], Awaitable[Response]], ollama: bool = False
    ) -> Response:
        started = time.perf_counter()
        try:
            response = await handle(request)
        except Exception as e:
            if status_of(e).http == 500:
                if isinstance(e, UserError):  # the engine failed: its message says how
                    log.error("%s: %s", endpoint, e)
                else:  # a bug: still an answer in the API's shape, and a traceback on stderr
                    log.exception("%s failed", endpoint)
            response = json_response(*error_answer(e, ollama))
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        return response

    async def embed(request: Request, parse: Callable[[dict, int], EmbedRequest]) -> tuple[EmbedRequest, Result]:
        """Checks common to both APIs, then the engine's answer (a batcher.Result)."""
        access.check_key(request.headers.get("authorization", ""))
        body = parse_json(await read_body(request))
        batcher.check_ready()
        req = parse(body, limits.max_client_batch)
        if req.model is not None and req.model not in served.names:
            raise NotFound(
                f"model {req.model!r} is not served here; this server runs {', '.join(map(repr, served.names))}",
                param="model",
                code="model_not_found",
            )
        try:  # Matryoshka: the model's own rule (runner/compact.py), read from metadata, no engine call
            dims = batcher.pipeline.check_dimensions(req.dimensions)
        except BadInput as e:
            raise Invalid(str(e).replace("--dimensions", "dimensions"), param="dimensions") from None
        future = batcher.submit(Job(texts=req.texts, ids=req.ids, query=req.query, truncate=req.truncate))
        result = await unless_hung_up(request, future)
        metrics.inputs.inc(len(req))
        metrics.input_tokens.inc(result.tokens)
        metrics.truncated.inc(result.truncated)
        if dims is not None:  # cut the unit vectors, then re-normalise: the same as cutting before normalising
            cut = result.vectors[:, :dims]
            result = replace(result, vectors=cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12))
        return req, result

    async def openai_embeddings(request: Request) -> Response:
        req, result = await embed(request, parse_openai)
        return json_response(200, openai_response(result.vectors, served.name, result.tokens, req.base64))

    async def ollama_embed(request: Request) -> Response:
        started = time.perf_counter_ns()
        _, result = await embed(request, parse_ollama)
        return json_response(
            200, ollama_response(result.vectors, served.name, result.tokens, time.perf_counter_ns() - started)
        )

    async def list_models(request: Request) -> Response:
        access.check_key(request.headers.get("authorization", ""))
        batcher.check_ready()  # the served names are known once the model is
        data = [{"id": served.name, "object": "model", "created": served.created, "owned_by": "embedrunner"}]
        return json_response(200, {"object": "list", "data": data})

    async def ollama_tags(request: Request) -> Response:
        access.check_key(request.headers.get("authorization", ""))
        batcher.check_ready()
        return json_response(200, {"models": [served.ollama_entry]})

    async def health(request: Request) -> Response:
        # Open without a key, for load balancers and container health checks.
        state = batcher.state
        if state == "ready":
            return json_response(200, {"status": "ok", "model": served.name})
        retry = {"Retry-After": str(RETRY_AFTER_S)} if state == "loading" else None
        return json_response(503, {"status": state}, retry)

    async def metrics_page(request: Request) -> Response:
        content, media_type = metrics.text()
        return Response(content, media_type=media_type)

    def route(path: str, method: str, handle: Callable[[Request], Awaitable[Response]], ollama: bool = False) -> None:
        async def endpoint(request: Request) -> Response:
            return await answer(request, path, handle, ollama)

        # Starlette's plain route: the request straight to ENDPOINT, without FastAPI's per-request parameter
        # and dependency machinery (nothing here is declared through it).
        app.add_route(path, endpoint, methods=[method], include_in_schema=False)

    route("/v1/embeddings", "POST", openai_embeddings)
    route("/api/embed", "POST", ollama_embed, ollama=True)
    route("/v1/models", "GET", list_models)
    route("/api/tags", "GET", ollama_tags, ollama=True)
    app.add_route("/health", health, methods=["GET"], include_in_schema=False)
    app.add_route("/metrics", metrics_page, methods=["GET"], include_in_schema=False)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        # Unknown paths and wrong methods, in the shape of the API the path belongs to.
        kind = {404: NotFound, 405: MethodNotAllowed}.get(exc.status_code, Invalid)
        error = kind(f"{request.method} {request.url.path}: {exc.detail}")
        return json_response(*error_answer(error, request.url.path.startswith("/api/")))

    return app


class CallerCheck:
    """ASGI middleware: every request's Host and Origin headers through Access.check_caller (a 403 otherwise)."""

    def __init__(self, app, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            headers = Headers(scope=scope)
            try:
                self.access.check_caller(headers.get("host", ""), headers.get("origin"))
            except Forbidden as e:
                response = json_response(*error_answer(e, scope["path"].startswith("/api/")))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def unless_hung_up(request: Request, future: Future) -> Result:
    """The engine's answer to FUTURE; a ClientGone once the client has hung up, and then the job is cancelled:
    the engine drops it unless its call has already started (so too when a stop runs out of time)."""
    answer = asyncio.wrap_future(future)  # cancelling it cancels FUTURE too (asyncio.wrap_future chains it)
    gone = asyncio.ensure_future(_hung_up(request))
    gone.add_done_callback(lambda _: answer.cancel())  # nothing once answered
    try:
        return await answer
    except asyncio.CancelledError:
        if asyncio.current_task().cancelling():
            # A stop ran out of Limits.shutdown_timeout: an answer the client can act on, not a broken connection.
            raise Unavailable("the server stopped before this request was embedded; retry") from None
        raise ClientGone("the client hung up before its answer") from None
    finally:
        gone.cancel()


async def _hung_up(request: Request) -> None:
    # The body is read: the next message uvicorn has for this request is its client's disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
