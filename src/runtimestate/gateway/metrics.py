"""The gateway's Prometheus series, on the process registry the service exposes at ``/metrics``.

Labels are bounded on purpose: ``model`` is the name a backend serves (or ``unknown`` for a
request that matched nothing, so a client inventing names cannot grow the series without end),
``backend`` a declared backend's name, ``route`` one of the gateway's fixed paths and ``outcome``
one of a handful of words (ok, client_error, upstream_error, no_backend, unauthorized,
disconnected, incomplete).

The gateway reaches its series through the functions below, not ``.labels()``: ``labels()``
checks and looks up its values under a lock on every call, five times a request, and showed in
the gateway's profile; the children for a label set are made once and kept (in a bounded cache,
as the label sets themselves are bounded).
"""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

from runtimestate.metrics import REGISTRY

__all__ = [
    "IN_FLIGHT",
    "LATENCY",
    "REQUESTS",
    "RETRIES",
    "TOKENS",
    "TTFT",
    "in_flight",
    "latency",
    "requests",
    "retries",
    "tokens",
    "ttft",
]

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

REQUESTS = Counter(
    "runtimestate_gateway_requests_total",
    "Gateway requests by route, served model, backend and outcome.",
    ["route", "model", "backend", "outcome"],
    registry=REGISTRY,
)
RETRIES = Counter(
    "runtimestate_gateway_retries_total",
    "Requests sent to a second backend because the first failed before its first byte.",
    ["route"],
    registry=REGISTRY,
)
LATENCY = Histogram(
    "runtimestate_gateway_request_seconds",
    "Time from a request's arrival to the end of its answer (a stream's last chunk).",
    ["route"],
    registry=REGISTRY,
    buckets=_BUCKETS,
)
TTFT = Histogram(
    "runtimestate_gateway_first_token_seconds",
    "Time from a streamed request's arrival to its first chunk from the backend.",
    ["route"],
    registry=REGISTRY,
    buckets=_BUCKETS,
)
TOKENS = Counter(
    "runtimestate_gateway_tokens_total",
    "Tokens the backends reported in their usage, by served model and direction (in, out).",
    ["model", "direction"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "runtimestate_gateway_in_flight",
    "Gateway requests being answered, per backend.",
    ["backend"],
    registry=REGISTRY,
)

_CACHED = 4096


@lru_cache(maxsize=_CACHED)
def requests(route: str, model: str, backend: str, outcome: str) -> Counter:
    return REQUESTS.labels(route, model, backend, outcome)


@lru_cache(maxsize=_CACHED)
def retries(route: str) -> Counter:
    return RETRIES.labels(route)


@lru_cache(maxsize=_CACHED)
def latency(route: str) -> Histogram:
    return LATENCY.labels(route)


@lru_cache(maxsize=_CACHED)
def ttft(route: str) -> Histogram:
    return TTFT.labels(route)


@lru_cache(maxsize=_CACHED)
def tokens(model: str, direction: str) -> Counter:
    return TOKENS.labels(model, direction)


@lru_cache(maxsize=_CACHED)
def in_flight(backend: str) -> Gauge:
    return IN_FLIGHT.labels(backend)
