"""The parts of the bus contract that do not depend on the transport.

Both implementations share three things, kept here so that they cannot drift apart:

* **subject rules** — NATS syntax (dot-separated tokens, ``*`` matches one token, ``>`` the rest)
  validated identically for both, so code that works in-process also works on NATS;
* **the buffered subscription** — a bounded deque that drops the *oldest* message on overflow and
  counts it. The transport only calls :meth:`BufferedSubscription.deliver`, which never blocks,
  so a subscriber that stops reading can never stall a publisher (or, on NATS, the connection's
  read loop). Progress events are superseded by newer ones, hence drop-oldest;
* **handler invocation** — each request runs in its own named task, so one slow handler does not
  hold up the next request; a handler's exception becomes an error reply, never a dead
  subscription.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from typing import Any

from runtimestate.errors import BusError, InvalidInput, RuntimeStateError, redact

from .base import Handler, Message, Subscription

__all__ = [
    "BufferedSubscription",
    "HandlerTasks",
    "Reply",
    "check_data",
    "check_max_pending",
    "check_timeout",
    "closed_error",
    "invoke_handler",
    "subject_matches",
    "validate_publish_subject",
    "validate_subscribe_subject",
]

logger = logging.getLogger(__name__)


def _tokens(subject: str) -> list[str]:
    if not isinstance(subject, str) or not subject:
        raise InvalidInput("subject must be a non-empty string", field="subject")
    if any(ch.isspace() for ch in subject):
        raise InvalidInput(f"subject {subject!r} contains whitespace", field="subject")
    tokens = subject.split(".")
    if any(not token for token in tokens):
        raise InvalidInput(f"subject {subject!r} has an empty token", field="subject")
    return tokens


def validate_publish_subject(subject: str) -> None:
    """A subject one can publish or send a request to: no wildcards."""
    if any(part in ("*", ">") for part in _tokens(subject)):
        raise InvalidInput(
            f"subject {subject!r} contains a wildcard; publish to a concrete subject",
            field="subject",
        )


def validate_subscribe_subject(subject: str) -> None:
    """A subject one can subscribe to: ``*`` anywhere, ``>`` only as the last token."""
    tokens = _tokens(subject)
    for index, part in enumerate(tokens):
        if part == ">" and index != len(tokens) - 1:
            raise InvalidInput(f"subject {subject!r}: '>' must be the last token", field="subject")
        if len(part) > 1 and ("*" in part or ">" in part):
            raise InvalidInput(
                f"subject {subject!r}: a wildcard must be a whole token", field="subject"
            )


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS matching of a concrete ``subject`` against a subscription ``pattern``."""
    wanted = pattern.split(".")
    given = subject.split(".")
    for index, part in enumerate(wanted):
        if part == ">":
            return len(given) > index
        if index >= len(given) or part not in ("*", given[index]):
            return False
    return len(given) == len(wanted)


def check_max_pending(max_pending: int) -> None:
    """Refuse, as ``InvalidInput``, a subscription buffer size that is not a positive integer."""
    if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
        raise InvalidInput("max_pending must be a positive integer", field="max_pending")


def check_data(data: object) -> bytes:
    """The payload as ``bytes``. Anything but a bytes-like object is ``InvalidInput``: ``bytes()``
    would turn an ``int`` into that many zero bytes and fail on a ``str`` with a ``TypeError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInput(f"data must be bytes, not {type(data).__name__}", field="data")
    return bytes(data)


def check_timeout(timeout: float) -> None:
    """Refuse, as ``InvalidInput``, a request timeout that is not a positive number of seconds
    (a ``bool`` is not one)."""
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InvalidInput("timeout must be a positive number of seconds", field="timeout")


class BufferedSubscription(Subscription):
    """A subscription fed by its transport through :meth:`deliver`, read by one consumer.

    ``unsubscribe`` is left to the transport; it must call :meth:`end` so that iteration stops
    once the buffered messages are consumed.
    """

    def __init__(self, subject: str, *, max_pending: int) -> None:
        self.subject = subject
        self._max_pending = max_pending
        self._buffer: deque[Message] = deque()
        self._dropped = 0
        self._ended = False
        self._wakeup = asyncio.Event()

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def pending(self) -> int:
        """Messages buffered and not yet consumed."""
        return len(self._buffer)

    @property
    def ended(self) -> bool:
        return self._ended

    def deliver(self, message: Message) -> None:
        """Buffer ``message`` without ever waiting; past ``max_pending`` the oldest goes."""
        if self._ended:
            return
        if len(self._buffer) >= self._max_pending:
            self._buffer.popleft()
            self._dropped += 1
        self._buffer.append(message)
        self._wakeup.set()

    def end(self) -> None:
        """Accept no more messages; the consumer still gets the ones already buffered."""
        self._ended = True
        self._wakeup.set()

    async def __aiter__(self) -> AsyncIterator[Message]:
        while True:
            while self._buffer:
                yield self._buffer.popleft()
            if self._ended:
                return
            self._wakeup.clear()
            await self._wakeup.wait()

    def __repr__(self) -> str:
        state = "ended" if self._ended else "live"
        return (
            f"<{type(self).__name__} {self.subject!r} {state} "
            f"buffered={len(self._buffer)} dropped={self._dropped}>"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class Reply:
    """What a handler produced: the reply bytes, or the description of its failure."""

    data: bytes = b""
    error: str | None = None


def _describe(exc: BaseException) -> str:
    # The requester sees this text, so it goes through redact like any other error message.
    text = str(exc) or type(exc).__name__
    return redact(text)


async def invoke_handler(handler: Handler, data: bytes, *, subject: str) -> Reply:
    """Run ``handler`` on one request and turn any outcome into a :class:`Reply`.

    Cancellation propagates untouched. A project error raised on purpose (``NotFound`` ...) is
    an answer, logged quietly; anything else is a handler bug, logged with its traceback.
    """
    try:
        result = await handler(data)
    except RuntimeStateError as exc:
        logger.info("handler for %r refused a request: %s", subject, _describe(exc))
        return Reply(error=_describe(exc))
    except Exception as exc:
        logger.exception("handler for %r failed", subject)
        return Reply(error=_describe(exc))
    if not isinstance(result, bytes | bytearray | memoryview):
        logger.error("handler for %r returned %s, not bytes", subject, type(result).__name__)
        return Reply(error=f"handler returned {type(result).__name__}, not bytes")
    return Reply(data=bytes(result))


class HandlerTasks:
    """The in-flight requests of one served subject, each a named task, cancelled together."""

    def __init__(self, subject: str) -> None:
        self._subject = subject
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = 0

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        self._count += 1
        task = asyncio.get_running_loop().create_task(
            coro, name=f"runtimestate.bus serve {self._subject} #{self._count}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # invoke_handler already absorbs handler errors; reaching here is a bug of ours.
            logger.error("request task for %r crashed", self._subject, exc_info=exc)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)


def closed_error() -> BusError:
    """The ``BusError`` every operation raises after ``close()``, alike on both transports."""
    return BusError("the message bus is closed")
