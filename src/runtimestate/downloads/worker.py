"""The download queue and the download cycle: pull one queued model, report its progress.

The queue is the store's job table: jobs of type :data:`MODEL_DOWNLOAD`, id = the backend's
base URL (so at most one download is pending per backend), payload ``{"url","model"}``. The
backend cycle is the source of truth: it re-detects missing models each pass, so a lost job (a
crash mid-pull) is simply queued again by the next pass.

Popping a job frees its id, so the backend cycle could queue the model again while it is being
pulled, and a second worker could pull it too. A **lease** ``download:<url>`` closes that gap:
the puller holds it (renewed while progress flows, released in ``finally``), the backend cycle
does not queue for a backend whose lease is held, and a worker that pops a job for a leased
backend puts it back. Leases live in the store, so this holds across workers and processes on
one PostgreSQL; a crashed worker's lease simply expires. The lease holder is
``<worker id>|<model>`` so that :func:`list_running` can say what is being pulled (``|`` is not
allowed in Ollama model names).

The pull itself (the HTTP stream) belongs to the Ollama driver; this module receives it as a
:data:`Puller` so that it stays free of HTTP. It publishes the seed's status JSON on
:data:`MODEL_DOWNLOAD`: every status change, byte progress at most every ``progress_interval``
seconds and only on a new whole percent (Ollama emits progress many times a second), and the
final ``success`` always. A message on :data:`QUEUE_CANCEL` whose ``id`` is the job's URL or
model closes the stream at once.

A pull the backend refuses (an ``{"error"}`` line such as ``file does not exist``, or an error
status) is **held back** for ``retry_after`` seconds: a ``pull-failed:<url>|<model>`` lease
that the backend cycle reads, so that it queues the node's other missing models first (one job
per node means that one model that cannot be pulled - a typo, or a cloud model name declared for
every backend without pools - would otherwise be queued again and again and block every model
after it). When nothing else is missing it is queued again at once, as before. A pull that
failed because the node itself went away (refused, dropped, stalled) is not held back: nothing
else could be pulled there either.

Every log line of a download (started, deferred, cancelled, failed, pulled) carries the
``backend_id`` of the backend at the job's URL, like the backend cycle's lines. The payload has
only the URL (the seed's shape), so the id comes from the URL-to-id map the backend cycle hands
over (:meth:`Downloader.know_backends`), else from one listing of the declared backends; a URL no
backend has any more logs an empty id. A failed lookup never fails a pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtimestate.bus.base import Messenger, Subscription
from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    Conflict,
    InvalidInput,
    NotFound,
    RuntimeStateError,
    redact,
)
from runtimestate.metrics import DOWNLOAD_BYTES, DOWNLOAD_FAILURES, MODELS_PULLED, QUEUE_DEPTH
from runtimestate.store.base import Store
from runtimestate.store.records import Job

__all__ = [
    "FAILED_PREFIX",
    "LEASE_PREFIX",
    "MODEL_DOWNLOAD",
    "QUEUE_CANCEL",
    "DownloadOutcome",
    "DownloadStatus",
    "Downloader",
    "PendingDownload",
    "Puller",
    "RunningDownload",
    "lease_name",
    "list_held_back",
    "list_pending",
    "list_running",
    "queue_download",
    "queue_downloads",
    "remove_pending",
    "request_cancel",
]

MODEL_DOWNLOAD = "model_download"
QUEUE_CANCEL = "queue_cancel"
LEASE_PREFIX = "download:"
FAILED_PREFIX = "pull-failed:"

logger = logging.getLogger(__name__)

# Opens the pull stream of (base_url, model): an iterator of the decoded NDJSON objects.
Puller = Callable[[str, str], AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]]


def lease_name(url: str) -> str:
    return LEASE_PREFIX + url


def _held_back_name(url: str, model: str) -> str:
    return f"{FAILED_PREFIX}{url}|{model}"


class DownloadStatus(BaseModel):
    """One progress event, in the seed's JSON: ``{"status","digest","total","completed",
    "model","baseUrl"}``."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, serialize_by_alias=True)

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0
    model: str
    base_url: str = Field(alias="baseUrl")


@dataclass(frozen=True, kw_only=True, slots=True)
class PendingDownload:
    url: str
    model: str
    created_at: datetime | None


@dataclass(frozen=True, kw_only=True, slots=True)
class RunningDownload:
    url: str
    model: str
    worker: str
    expires_at: datetime


