"""The download worker: claim one pull task, pull it within explicit bounds, record the outcome.

One :meth:`PullWorker.run_cycle` is one unit of work: claim a due task (one statement, the
caller becomes its owner: see :meth:`~runtimestate.store.Store.claim_pull_task`), stream the
pull, and write what happened on the task - deleted when the model landed, ``failed`` with the
reason and a next attempt after back-off, ``cancelled``, or given back ``queued`` when the
worker itself is being stopped. A backend's failure is a result recorded on its task, never an
exception: ``run_cycle`` raises only when the store cannot be reached, or for a bug, so one
(backend, model) that keeps failing never reaches a circuit breaker nor delays anything else.

While the pull runs, three watchers race it, each on the injected :class:`Clock` (so a
``FakeClock`` drives every timeout in tests):

* **deadlines** - response headers within ``header_timeout``, then a line at least every
  ``stall_timeout``, and the whole pull within ``total_timeout``; the connect phase is bounded
  by the HTTP client as well. No await on the network is left without a bound;
* **heartbeat** - every ``heartbeat_timeout / 3`` the worker records, fenced by owner (its id
  and the claim's number: unique per claim) and attempt, that it is alive and how far it got
  (whole-model bytes, summed over the layers). A write that finds the task no longer this
  worker's (cancelled, deleted because the model was un-declared, or reclaimed by another
  worker after this one stalled) stops the pull: that is how a cancel reaches a worker that
  missed the bus message;
* **cancel notices** on ``queue_cancel`` - ``{"id"}`` naming the backend URL or the model (the
  Go package's message), or ``{"id": model, "url"}`` naming one pair. The worker stops the pull
  and marks its task ``cancelled`` if it is still its own.

Progress goes out on ``model_download`` in the Go package's JSON: every status change, byte
progress at most every ``progress_interval`` and only on a new whole percent, and the final
``success`` always.

The pull itself (the HTTP stream) belongs to the Ollama driver; this module receives it as a
:data:`Puller` so that it stays free of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from runtimestate.bus.base import Messenger, Subscription
from runtimestate.clock import SYSTEM_CLOCK, Clock, timeout
from runtimestate.downloads.tasks import MODEL_DOWNLOAD, QUEUE_CANCEL, Backoff
from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    InvalidInput,
    NotFound,
    ProtocolError,
    StoreError,
    redact,
)
from runtimestate.metrics import DOWNLOAD_BYTES, DOWNLOAD_FAILURES, MODELS_PULLED, PULL_DURATION
from runtimestate.store.base import Store
from runtimestate.store.records import PullTask

__all__ = ["DownloadOutcome", "DownloadStatus", "Holds", "PullWorker", "Puller"]

logger = logging.getLogger(__name__)

# Opens the pull stream of (base_url, model): an iterator of the decoded NDJSON objects.
Puller = Callable[[str, str], AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]]
# Whether the backend at base_url already holds the model.
Holds = Callable[[str, str], Awaitable[bool]]


class DownloadStatus(BaseModel):
    """One progress event, in the Go package's JSON: ``{"status","digest","total","completed",
    "model","baseUrl"}``."""

    model_config = ConfigDict(frozen=True, validate_by_name=True, serialize_by_alias=True)

    status: str
    digest: str = ""
    total: int = 0
    completed: int = 0
    model: str
    base_url: str = Field(alias="baseUrl")


class DownloadOutcome(StrEnum):
    """How the last cycle of a worker ended."""

    EMPTY = "empty"  # nothing was due
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # the task stopped being this worker's (reclaimed, removed, cancelled)


class _PullFailed(Exception):
    """A failure of the peer, with the reason it is counted under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(kw_only=True)
class _Progress:
    started: float
    opened: bool = False
    last_line: float = 0.0
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        return sum(done for done, _ in self.layers.values())

    @property
    def total(self) -> int:
        return sum(size for _, size in self.layers.values())


