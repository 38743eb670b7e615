"""Prometheus metrics, defined once for the whole process.

Every layer that does something worth counting imports its metric from here, and the service's
``GET /metrics`` exposes :data:`REGISTRY`. A dedicated registry (not the client's global one)
keeps the exposition to our own metrics and lets tests read values without interference from
other libraries.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = [
    "BACKENDS",
    "BACKEND_FAILURES",
    "CYCLE_DURATION",
    "DOWNLOAD_BYTES",
    "DOWNLOAD_FAILURES",
    "MODELS_DELETED",
    "MODELS_PULLED",
    "PULL_DURATION",
    "PULL_TASKS",
    "QUEUE_DEPTH",
    "REGISTRY",
    "ROUTINE_FAILURES",
]

REGISTRY = CollectorRegistry(auto_describe=True)

CYCLE_DURATION = Histogram(
    "runtimestate_cycle_duration_seconds",
    "Wall time of one reconciliation or download cycle.",
    ["cycle"],
    registry=REGISTRY,
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
BACKENDS = Gauge(
    "runtimestate_backends",
    "Backends in the last snapshot, by status (ok or error).",
    ["status"],
    registry=REGISTRY,
)
BACKEND_FAILURES = Counter(
    "runtimestate_backend_failures_total",
    "Backend observations or actions that failed, by backend type.",
    ["type"],
    registry=REGISTRY,
)
MODELS_PULLED = Counter(
    "runtimestate_models_pulled_total", "Model downloads that completed.", registry=REGISTRY
)
MODELS_DELETED = Counter(
    "runtimestate_models_deleted_total",
    "Undeclared models deleted from backends.",
    registry=REGISTRY,
)
DOWNLOAD_BYTES = Counter(
    "runtimestate_download_bytes_total",
    "Bytes reported completed by model pulls.",
    registry=REGISTRY,
)
DOWNLOAD_FAILURES = Counter(
    "runtimestate_download_failures_total",
    "Model pulls that failed, by reason (no_headers, stalled, timeout, dropped, unreachable, "
    "refused, http_error, protocol).",
    ["reason"],
    registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "runtimestate_queue_depth",
    "Pull tasks waiting for a worker (queued, or failed and waiting for their next attempt).",
    registry=REGISTRY,
)
PULL_TASKS = Gauge(
    "runtimestate_pull_tasks",
    "Pull tasks by status (queued, running, failed, cancelled), as of the last backend cycle.",
    ["status"],
    registry=REGISTRY,
)
PULL_DURATION = Histogram(
    "runtimestate_pull_duration_seconds",
    "Wall time of one pull attempt, by outcome (succeeded, failed, cancelled, lost).",
    ["outcome"],
    registry=REGISTRY,
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200, 21600),
)
ROUTINE_FAILURES = Counter(
    "runtimestate_routine_failures_total",
    "Cycles of a scheduled routine (backend cycle, download worker) that raised.",
    ["runner"],
    registry=REGISTRY,
)
