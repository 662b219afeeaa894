"""The wire side of `runner serve`, without HTTP: request bodies checked into one EmbedRequest, vectors into
responses, who may call (API key, Host and Origin), and every error's answer.

Pure functions of parsed JSON and header strings: OpenAI's `/v1/embeddings` (plus NVIDIA's `input_type` and
`truncate` fields) and Ollama's `/api/embed`. Anything malformed is an ApiError that names the field. The
HTTP status of every error, ours or raised below us, comes from one table, STATUS.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import json
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from quantize.errors import BadInput, UserError
from runner.serve.batcher import NotReady, QueueFull

INPUT_TYPES = {"query": True, "passage": False, "document": False}  # value -> apply the query template
TRUNCATES = {"END": True, "NONE": False}  # NVIDIA's values -> cut over-length inputs
MAX_INT_DIGITS = 20  # token ids and dimensions need far fewer; Python reads a long number in quadratic time
RETRY_AFTER_S = 1  # what a 503 asks clients to wait: about one engine call


# --- errors --------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answer of ours: its message and OpenAI's `param` and `code`; the status is STATUS's."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class Invalid(ApiError):
    """The request is malformed."""


class Unauthorized(ApiError):
    """No API key, or the wrong one."""


class Forbidden(ApiError):
    """A Host or Origin this server does not answer."""


class NotFound(ApiError):
    """No such path or model."""


class MethodNotAllowed(ApiError):
    pass


class TooLarge(ApiError):
    """A body or request over the server's limits."""


class Unavailable(ApiError):
    """Not now: loading, or shutting down."""


class ClientGone(ApiError):
    """The client hung up before its answer: nobody reads this one (its status only shows in /metrics)."""


@dataclass(frozen=True)
class Status:
    """How an error type is answered."""

    http: int
    type: str = "invalid_request_error"  # OpenAI's error `type`
    code: str | None = None  # OpenAI's `code`, where the error names none
    param: str | None = None  # OpenAI's `param`, where the error names none
    prefix: str = ""  # put before the error's own message
    retry: bool = False  # ask the client to come back after RETRY_AFTER_S


# One table from error type to HTTP answer, for our errors and those raised below us (TEI's
# `From<ErrorType> for StatusCode`): the most specific class in an error's MRO decides.
STATUS: dict[type[BaseException], Status] = {
    Invalid: Status(400),
    BadInput: Status(400, code="invalid_input", param="input"),  # the pipeline refused an input
    Unauthorized: Status(401, code="invalid_api_key"),
    Forbidden: Status(403, code="forbidden"),
    NotFound: Status(404, code="not_found"),
    MethodNotAllowed: Status(405, code="method_not_allowed"),
    TooLarge: Status(413, code="request_too_large"),
    ClientGone: Status(499, code="client_closed_request"),  # nginx's number; never sent
    Unavailable: Status(503, "server_error", "unavailable", retry=True),
    NotReady: Status(503, "server_error", "unavailable", retry=True),
    QueueFull: Status(503, "server_error", "queue_full", prefix="server busy: ", retry=True),
    UserError: Status(500, "server_error", "engine_error"),  # EngineError: the engine failed, not the request
    Exception: Status(500, "server_error", "internal_error", prefix="internal error: "),  # a bug
}


def status_of(error: BaseException) -> Status:
    return next(STATUS[cls] for cls in type(error).__mro__ if cls in STATUS)