class PullWorker:
    """Carries out pull tasks for one process. Several cycles may run at once (one per worker
    routine): each claims its own task, and the database keeps them on different backends."""

    def __init__(
        self,
        store: Store,
        messenger: Messenger,
        puller: Puller,
        *,
        worker_id: str,
        clock: Clock = SYSTEM_CLOCK,
        progress_interval: float = 0.25,
        header_timeout: float = 30.0,
        stall_timeout: float = 60.0,
        total_timeout: float = 6 * 3600.0,
        heartbeat_timeout: float = 15.0,
        backoff: Backoff | None = None,
        rand: Callable[[], float] = random.random,
        holds: Holds | None = None,
    ) -> None:
        if not isinstance(worker_id, str) or not worker_id:
            raise InvalidInput("worker id must be a non-empty string", field="worker_id")
        for name, value in (
            ("header_timeout", header_timeout),
            ("stall_timeout", stall_timeout),
            ("total_timeout", total_timeout),
            ("heartbeat_timeout", heartbeat_timeout),
        ):
            if value <= 0:
                raise InvalidInput(f"{name} must be positive", field=name)
        if progress_interval < 0:
            raise InvalidInput("progress_interval must not be negative", field="progress_interval")
        self._store = store
        self._messenger = messenger
        self._puller = puller
        self.worker_id = worker_id
        self._clock = clock
        self._progress_interval = progress_interval
        self._header_timeout = header_timeout
        self._stall_timeout = stall_timeout
        self._total_timeout = total_timeout
        self.heartbeat_timeout = heartbeat_timeout
        self._backoff = backoff or Backoff()
        self._rand = rand
        self._holds = holds
        self.last_outcome = DownloadOutcome.EMPTY
        self._claims = itertools.count(1)

    async def run_cycle(self) -> bool:
        """Claim one due task and carry it out; False when nothing was due. Raises only for
        the store (or a bug), never for the backend's failure."""
        # Every claim has an owner of its own: the routines of one process share this worker,
        # and a task removed and queued again starts its attempts afresh, so "this worker,
        # attempt 1" could name two claims at once - and the old one's writes would pass.
        task = await self._store.claim_pull_task(
            owner=f"{self.worker_id}/{next(self._claims)}",
            stale_after=timedelta(seconds=self.heartbeat_timeout),
        )
        if task is None:
            self.last_outcome = DownloadOutcome.EMPTY
            return False
        log_extra = {"backend_id": task.backend_id, "model": task.model}
        try:
            backend = await self._store.get_backend(task.backend_id)
        except NotFound:
            # Deleted since the claim; its tasks went with it.
            self.last_outcome = DownloadOutcome.LOST
            return True
        started = time.perf_counter()
        outcome = await self._carry_out(task, backend.base_url, log_extra)
        PULL_DURATION.labels(outcome=outcome.value).observe(time.perf_counter() - started)
        self.last_outcome = outcome
        return True

    async def _carry_out(
        self, task: PullTask, url: str, log_extra: dict[str, str]
    ) -> DownloadOutcome:
        fence: dict[str, Any] = {
            "backend_id": task.backend_id,
            "model": task.model,
            "owner": task.owner,
            "attempt": task.attempt,
        }
        if task.attempt > 1 and await self._landed(url, task.model):
            # The claim before this one pulled it: its worker died (or its stream broke) after
            # the model landed and before the task was marked done. Pulling again would be a
            # second pull of a model the backend holds.
            logger.info("model already on the backend: no pull needed", extra=log_extra)
            await self._store.finish_pull_task(**fence)
            await self._publish(DownloadStatus(status="success", model=task.model, base_url=url))
            return DownloadOutcome.SUCCEEDED
        logger.info("download started (attempt %d)", task.attempt, extra=log_extra)
        progress = _Progress(started=self._clock.monotonic())
        try:
            async with await self._messenger.stream(QUEUE_CANCEL) as cancels:
                watchers = {
                    "pull": self._pull(url, task.model, progress),
                    "deadline": self._deadlines(progress),
                    "heartbeat": self._heartbeat(fence, progress),
                    "cancel": self._watch(cancels, url, task.model),
                }
                first, result = await _race(watchers, name=f"{task.model} on {redact(url)}")
        except asyncio.CancelledError:
            # The worker is being stopped: give the task back, due now, for whoever is next.
            with contextlib.suppress(StoreError):
                await asyncio.shield(self._store.release_pull_task(**fence))
            raise
        if first == "pull" and not isinstance(result, BaseException):
            MODELS_PULLED.inc()
            logger.info("model pulled", extra=log_extra)
            if not await self._store.finish_pull_task(**fence):
                logger.info("pulled, but the task had been taken over", extra=log_extra)
            return DownloadOutcome.SUCCEEDED
        if isinstance(result, _PullFailed):
            return await self._fail(task, fence, url, result, log_extra)
        if isinstance(result, BaseException):
            raise result
        if first == "cancel" and await self._store.release_pull_task(**fence, cancelled=True):
            # A bare cancel message: this worker marks the task, so that it stays cancelled.
            logger.info("download cancelled", extra=log_extra)
            await self._publish(DownloadStatus(status="cancelled", model=task.model, base_url=url))
            return DownloadOutcome.CANCELLED
        logger.info("download stopped: the task is no longer this worker's", extra=log_extra)
        await self._publish(DownloadStatus(status="cancelled", model=task.model, base_url=url))
        return DownloadOutcome.LOST

    async def _landed(self, url: str, model: str) -> bool:
        """Whether the backend holds ``model`` already; False when it cannot tell within the
        header timeout (the pull then goes ahead and meets whatever the problem is)."""
        if self._holds is None:
            return False
        try:
            async with timeout(self._clock, self._header_timeout):
                return await self._holds(url, model)
        except (BackendError, TimeoutError):
            return False

    async def _fail(
        self,
        task: PullTask,
        fence: dict[str, Any],
        url: str,
        failure: _PullFailed,
        log_extra: dict[str, str],
    ) -> DownloadOutcome:
        DOWNLOAD_FAILURES.labels(reason=failure.reason).inc()
        message = redact(f"pull of {task.model} on {url} failed: {failure}")
        retry_in = self._backoff.delay(task.failures + 1, rand=self._rand)
        logger.warning("%s; next try in %.0f s", message, retry_in.total_seconds(), extra=log_extra)
        await self._store.fail_pull_task(**fence, error=message, retry_in=retry_in)
        await self._publish(
            DownloadStatus(status=f"error: {message}", model=task.model, base_url=url)
        )
        return DownloadOutcome.FAILED

    async def _deadlines(self, progress: _Progress) -> _PullFailed:
        """Return the failure once a bound is passed: headers, stall between lines, total."""
        total_at = progress.started + self._total_timeout
        while True:
            if progress.opened:
                at = progress.last_line + self._stall_timeout
                failure = _PullFailed(
                    "stalled", f"stalled: no progress for {self._stall_timeout:g} s"
                )
            else:
                at = progress.started + self._header_timeout
                failure = _PullFailed(
                    "no_headers", f"no response headers within {self._header_timeout:g} s"
                )
            if total_at <= at:
                at = total_at
                failure = _PullFailed("timeout", f"not finished within {self._total_timeout:g} s")
            now = self._clock.monotonic()
            if now >= at:
                return failure
            await self._clock.sleep(at - now)

    async def _heartbeat(self, fence: dict[str, Any], progress: _Progress) -> None:
        """Return once a heartbeat finds the task no longer this worker's."""
        while True:
            await self._clock.sleep(self.heartbeat_timeout / 3)
            try:
                mine = await self._store.heartbeat_pull_task(
                    **fence, completed=progress.completed, total=progress.total
                )
            except StoreError as exc:
                # The pull goes on; if the store stays away past heartbeat_timeout, another
                # worker may claim the task and the next heartbeat says so.
                logger.warning("heartbeat not recorded: %s", exc, extra={"model": fence["model"]})
                continue
            if not mine:
                return

    async def _watch(self, cancels: Subscription, url: str, model: str) -> None:
        async for message in cancels:
            try:
                body = json.loads(message.data)
                target, pair_url = body.get("id"), body.get("url")
            except (ValueError, AttributeError):
                logger.warning("ignored malformed cancel message")
                continue
            if pair_url is not None:
                if pair_url == url and target == model:
                    return
            elif target in (url, model):
                return
        # The subscription ended (bus closed): the heartbeat still carries cancels.
        await asyncio.Event().wait()

    async def _pull(self, url: str, model: str, progress: _Progress) -> None:
        try:
            await self._consume(url, model, progress)
        except BackendUnreachable as exc:
            reason = "dropped" if progress.opened else "unreachable"
            raise _PullFailed(reason, str(exc)) from exc
        except ProtocolError as exc:
            raise _PullFailed("protocol", str(exc)) from exc
        except BackendError as exc:
            reason = "refused" if progress.opened else "http_error"
            raise _PullFailed(reason, str(exc)) from exc

    async def _consume(self, url: str, model: str, progress: _Progress) -> None:
        """Read the pull stream to its ``success`` line, publishing throttled progress."""
        last_status = ""
        last_percent = -1
        last_publish = float("-inf")
        async with self._puller(url, model) as lines:
            progress.opened = True
            progress.last_line = self._clock.monotonic()
            async for line in lines:
                now = progress.last_line = self._clock.monotonic()
                if "error" in line:
                    raise BackendError(str(line["error"]), backend=redact(url))
                status = _status(line, model, url)
                if status.digest and status.total:
                    previous, _ = progress.layers.get(status.digest, (0, 0))
                    if status.completed > previous:
                        DOWNLOAD_BYTES.inc(status.completed - previous)
                    completed = max(previous, status.completed)
                    progress.layers[status.digest] = (completed, status.total)
                percent = status.completed * 100 // status.total if status.total else -1
                changed = status.status != last_status
                progressed = percent > last_percent and (
                    now - last_publish >= self._progress_interval
                )
                if changed or progressed or status.status == "success":
                    await self._publish(status)
                    last_status, last_percent, last_publish = status.status, percent, now
                if status.status == "success":
                    return
        raise BackendUnreachable("the stream ended before success", backend=redact(url))

    async def _publish(self, status: DownloadStatus) -> None:
        await self._messenger.publish(MODEL_DOWNLOAD, status.model_dump_json().encode())


async def _race(coros: dict[str, Any], *, name: str) -> tuple[str, object]:
    """Run the named coroutines until the first ends; cancel and reap the others. The first's
    name and its result (or the exception it raised)."""
    tasks = {asyncio.create_task(coro, name=f"{key} {name}"): key for key, coro in coros.items()}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    # "pull" wins a tie, so a pull that ended together with a cancel keeps its outcome.
    first = min(done, key=lambda t: tasks[t] != "pull")
    if first.cancelled():
        raise asyncio.CancelledError
    error = first.exception()
    return tasks[first], error if error is not None else first.result()


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
