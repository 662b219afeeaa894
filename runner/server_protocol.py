"""The wire formats of `runner serve`: request bodies checked into one EmbedRequest, vectors into responses.

Pure functions of parsed JSON, no HTTP: OpenAI's `/v1/embeddings` (plus NVIDIA's `input_type` and
`truncate` fields) and Ollama's `/api/embed`. Anything malformed is an ApiError that names the field.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass

import numpy as np

INPUT_TYPES = {"query": True, "passage": False, "document": False}  # value -> apply the query template
TRUNCATES = {"END": True, "NONE": False}  # NVIDIA's values -> cut over-length inputs


class ApiError(Exception):
    """An HTTP error answer: status plus OpenAI's error fields (`type`, `param`, `code`)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def openai_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def ollama_body(self) -> dict:
        return {"error": self.message}  # what Ollama's clients read (ollama.ResponseError.error)


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


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
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("request body must be a JSON object", code="invalid_json")
    return body


def parse_openai(body: dict, max_inputs: int) -> EmbedRequest:
    """OpenAI's embeddings request, with NVIDIA's `input_type` and `truncate`."""
    texts, ids = _openai_input(body.get("input"), max_inputs)
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise bad(f"encoding_format {encoding!r}: must be 'float' or 'base64'", "encoding_format")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise bad(f"input_type {input_type!r}: must be one of {', '.join(map(repr, INPUT_TYPES))}", "input_type")
    query = INPUT_TYPES.get(input_type, False)
    if query and ids is not None:
        raise bad("input_type 'query' applies a text template; send text, not token ids", "input_type")
    truncate = body.get("truncate")
    if truncate is not None and (not isinstance(truncate, str) or truncate.upper() not in TRUNCATES):
        raise bad(f"truncate {truncate!r}: must be 'END' (cut over-length inputs) or 'NONE' (refuse them)", "truncate")
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
        raise bad("input must be a string or an array of strings", "input", "invalid_type")
    _check_count(len(texts), max_inputs)
    truncate = body.get("truncate")
    if truncate is not None and not isinstance(truncate, bool):
        raise bad(f"truncate {truncate!r}: must be true or false", "truncate", "invalid_type")
    return EmbedRequest(
        model=_model(body),
        texts=texts,
        ids=None,
        truncate=truncate is not False,
        dimensions=_dimensions(body),
    )


def _openai_input(value: object, max_inputs: int) -> tuple[list[str] | None, list[list[int]] | None]:
    """(texts, None) or (None, token id lists)."""
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        _check_count(len(value), max_inputs)
        if all(isinstance(v, str) for v in value):
            return value, None
        if all(_is_int(v) for v in value):
            return None, [value]
        if all(isinstance(v, list) and all(_is_int(t) for t in v) for v in value):
            return None, value
    if value is None:
        raise bad("input is required: a string, an array of strings or an array of token ids", "input", "missing")
    if isinstance(value, list):
        if not value:
            raise bad("input is empty: send at least one text", "input", "empty_input")
        raise bad(
            "input must be a string, an array of strings, an array of token ids or an array of arrays of token ids "
            "(not a mix)",
            "input",
            "invalid_type",
        )
    raise bad(f"input must be a string or an array, not {type(value).__name__}", "input", "invalid_type")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_count(n: int, max_inputs: int) -> None:
    if n == 0:
        raise bad("input is empty: send at least one text", "input", "empty_input")
    if n > max_inputs:
        raise ApiError(
            413,
            f"{n} inputs in one request, over the limit of {max_inputs} (--max-client-batch); split the request",
            param="input",
            code="too_many_inputs",
        )


def _model(body: dict) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, not {type(model).__name__}", "model", "invalid_type")
    return model or None


def _dimensions(body: dict) -> int | None:
    dims = body.get("dimensions")
    if dims is not None and (not _is_int(dims) or dims < 1):
        raise bad(f"dimensions {dims!r}: must be a positive integer", "dimensions", "invalid_type")
    return dims


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
