"""Prometheus metrics, defined once for the whole process.

Every layer that does something worth counting imports its metric from here, and the service's
``GET /metrics`` exposes :data:`REGISTRY`. A dedicated registry (not the client's global one)
keeps the exposition to our own metrics and lets tests read values without interference from
other libraries.

With several replicas, :func:`exposition` adds the label ``instance`` (the replica's id) to
every series, and leaves out the fleet-wide gauges (:data:`FLEET_GAUGES`: backends by status,
pull tasks by status, queue depth) unless this replica is the leader: they describe the whole
fleet, a follower's copy would be stale, and summing them over replicas would count everything
several times.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

__all__ = [
    "BACKENDS",
    "BACKEND_FAILURES",
    "CYCLE_DURATION",
    "DOWNLOAD_BYTES",
    "DOWNLOAD_FAILURES",
    "FLEET_GAUGES",
    "LEADER",
    "MODELS_DELETED",
    "MODELS_PULLED",
    "PULL_DURATION",
    "PULL_TASKS",
    "QUEUE_DEPTH",
    "REGISTRY",
    "ROUTINE_FAILURES",
    "TERM",
    "exposition",
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
LEADER = Gauge(
    "runtimestate_leader",
    "1 while this replica is the leader that runs backend cycles, else 0.",
    registry=REGISTRY,
)
TERM = Gauge(
    "runtimestate_leader_term",
    "The leadership term this replica last saw (increases on every change of leader).",
    registry=REGISTRY,
)

# Families that describe the whole fleet: exported by the leader only.
FLEET_GAUGES: set[str] = {
    "runtimestate_backends",
    "runtimestate_pull_tasks",
    "runtimestate_queue_depth",
}


class _Labelled(Collector):
    def __init__(self, registry: CollectorRegistry, *, instance: str | None, leader: bool) -> None:
        self._registry = registry
        self._instance = instance
        self._leader = leader

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name in FLEET_GAUGES and not self._leader:
                continue
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                labels = dict(sample.labels)
                if self._instance is not None:
                    labels["instance"] = self._instance
                labelled.add_sample(
                    sample.name,
                    labels,
                    sample.value,
                    sample.timestamp,
                    sample.exemplar,
                )
            yield labelled


def exposition(
    *, instance: str | None, leader: bool, registry: CollectorRegistry = REGISTRY
) -> bytes:
    """The text exposition of ``registry`` with ``instance`` on every series (none: a process
    that is no replica, such as a library user's app); the fleet-wide gauges only when
    ``leader``."""
    LEADER.set(1 if leader else 0)
    view = CollectorRegistry(auto_describe=False)
    view.register(_Labelled(registry, instance=instance, leader=leader))
    return bytes(generate_latest(view))
