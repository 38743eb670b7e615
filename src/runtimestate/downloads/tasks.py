"""The bookkeeping of pulls: which (backend, model) pairs have a task, and what operators do
to them. The worker that carries a task out is :mod:`.worker`; the SQL is the store's.

Level-triggered, as a controller: the backend cycle computes every declared model missing from
every observed backend and hands the pairs to :func:`reconcile_tasks`, which

* **adds** a ``queued`` task for each missing pair that has none - whatever status an existing
  task has (running, failed and waiting, cancelled by an operator) it is left alone, so a
  restart or a second replica never queues what is already being pulled, and a cancel sticks;
* **removes** tasks that are not wanted any more: a model no longer declared for the backend
  (un-declared, the backend deleted or taken out of the pools that wanted the model), running
  or not - the worker sees its task gone at its next heartbeat, and sooner through a
  ``queue_cancel`` notice naming the pair; and, for a backend observed this cycle, a task that
  is not running whose model is already there.

Un-declaring a model or deleting a backend does not wait for the next cycle: the API calls
:func:`forget` at once (a deleted backend's tasks also go with it in the database). A change of
pools is left to the next cycle.

A steady cycle (nothing missing, nothing to remove) reads the task table once and writes
nothing. After adding, a notice on :data:`TASKS_NOTICE` wakes idle workers in every process.

An operator cancels (:func:`cancel`: the tasks become ``cancelled``, a running pull is stopped
through the bus and, for a worker that missed the message, at its next heartbeat) and retries
(:func:`retry`: cancelled and failed tasks are queued again, due now). Both say when nothing
matched (``NotFound``), never a false success.

Failures wait out an exponential back-off with jitter (:class:`Backoff`), computed here and
recorded on the task by the worker.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta

from runtimestate.bus.base import Messenger
from runtimestate.errors import InvalidInput, NotFound
from runtimestate.metrics import PULL_TASKS, QUEUE_DEPTH
from runtimestate.records import Download
from runtimestate.store.base import Store
from runtimestate.store.records import Backend, PullStatus, PullTask

__all__ = [
    "MODEL_DOWNLOAD",
    "QUEUE_CANCEL",
    "TASKS_NOTICE",
    "Backoff",
    "QueueEntry",
    "TaskChanges",
    "cancel",
    "download_of",
    "forget",
    "list_queue",
    "notify_workers",
    "queue_download",
    "reconcile_tasks",
    "refresh_task_metrics",
    "remove_pending",
    "request_cancel",
    "retry",
]

MODEL_DOWNLOAD = "model_download"
QUEUE_CANCEL = "queue_cancel"
TASKS_NOTICE = "download_tasks"

Pair = tuple[str, str]  # (backend id, model)


@dataclass(frozen=True, kw_only=True, slots=True)
class Backoff:
    """How long a failed pull waits: ``initial`` doubled per failure up to ``maximum``, times a
    random factor in ``[1 - jitter, 1]`` so that a fleet of failures does not retry in step."""

    initial: float = 15.0
    maximum: float = 1800.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum < self.initial:
            raise InvalidInput("back-off needs 0 < initial <= maximum", field="backoff")
        if not 0 <= self.jitter < 1:
            raise InvalidInput("back-off jitter must be in [0, 1)", field="backoff")

    def delay(self, failures: int, *, rand: Callable[[], float] = random.random) -> timedelta:
        """The wait after the ``failures``-th failure in a row (1 for the first)."""
        exponent = min(max(failures - 1, 0), 32)
        base = min(self.maximum, self.initial * 2**exponent)
        return timedelta(seconds=base * (1 - self.jitter * rand()))


@dataclass(frozen=True, kw_only=True, slots=True)
class QueueEntry:
    """A task with the base URL of its backend, as ``GET /queue`` lists it."""

    task: PullTask
    url: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskChanges:
    """What :func:`reconcile_tasks` did, and the tasks as they stand afterwards."""

    added: list[PullTask]
    removed: list[PullTask]
    tasks: list[PullTask]


def download_of(task: PullTask) -> Download:
    """The ``downloads`` entry of a backend's state for ``task``."""
    running = task.status is PullStatus.RUNNING
    return Download(
        model=task.model,
        status=task.status.value,
        attempts=task.attempt,
        last_error=task.last_error,
        next_attempt_at=task.next_attempt_at if task.status is PullStatus.FAILED else None,
        completed=task.completed,
        total=task.total,
        started_at=task.started_at if running else None,
        worker=task.owner or "" if running else "",
    )