class DownloadOutcome(StrEnum):
    """How the last download cycle ended (the cycle returns a bool; tests and logs use it)."""

    EMPTY = "empty"
    DEFERRED = "deferred"
    CANCELLED = "cancelled"
    SUCCEEDED = "succeeded"


def _payload(job: Job) -> tuple[str, str]:
    try:
        data = json.loads(job.payload)
        url, model = data["url"], data["model"]
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidInput(f"download job {job.id!r} has a malformed payload") from exc
    if not isinstance(url, str) or not isinstance(model, str) or not url or not model:
        raise InvalidInput(f"download job {job.id!r} has a malformed payload")
    return url, model


def _job(url: str, model: str) -> Job:
    payload = json.dumps({"url": url, "model": model}).encode()
    return Job(id=url, task_type=MODEL_DOWNLOAD, payload=payload)


async def queue_download(store: Store, url: str, model: str) -> bool:
    """Queue a pull of ``model`` on the backend at ``url``; False if one is already pending
    for that backend (the job id is the URL). Store failures propagate."""
    try:
        await store.append_job(_job(url, model))
    except Conflict:
        return False
    return True


async def queue_downloads(store: Store, requests: Sequence[tuple[str, str]]) -> list[bool]:
    """Queue several ``(url, model)`` pulls; for each, whether it was queued (False: one was
    already pending for that URL). One transaction when no job is pending for any of them -
    the common case, and the difference between one commit and a thousand in a cycle over a
    large fleet; one by one otherwise. Store failures propagate."""
    if not requests:
        return []
    try:
        await store.append_jobs([_job(url, model) for url, model in requests])
    except Conflict:
        return [await queue_download(store, url, model) for url, model in requests]
    return [True] * len(requests)


async def request_cancel(messenger: Messenger, id: str) -> None:
    """Ask every worker to stop the pull whose backend URL or model is ``id``."""
    await messenger.publish(QUEUE_CANCEL, json.dumps({"id": id}).encode())


async def list_pending(store: Store) -> list[PendingDownload]:
    """Queued downloads, oldest first. A job with a malformed payload is listed with an empty
    model so that an operator can see and remove it."""
    pending = []
    for job in await store.get_jobs_for_type(MODEL_DOWNLOAD):
        try:
            url, model = _payload(job)
        except InvalidInput:
            url, model = job.id, ""
        pending.append(PendingDownload(url=url, model=model, created_at=job.created_at))
    QUEUE_DEPTH.set(len(pending))
    return pending


async def list_running(store: Store) -> list[RunningDownload]:
    """Pulls in progress, from the unexpired ``download:<url>`` leases."""
    running = []
    for lease in await store.list_leases(LEASE_PREFIX):
        worker, _, model = lease.holder.rpartition("|")
        running.append(
            RunningDownload(
                url=lease.name[len(LEASE_PREFIX) :],
                model=model,
                worker=worker,
                expires_at=lease.expires_at,
            )
        )
    return running


async def list_held_back(store: Store) -> dict[str, frozenset[str]]:
    """Per backend URL, the models whose last pull the backend refused and that are not to be
    queued again yet (from the unexpired ``pull-failed:`` leases)."""
    held: dict[str, set[str]] = {}
    for lease in await store.list_leases(FAILED_PREFIX):
        url, _, model = lease.name[len(FAILED_PREFIX) :].rpartition("|")
        held.setdefault(url, set()).add(model)
    return {url: frozenset(models) for url, models in held.items()}


async def remove_pending(store: Store, model: str | None = None, url: str | None = None) -> int:
    """Remove queued downloads of ``model`` and/or on ``url`` (all of them when neither is
    given); return how many were removed. A job popped meanwhile is simply not counted."""
    removed = 0
    for pending in await list_pending(store):
        if model is not None and pending.model != model:
            continue
        if url is not None and pending.url != url:
            continue
        try:
            await store.delete_job(pending.url)
        except NotFound:
            continue
        removed += 1
    return removed


