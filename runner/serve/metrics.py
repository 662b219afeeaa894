"""Prometheus series of `runner serve`, in a registry of the server's own."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from runner.serve.batcher import BatchEvent


class Metrics:
    """The server's series. Two servers in one process do not collide, and nothing process-wide is changed:
    the `_created` timestamp series (they only double the page) are left out of this page alone."""

    def __init__(self, in_flight: Callable[[], int]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

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
        queue.set_function(in_flight)

    def batch(self, e: BatchEvent) -> None:
        self.batch_tokens.observe(e.tokens)
        self.batch_requests.observe(e.requests)
        self.batch_seconds.observe(e.seconds)

    def text(self) -> tuple[bytes, str]:
        """The page and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(_WithoutCreated(self.registry)), CONTENT_TYPE_LATEST


class _WithoutCreated:
    """A registry's series less the `_created` ones (what a collector yields is built afresh for each scrape)."""

    def __init__(self, registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family