async def reconcile_tasks(
    store: Store,
    messenger: Messenger,
    *,
    tasks: Iterable[PullTask],
    missing: Sequence[Pair],
    declared: Collection[Pair],
    observed: Collection[str],
    urls: Mapping[str, str],
) -> TaskChanges:
    """Bring the tasks in line with one backend cycle (see the module docstring).

    ``tasks`` as read at the start of the cycle; ``missing`` the pairs whose model a backend
    should hold and does not, in the order they are to be queued; ``declared`` every pair a
    backend should hold; ``observed`` the backends observed this cycle (a backend that failed
    to answer keeps its tasks); ``urls`` backend id to base URL, for the cancel notices. Store
    failures propagate.
    """
    existing = {(t.backend_id, t.model): t for t in tasks}
    to_add = [pair for pair in missing if pair not in existing]
    still_missing = set(missing)
    to_remove = [
        pair
        for pair, task in existing.items()
        if pair not in declared
        or (
            pair[0] in observed
            and pair not in still_missing
            and task.status is not PullStatus.RUNNING
        )
    ]
    removed = await store.delete_pull_tasks(to_remove) if to_remove else []
    for task in removed:
        if task.status is PullStatus.RUNNING:
            await _publish_cancel(messenger, model=task.model, url=urls.get(task.backend_id))
    added = await store.add_pull_tasks(to_add) if to_add else []
    if added:
        await notify_workers(messenger)
    gone = {(t.backend_id, t.model) for t in removed}
    current = [t for pair, t in existing.items() if pair not in gone] + added
    _count(current)
    return TaskChanges(added=added, removed=removed, tasks=current)


def _count(tasks: Iterable[PullTask]) -> None:
    counts = dict.fromkeys(PullStatus, 0)
    for task in tasks:
        counts[task.status] += 1
    for status, count in counts.items():
        PULL_TASKS.labels(status=status.value).set(count)
    QUEUE_DEPTH.set(counts[PullStatus.QUEUED] + counts[PullStatus.FAILED])


async def forget(
    store: Store, messenger: Messenger, *, model: str | None = None, backend: Backend | None = None
) -> list[PullTask]:
    """Un-declaring ``model`` (everywhere) or deleting ``backend``: remove their tasks at once,
    whatever their status, and stop their running pulls - through the bus now, and through the
    task's absence at the worker's next heartbeat if the message is missed."""
    if model is None and backend is None:
        raise InvalidInput("name a model or a backend to forget", field="model")
    tasks = await store.list_pull_tasks(
        backend_id=None if backend is None else backend.id, model=model
    )
    removed = await store.delete_pull_tasks([(t.backend_id, t.model) for t in tasks])
    running = [t for t in removed if t.status is PullStatus.RUNNING]
    if running:
        urls = {b.id: b.base_url for b in await store.list_all_backends()}
        if backend is not None:
            urls[backend.id] = backend.base_url
        for task in running:
            await _publish_cancel(messenger, model=task.model, url=urls.get(task.backend_id))
    return removed


async def refresh_task_metrics(store: Store) -> None:
    """Set the task gauges from one read of the task table."""
    _count(await store.list_pull_tasks())


async def notify_workers(messenger: Messenger) -> None:
    """Tell every process's idle workers that tasks were queued."""
    await messenger.publish(TASKS_NOTICE, b"{}")


