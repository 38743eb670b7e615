"""The message-bus contract: publish/subscribe and request/reply over named subjects.

Two implementations (:mod:`.memory` in-process, :mod:`.nats` on NATS) satisfy one contract test
suite. Rules both hold:

* every live subscription of a subject receives every message published after it was created
  (``await stream(...)`` returns only once the subscription is registered with the broker);
* messages from one publisher arrive in the order they were published;
* ``unsubscribe()`` (or leaving the ``async with``) stops delivery; iteration then ends;
* ``request`` raises ``NoResponders`` when nobody serves the subject, ``RequestTimeout`` past
  its timeout, and ``RemoteError`` carrying the handler's message when the handler raised;
* ``close()`` is idempotent; after it every operation raises ``BusError``;
* a slow subscriber never blocks a publisher: each subscription buffers at most
  ``max_pending`` messages; past that the **oldest** buffered messages are dropped and counted in
  ``Subscription.dropped`` (progress events are superseded by newer ones, so the newest matter).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

__all__ = ["DEFAULT_MAX_PENDING", "Handler", "Message", "Messenger", "Subscription"]

DEFAULT_MAX_PENDING = 1024


@dataclass(frozen=True, slots=True)
class Message:
    """One delivered message: the concrete subject it was published to (a subscription's pattern
    may match many) and its payload."""

    subject: str
    data: bytes


Handler = Callable[[bytes], Awaitable[bytes]]


class Subscription(abc.ABC):
    """An async iterator of :class:`Message` that can be unsubscribed."""

    subject: str

    @property
    @abc.abstractmethod
    def dropped(self) -> int:
        """Messages dropped because this subscriber fell more than ``max_pending`` behind."""

    @abc.abstractmethod
    async def unsubscribe(self) -> None:
        """Stop delivery; idempotent. Iteration ends after the messages already buffered."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[Message]: ...

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.unsubscribe()


class Messenger(abc.ABC):
    """A connection to the message bus: publish, subscribe (``stream``), request and serve, on
    the contract in this module's docstring. Open one with :func:`runtimestate.bus.open_bus`."""

    async def __aenter__(self) -> Messenger:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @abc.abstractmethod
    async def publish(self, subject: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def stream(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        """Subscribe to ``subject``; delivery is guaranteed for messages published after return."""

    @abc.abstractmethod
    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes: ...

    @abc.abstractmethod
    async def serve(self, subject: str, handler: Handler) -> Subscription:
        """Answer requests on ``subject`` with ``handler``; unsubscribe the result to stop."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``BusError`` if the bus cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None: ...
