"""The bounds of `runner serve`, in one place: `serve()` takes them, and the command's options read their
defaults (and help) from here."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from quantize.errors import BadInput


@dataclass(frozen=True)
class Limits:
    """How much work one request, one engine call and the queue may take, and how long a stop may wait."""

    max_batch_tokens: int = field(default=16384, metadata={"help": "Tokens per engine call."})
    max_client_batch: int = field(default=2048, metadata={"help": "Inputs per request (413 above)."})
    max_queue: int = field(default=512, metadata={"help": "Requests waiting or in the engine (503 above)."})
    max_body_bytes: int = field(
        default=16 * 2**20,
        metadata={"help": "Request body size (413 above), checked before the body is parsed or tokenized."},
    )
    shutdown_timeout: float = field(
        default=60.0,
        metadata={
            "help": "Seconds a stop (SIGINT/SIGTERM) waits for the requests in flight before closing their "
            "connections; bodies still arriving when it starts are answered 503 at once."
        },
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), 0 if f.name == "shutdown_timeout" else 1
            if not value >= least:
                raise BadInput(f"{f.name} {value}: must be at least {least}")
