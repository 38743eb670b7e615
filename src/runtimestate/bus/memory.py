"""The in-process message bus: the default when no broker URL is configured.

One :class:`MemoryMessenger` is one bus; two messengers never see each other's messages, which
matches a single-replica service where the API, the runner and the reconciler share one object.
Everything NATS does that callers can observe is reproduced here so the same contract tests pass
on both: NATS subject wildcards, fan-out to every subscription, drop-oldest buffers, exactly one
responder per request (round-robin standing in for a NATS queue group), ``NoResponders``,
``RequestTimeout`` and ``RemoteError``.

Publishing is synchronous under the hood: :meth:`MemoryMessenger.publish` appends to every
matching subscription's bounded buffer and returns, so per-publisher order is the order of the
calls and a slow subscriber only ever loses its own oldest messages.
"""

from __future__ import annotations

import asyncio
import itertools

from runtimestate.errors import NoResponders, RemoteError, RequestTimeout

from .base import DEFAULT_MAX_PENDING, Handler, Message, Messenger, Subscription
from .common import (
    BufferedSubscription,
    HandlerTasks,
    check_data,
    check_max_pending,
    check_timeout,
    closed_error,
    invoke_handler,
    subject_matches,
    validate_publish_subject,
    validate_subscribe_subject,
)

__all__ = ["MemoryMessenger"]


class _MemorySubscription(BufferedSubscription):
    def __init__(self, bus: MemoryMessenger, subject: str, *, max_pending: int) -> None:
        super().__init__(subject, max_pending=max_pending)
        self._bus = bus

    async def unsubscribe(self) -> None:
        self._bus._subscriptions.discard(self)
        self.end()


class _MemoryService(BufferedSubscription):
    """A served subject. It carries no messages: iterating it just waits for unsubscribe."""

    def __init__(self, bus: MemoryMessenger, subject: str, handler: Handler) -> None:
        super().__init__(subject, max_pending=1)
        self._bus = bus
        self._handler = handler
        self._tasks = HandlerTasks(subject)

    def dispatch(self, data: bytes, reply: asyncio.Future[bytes]) -> None:
        self._tasks.spawn(self._answer(data, reply))

    async def _answer(self, data: bytes, reply: asyncio.Future[bytes]) -> None:
        outcome = await invoke_handler(self._handler, data, subject=self.subject)
        # The requester may have timed out meanwhile; its future is then already cancelled.
        if reply.done():
            return
        if outcome.error is not None:
            reply.set_exception(RemoteError(outcome.error))
        else:
            reply.set_result(outcome.data)

    async def unsubscribe(self) -> None:
        if self in self._bus._services:
            self._bus._services.remove(self)
        self.end()
        await self._tasks.cancel_all()


class MemoryMessenger(Messenger):
    """An in-process bus. Create it with ``await runtimestate.bus.open_bus()``."""

    def __init__(self) -> None:
        self._subscriptions: set[_MemorySubscription] = set()
        # A list, not a set: round-robin over responders needs a stable order.
        self._services: list[_MemoryService] = []
        self._turn = itertools.count()
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error()

    async def publish(self, subject: str, data: bytes) -> None:
        self._check_open()
        validate_publish_subject(subject)
        message = Message(subject=subject, data=check_data(data))
        # Snapshot: delivering never re-enters this loop, but a consumer may unsubscribe later.
        for subscription in list(self._subscriptions):
            if subject_matches(subscription.subject, subject):
                subscription.deliver(message)

    async def stream(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        validate_subscribe_subject(subject)
        check_max_pending(max_pending)
        subscription = _MemorySubscription(self, subject, max_pending=max_pending)
        self._subscriptions.add(subscription)
        return subscription

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes:
        self._check_open()
        validate_publish_subject(subject)
        payload = check_data(data)
        check_timeout(timeout)
        candidates = [s for s in self._services if subject_matches(s.subject, subject)]
        if not candidates:
            raise NoResponders(f"no responder serves {subject!r}")
        service = candidates[next(self._turn) % len(candidates)]
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        service.dispatch(payload, reply)
        try:
            async with asyncio.timeout(timeout):
                return await reply
        except TimeoutError as exc:
            raise RequestTimeout(f"no reply on {subject!r} within {timeout:g}s") from exc

    async def serve(self, subject: str, handler: Handler) -> Subscription:
        self._check_open()
        validate_subscribe_subject(subject)
        service = _MemoryService(self, subject, handler)
        self._services.append(service)
        return service

    async def ping(self) -> None:
        self._check_open()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._subscriptions):
            await subscription.unsubscribe()
        for service in list(self._services):
            await service.unsubscribe()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<MemoryMessenger {state} subscriptions={len(self._subscriptions)} "
            f"services={len(self._services)}>"
        )