async def request_cancel(messenger: Messenger, id: str) -> None:
    """Ask every worker to stop the pull whose backend URL or model is ``id`` (the message of
    the Go package; a worker that gets it marks its task ``cancelled``)."""
    await messenger.publish(QUEUE_CANCEL, json.dumps({"id": id}).encode())


async def _publish_cancel(messenger: Messenger, *, model: str, url: str | None) -> None:
    # With "url", only the pull of ``model`` on that backend matches.
    body: dict[str, str] = {"id": model}
    if url is not None:
        body["url"] = url
    await messenger.publish(QUEUE_CANCEL, json.dumps(body).encode())


async def _backend_ids(store: Store, url: str | None) -> list[str | None]:
    if url is None:
        return [None]
    ids: list[str | None] = [b.id for b in await store.list_all_backends() if b.base_url == url]
    return ids


async def cancel(
    store: Store, messenger: Messenger, *, model: str | None = None, url: str | None = None
) -> list[PullTask]:
    """Cancel the queued, running and failed pulls of ``model`` and/or on the backend at
    ``url``; ``NotFound`` when there is none. Running pulls are stopped through the bus at once
    and through their task at the worker's next heartbeat."""
    if model is None and url is None:
        raise InvalidInput("name a model or a backend URL to cancel", field="model")
    cancelled: list[PullTask] = []
    for backend_id in await _backend_ids(store, url):
        cancelled += await store.cancel_pull_tasks(backend_id=backend_id, model=model)
    if not cancelled:
        what = " and ".join(filter(None, (model and repr(model), url and f"on {url}")))
        raise NotFound(f"no download of {what} is queued, running or waiting to retry")
    if model is not None:
        await request_cancel(messenger, model)
    elif url is not None:
        await request_cancel(messenger, url)
    return cancelled


async def retry(
    store: Store, messenger: Messenger, *, model: str | None = None, url: str | None = None
) -> list[PullTask]:
    """Queue the cancelled and failed pulls of ``model`` and/or on the backend at ``url``
    again, due now (both None: all of them); ``NotFound`` when there is none."""
    retried: list[PullTask] = []
    for backend_id in await _backend_ids(store, url):
        retried += await store.retry_pull_tasks(backend_id=backend_id, model=model)
    if not retried:
        raise NotFound("no cancelled or failed download matches")
    await notify_workers(messenger)
    return retried


async def list_queue(store: Store) -> list[QueueEntry]:
    """Every task with its backend's URL: running first, then by backend."""
    urls = {b.id: b.base_url for b in await store.list_all_backends()}
    tasks = await store.list_pull_tasks()
    order = {PullStatus.RUNNING: 0, PullStatus.QUEUED: 1, PullStatus.FAILED: 2}
    tasks.sort(key=lambda t: (order.get(t.status, 3), t.created_at, t.backend_id, t.model))
    return [QueueEntry(task=t, url=urls.get(t.backend_id, "")) for t in tasks]


async def _backend_at(store: Store, url: str) -> Backend:
    for backend in await store.list_all_backends():
        if backend.base_url == url:
            return backend
    raise NotFound(f"no backend has the base URL {url!r}")


async def queue_download(store: Store, *, url: str, model: str) -> bool:
    """Queue a pull of ``model`` on the backend at ``url`` by hand; False if it has a task
    already (any status). ``NotFound`` if no backend has that URL."""
    backend = await _backend_at(store, url)
    return bool(await store.add_pull_tasks([(backend.id, model)]))


async def remove_pending(store: Store, *, model: str | None = None, url: str | None = None) -> int:
    """Delete the tasks of ``model`` and/or on ``url`` that are not running (both None: all);
    how many went. A running pull is cancelled with :func:`cancel` instead."""
    pairs = [
        (entry.task.backend_id, entry.task.model)
        for entry in await list_queue(store)
        if entry.task.status is not PullStatus.RUNNING
        and (model is None or entry.task.model == model)
        and (url is None or entry.url == url)
    ]
    return len(await store.delete_pull_tasks(pairs)) if pairs else 0