def error_answer(error: BaseException, ollama: bool) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, body, headers) answering ERROR in OpenAI's shape, or Ollama's (`{"error": "..."}`, what
    its clients read as ollama.ResponseError.error)."""
    status = status_of(error)
    if isinstance(error, ApiError):
        message, param, code = error.message, error.param or status.param, error.code or status.code
    else:
        named = "" if isinstance(error, (UserError, NotReady, QueueFull)) else f"{type(error).__name__}: "
        message, param, code = f"{status.prefix}{named}{error}", status.param, status.code
    if isinstance(error, QueueFull):
        message += "; retry later"
    if ollama:
        body = {"error": message}
    else:
        body = {"error": {"message": message, "type": status.type, "param": param, "code": code}}
    if status.http == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    else:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if status.retry else {}
    return status.http, body, headers


# --- who may call --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who may call. API_KEY: required as `Authorization: Bearer KEY` (None: no key). The Host header must
    name this server: localhost, an IP address, BOUND_HOST or one of ALLOWED_HOSTS (`*`: any; `.example.com`:
    it and its subdomains), so that a page whose name an attacker points at 127.0.0.1 (DNS rebinding) is
    refused. A browser page's Origin must be one of CORS_ORIGINS (`*`: any; those also get CORS headers), on
    this server's host, or on the loopback."""

    api_key: str | None = None
    bound_host: str = "127.0.0.1"
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise BadInput(
                "--api-key (or RUNNER_API_KEY) is empty, an unset variable?: pass the key, or leave both out to serve "
                "without one"
            )

    def check_key(self, authorization: str) -> None:
        """The Authorization header's value against the key (in constant time)."""
        if self.api_key is None:
            return
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise Unauthorized("missing API key: send the header `Authorization: Bearer KEY`")
        if not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise Unauthorized("invalid API key")

    def check_caller(self, host: str, origin: str | None) -> None:
        """The Host and Origin headers' values (HOST empty: the request named none)."""
        name = _host_name(host)
        if name and not self._serves(name):
            raise Forbidden(
                f"Host {name!r} is not a name of this server (DNS rebinding?); "
                "if it is one, start the server with --allowed-hosts NAME"
            )
        if origin is None or origin in self.cors_origins or "*" in self.cors_origins:
            return
        page = _host_name(urlsplit(origin).netloc)
        if not page or (page != name and not _is_loopback(page)):
            raise Forbidden(
                f"requests from pages of {origin!r} are not allowed; start the server with --cors-origin {origin}"
            )

    def _serves(self, name: str) -> bool:
        if _is_loopback(name) or _is_ip(name) or name == _host_name(self.bound_host):
            return True
        for allowed in self.allowed_hosts:
            allowed = allowed.lower().rstrip(".")
            if allowed == "*" or name == allowed or (allowed.startswith(".") and name.endswith(allowed)):
                return True
        return False


