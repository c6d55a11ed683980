"""The server's Prometheus metrics (GET /metrics, Prometheus' text format, by prometheus-client):

- `llm_requests_total{route, status}`: requests answered, by route (unknown paths as `other`)
  and HTTP status, 401s and 503s included;
- `llm_request_duration_seconds{route}`: from the request's arrival to its last byte (a
  stream's included);
- `llm_time_to_first_token_seconds`: from a generation request's arrival to its first token;
- `llm_generated_tokens_total`: tokens generated, every choice's;
- `llm_requests_in_flight`: requests being answered now; `llm_requests_waiting`: generation
  requests accepted that have no token yet (queued in the ONNX engine, or prefilling);
- `llm_served_model_info{model, version, runtime}`: 1 for the version answering.

Each app has its own registry, so several apps in one process (the tests) count apart.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# From a cached short answer to a long stream on 2 CPU cores.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
CONTENT_TYPE = CONTENT_TYPE_LATEST

Asgi = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Any]


class Metrics:
    def __init__(self, routes: tuple[str, ...]) -> None:
        """`routes`: the paths counted by name (any other is `other`)."""
        self.routes = frozenset(routes)
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "llm_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.duration = Histogram(
            "llm_request_duration_seconds", "Request latency, to the last byte", ["route"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "llm_time_to_first_token_seconds", "From a generation request's arrival to its "
            "first token", buckets=FIRST_TOKEN_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("llm_generated_tokens", "Tokens generated", registry=r)
        self.in_flight = Gauge("llm_requests_in_flight", "Requests being answered", registry=r)
        self.waiting = Gauge(
            "llm_requests_waiting", "Generation requests accepted with no token yet", registry=r
        )
        self.model = Gauge(
            "llm_served_model_info", "The version answering (1)",
            ["model", "version", "runtime"], registry=r,
        )  # fmt: skip

    def serving(self, model: str, version: str | None, runtime: str) -> None:
        """The version answering now (a switch replaces the one before)."""
        self.model.clear()
        self.model.labels(model, version or "", runtime).set(1)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def middleware(self, app: Asgi) -> Asgi:
        """ASGI middleware counting every HTTP request by route and status, and timing it to
        its last byte (a pure ASGI wrapper: streams pass through unbuffered)."""

        async def counted(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            route = scope["path"] if scope["path"] in self.routes else "other"
            started, status = time.perf_counter(), [500]
            self.in_flight.inc()

            async def sending(message: dict) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, sending)
            finally:
                self.in_flight.dec()
                self.requests.labels(route, str(status[0])).inc()
                self.duration.labels(route).observe(time.perf_counter() - started)

        return counted