class Downloader:
    """Runs download cycles for one worker. Holds no background task: each call of
    :meth:`run_cycle` is one unit of work that ends before it returns."""

    def __init__(
        self,
        store: Store,
        messenger: Messenger,
        puller: Puller,
        *,
        worker_id: str,
        clock: Clock = SYSTEM_CLOCK,
        progress_interval: float = 0.25,
        stall_timeout: float = 60.0,
        lease_ttl: float = 60.0,
        retry_after: float = 300.0,
    ) -> None:
        if "|" in worker_id:
            raise InvalidInput("worker id must not contain '|'", field="worker_id")
        self._store = store
        self._messenger = messenger
        self._puller = puller
        self.worker_id = worker_id
        self._clock = clock
        self._progress_interval = progress_interval
        self._stall_timeout = stall_timeout
        self._lease_ttl = timedelta(seconds=lease_ttl)
        self._retry_after = timedelta(seconds=retry_after)
        # A lease held by this worker would be granted again (a renewal), so concurrent cycles
        # of one worker also check the URLs it is pulling right now.
        self._pulling: set[str] = set()
        self._backend_ids: dict[str, str] = {}
        self.last_outcome = DownloadOutcome.EMPTY

    def know_backends(self, backend_ids: Mapping[str, str]) -> None:
        """Remember which backend id each base URL belongs to (for log lines)."""
        self._backend_ids = dict(backend_ids)

    async def _backend_id(self, url: str) -> str:
        """The id of the backend at ``url``; "" when none has it or the store cannot say."""
        known = self._backend_ids.get(url)
        if known is not None:
            return known
        try:
            backends = await self._store.list_all_backends()
        except RuntimeStateError:
            return ""
        self._backend_ids = {b.base_url: b.id for b in backends}
        # Remembered as "" too, so a job for a removed backend does not list them all again.
        return self._backend_ids.setdefault(url, "")

    async def run_cycle(self) -> bool:
        """Pop one job and pull it. True if a job was processed (pulled or cancelled), False
        if the queue was empty or the backend is busy with another worker's pull (the job is
        then queued again, and returning False keeps a drain loop from spinning on it)."""
        try:
            job = await self._store.pop_job_for_type(MODEL_DOWNLOAD)
        except NotFound:
            self.last_outcome = DownloadOutcome.EMPTY
            return False
        url, model = _payload(job)
        holder = f"{self.worker_id}|{model}"
        # Claimed before the first await: another cycle of this worker popping a job for the
        # same URL meanwhile would get the lease as a renewal (same holder) and pull too.
        claimed = url not in self._pulling
        if claimed:
            self._pulling.add(url)
        try:
            log_extra = {"backend_id": await self._backend_id(url), "url": url, "model": model}
            lease = None
            if claimed:
                lease = await self._store.acquire_lease(
                    lease_name(url), holder=holder, ttl=self._lease_ttl
                )
            if lease is None:
                with contextlib.suppress(Conflict):
                    # Conflict: the backend cycle already queued it again. Either way it is.
                    await self._store.append_job(_job(url, model))
                logger.info("download deferred: backend busy", extra=log_extra)
                self.last_outcome = DownloadOutcome.DEFERRED
                return False
            logger.info("download started", extra=log_extra)
            try:
                async with await self._messenger.stream(QUEUE_CANCEL) as cancels:
                    self.last_outcome = await self._pull_or_cancel(
                        url, model, holder, cancels, log_extra
                    )
            finally:
                await asyncio.shield(self._store.release_lease(lease_name(url), holder=holder))
            return True
        finally:
            if claimed:
                self._pulling.discard(url)

    async def _pull_or_cancel(
        self,
        url: str,
        model: str,
        holder: str,
        cancels: Subscription,
        log_extra: dict[str, str],
    ) -> DownloadOutcome:
        pull = asyncio.create_task(
            self._pull(url, model, holder, log_extra), name=f"pull {model} on {redact(url)}"
        )
        watch = asyncio.create_task(self._watch(cancels, url, model), name=f"cancel {url}")
        try:
            await asyncio.wait({pull, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pull, watch):
                task.cancel()
            await asyncio.wait({pull, watch})
        if pull.done() and not pull.cancelled():
            # The pull ended first (or together with a cancel): its outcome stands.
            pull.result()
            return DownloadOutcome.SUCCEEDED
        # Otherwise the watcher ended it: a cancel message, or a bus failure that result() raises.
        watch.result()
        logger.info("download cancelled", extra=log_extra)
        await self._publish(DownloadStatus(status="cancelled", model=model, base_url=url))
        return DownloadOutcome.CANCELLED

    async def _watch(self, cancels: Subscription, url: str, model: str) -> None:
        async for message in cancels:
            try:
                target = json.loads(message.data).get("id")
            except (ValueError, AttributeError):
                logger.warning("ignored malformed cancel message")
                continue
            if target in (url, model):
                return
        # The subscription ended (bus closed): never return, the pull decides the outcome.
        await asyncio.Event().wait()

    async def _pull(self, url: str, model: str, holder: str, log_extra: dict[str, str]) -> None:
        try:
            await self._consume(url, model, holder, log_extra)
        except BackendError as exc:
            # Same class (so callers can tell a broken stream from a refused pull), but a
            # message that always names the model and the backend.
            failure = type(exc)(
                f"pull of {model} on {redact(url)} failed: {exc}", backend=redact(url)
            )
            failure.__cause__ = exc
        else:
            return
        DOWNLOAD_FAILURES.inc()
        logger.error("pull failed: %s", failure, extra=log_extra)
        if not isinstance(failure, BackendUnreachable):
            await self._hold_back(url, model, log_extra)
        await self._publish(DownloadStatus(status=f"error: {failure}", model=model, base_url=url))
        raise failure

    async def _hold_back(self, url: str, model: str, log_extra: dict[str, str]) -> None:
        """Keep the backend cycle from queueing a refused pull again for ``retry_after``."""
        try:
            await self._store.acquire_lease(
                _held_back_name(url, model), holder=self.worker_id, ttl=self._retry_after
            )
        except RuntimeStateError as exc:
            # The pull's own failure is what the caller must see; this only costs a retry.
            logger.warning("could not hold back the failed pull: %s", exc, extra=log_extra)
            return
        logger.info(
            "model held back from the queue for %g s",
            self._retry_after.total_seconds(),
            extra=log_extra,
        )

    async def _consume(self, url: str, model: str, holder: str, log_extra: dict[str, str]) -> None:
        """Read the pull stream to its ``success`` line, publishing throttled progress."""
        last_status = ""
        last_percent = -1
        last_publish = float("-inf")
        last_renew = self._clock.monotonic()
        completed_by_digest: dict[str, int] = {}
        async with self._puller(url, model) as lines:
            iterator = aiter(lines)
            while True:
                try:
                    async with asyncio.timeout(self._stall_timeout):
                        line = await anext(iterator)
                except StopAsyncIteration:
                    raise BackendUnreachable(
                        "the stream ended before success", backend=url
                    ) from None
                except TimeoutError as exc:
                    raise BackendUnreachable(
                        f"stalled: no progress for {self._stall_timeout:g} s", backend=url
                    ) from exc
                if "error" in line:
                    raise BackendError(str(line["error"]), backend=url)
                status = _status(line, model, url)
                now = self._clock.monotonic()
                if now - last_renew >= self._lease_ttl.total_seconds() / 3:
                    await self._renew(url, holder)
                    last_renew = now
                if status.digest:
                    previous = completed_by_digest.get(status.digest, 0)
                    if status.completed > previous:
                        DOWNLOAD_BYTES.inc(status.completed - previous)
                        completed_by_digest[status.digest] = status.completed
                percent = status.completed * 100 // status.total if status.total else -1
                changed = status.status != last_status
                progressed = percent > last_percent and (
                    now - last_publish >= self._progress_interval
                )
                if changed or progressed or status.status == "success":
                    await self._publish(status)
                    last_status, last_percent, last_publish = status.status, percent, now
                if status.status == "success":
                    MODELS_PULLED.inc()
                    logger.info("model pulled", extra=log_extra)
                    return

    async def _renew(self, url: str, holder: str) -> None:
        lease = await self._store.acquire_lease(lease_name(url), holder=holder, ttl=self._lease_ttl)
        if lease is None:
            raise BackendError(f"lost the download lease of {url}", backend=url)

    async def _publish(self, status: DownloadStatus) -> None:
        await self._messenger.publish(MODEL_DOWNLOAD, status.model_dump_json().encode())


def _status(line: dict[str, Any], model: str, url: str) -> DownloadStatus:
    def number(key: str) -> int:
        value = line.get(key, 0)
        return value if isinstance(value, int) else 0

    status = line.get("status")
    digest = line.get("digest")
    return DownloadStatus(
        status=status if isinstance(status, str) else "",
        digest=digest if isinstance(digest, str) else "",
        total=number("total"),
        completed=number("completed"),
        model=model,
        base_url=url,
    )