def _host_name(host: str) -> str:
    """The name in a Host header or an origin's authority: lowercase, without port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback(name: str) -> bool:
    """localhost names (browsers resolve *.localhost to the loopback themselves) and loopback addresses."""
    if name == "localhost" or name.endswith(".localhost"):
        return True
    return _is_ip(name) and ipaddress.ip_address(name).is_loopback


# --- requests ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbedRequest:
    """One request, whichever API it came through: texts or token ids, and how to embed them."""

    model: str | None  # None: the served model
    texts: list[str] | None
    ids: list[list[int]] | None
    query: bool = False
    truncate: bool = True
    base64: bool = False
    dimensions: int | None = None

    def __len__(self) -> int:
        return len(self.texts if self.texts is not None else self.ids)


def parse_json(raw: bytes) -> dict:
    """RAW as a JSON object; numbers longer than MAX_INT_DIGITS and nesting past Python's recursion limit are
    a 400, not minutes of CPU or a 500."""
    try:
        body = json.loads(raw, parse_int=_bounded_int)
    except RecursionError:
        raise Invalid("request body nests arrays or objects too deeply", code="invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise Invalid(f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise Invalid("request body must be a JSON object", code="invalid_json")
    return body


def _bounded_int(digits: str) -> int:
    if len(digits) > MAX_INT_DIGITS + digits.startswith("-"):
        raise Invalid(
            f"request body holds a {len(digits)}-digit number; token ids and dimensions have at most "
            f"{MAX_INT_DIGITS} digits",
            code="invalid_json",
        )
    return int(digits)


def parse_openai(body: dict, max_inputs: int) -> EmbedRequest:
    """OpenAI's embeddings request, with NVIDIA's `input_type` and `truncate`."""
    texts, ids = _openai_input(body.get("input"), max_inputs)
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise _bad(f"encoding_format {encoding!r}: must be 'float' or 'base64'", "encoding_format")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise _bad(f"input_type {input_type!r}: must be one of {', '.join(map(repr, INPUT_TYPES))}", "input_type")
    query = INPUT_TYPES.get(input_type, False)
    if query and ids is not None:
        raise _bad("input_type 'query' applies a text template; send text, not token ids", "input_type")
    truncate = body.get("truncate")
    if truncate is not None and (not isinstance(truncate, str) or truncate.upper() not in TRUNCATES):
        raise _bad(f"truncate {truncate!r}: must be 'END' (cut over-length inputs) or 'NONE' (refuse them)", "truncate")
    return EmbedRequest(
        model=_model(body),
        texts=texts,
        ids=ids,
        query=query,
        truncate=TRUNCATES[truncate.upper()] if truncate is not None else True,
        base64=encoding == "base64",
        dimensions=_dimensions(body),
    )


def parse_ollama(body: dict, max_inputs: int) -> EmbedRequest:
    """Ollama's `/api/embed` request (`options` and `keep_alive` mean nothing here and are ignored)."""
    value = body.get("input")
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise _bad("input must be a string or an array of strings", "input", "invalid_type")
    _check_count(len(texts), max_inputs)
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise _bad(f"truncate {truncate!r}: must be true or false", "truncate", "invalid_type")
    return EmbedRequest(
        model=_model(body),
        texts=texts,
        ids=None,
        truncate=truncate is not False,
        dimensions=_dimensions(body),
    )


def _openai_input(value: object, max_inputs: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists). One array of token ids is one input, however long."""
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        if all(_is_int(v) for v in value):
            return None, [value]
        _check_count(len(value), max_inputs)
        if all(isinstance(v, str) for v in value):
            return value, None
        if all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
            return None, value
    if value is None:
        raise _bad("input is required: a string, an array of strings or an array of token ids", "input", "missing")
    if isinstance(value, list):
        if not value:
            raise _bad("input is empty: send at least one text", "input", "empty_input")
        raise _bad(
            "input must be a string, an array of strings, an array of token ids or an array of arrays of token ids "
            "(not a mix)",
            "input",
            "invalid_type",
        )
    raise _bad(f"input must be a string or an array, not {type(value).__name__}", "input", "invalid_type")


def _bad(message: str, param: str | None = None, code: str = "invalid_value") -> Invalid:
    return Invalid(message, param=param, code=code)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_count(n: int, max_inputs: int) -> None:
    if n == 0:
        raise _bad("input is empty: send at least one text", "input", "empty_input")
    if n > max_inputs:
        raise TooLarge(
            f"{n} inputs in one request, over the limit of {max_inputs} (--max-client-batch); split the request",
            param="input",
            code="too_many_inputs",
        )


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad(f"model must be a string, not {type(model).__name__}", "model", "invalid_type")
    return model or None


def _dimensions(body: dict) -> int | None:
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims < 1):
        raise _bad(f"dimensions {dims!r}: must be a positive integer", "dimensions", "invalid_type")
    return dims


# --- responses -----------------------------------------------------------------------------------------


def openai_response(vectors: np.ndarray, model: str, tokens: int, as_base64: bool) -> dict:
    """OpenAI's embeddings response; base64 is the little-endian float32 bytes the official client decodes."""
    if as_base64:
        rows = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        rows = vectors.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def ollama_response(vectors: np.ndarray, model: str, tokens: int, total_ns: int) -> dict:
    """Ollama's `/api/embed` response; the model stays loaded, so no request pays a load."""
    return {
        "model": model,
        "embeddings": vectors.tolist(),
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": tokens,
    }
