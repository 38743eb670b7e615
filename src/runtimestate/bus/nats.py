"""The message bus on NATS, for several replicas of the service sharing one broker.

The contract is the in-process bus's (see :mod:`.base`); what it takes to hold it on NATS:

* **Subscribing waits for the server.** ``stream`` and ``serve`` flush the connection (a
  PING/PONG round trip) before returning, so a message published afterwards, from any
  connection, reaches the new subscription.
* **Leaving never touches the connection.** nats-py pairs each PING with the next PONG through a
  future, and its reader dies (``InvalidStateError``) when a PONG arrives for a future that was
  cancelled - which is what cancelling a caller inside ``flush`` did, and what nats-py's own
  flush timeout does. One SSE client disconnecting while its subscription was being set up or
  torn down made the whole replica deaf until nats-py's idle check reconnected, minutes later.
  So: a round trip runs in a task of the messenger's, which a cancelled caller abandons without
  cancelling (:meth:`NatsMessenger._round_trip`); a subscription is closed by unsubscribing only,
  with no round trip at all; and the client tolerates a PONG whose waiter has gone
  (:class:`_Client`).
* **Health proves delivery.** ``ping`` sends a message through the server to a subscription of
  this connection and waits for it to come back: a connection whose reader has stopped still
  "flushes" (nats-py then just writes its buffer) but no longer delivers, and ``ping`` says so.
* **Our buffer, not nats-py's.** nats-py drops the *newest* messages of a slow consumer. Each
  subscription here is fed by a callback that only appends to a :class:`BufferedSubscription`,
  which drops the *oldest*, exactly like the in-process bus, and never blocks the read loop.
* **Errors travel as headers.** A handler's failure is answered with the header
  ``Runtimestate-Error`` and the description as body; the requester raises ``RemoteError``.
  ``serve`` joins a queue group, so each request is answered by exactly one replica.
* **Bounded open.** ``open_bus`` gives up after ``connect_timeout`` with a ``BusError`` naming the
  servers (credentials removed) and the last error, instead of nats-py's minutes-long reconnect
  loop. Once connected, the client reconnects on its own for as long as it takes.

Every nats-py exception is translated here, at the boundary, into :mod:`runtimestate.errors`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription as NatsSubscription

from runtimestate.errors import BusError, NoResponders, RemoteError, RequestTimeout

from .base import DEFAULT_MAX_PENDING, Handler, Message, Messenger, Subscription
from .common import (
    BufferedSubscription,
    HandlerTasks,
    check_data,
    check_max_pending,
    check_timeout,
    closed_error,
    invoke_handler,
    validate_publish_subject,
    validate_subscribe_subject,
)

__all__ = ["ERROR_HEADER", "QUEUE_GROUP", "NatsMessenger", "display_servers"]

logger = logging.getLogger(__name__)

ERROR_HEADER = "Runtimestate-Error"
QUEUE_GROUP = "runtimestate"
# How long a flush (subscribe confirmation) and the final drain may take.
_FLUSH_TIMEOUT = 5
_DRAIN_TIMEOUT = 5
# A health check answers fast: a PONG that takes longer means the broker is effectively gone.
_PING_TIMEOUT = 2.0
_RECONNECT_WAIT = 1


def display_servers(servers: list[str]) -> str:
    """The server list for messages and logs, with any user, password or token removed."""
    shown = []
    for server in servers:
        parts = urlsplit(server)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        shown.append(f"{parts.scheme}://{host}{port}")
    return ",".join(shown)


class _Client(Client):
    """nats-py's client, except that a PONG for a PING whose waiter is gone is consumed quietly
    instead of killing the reader (PINGs and PONGs pair in order, so dropping it is right)."""

    async def _process_pong(self) -> None:
        if self._pongs:
            future = self._pongs.pop(0)
            if not future.done():
                future.set_result(True)
            self._pongs_received += 1
            self._pings_outstanding = 0


def _translate(exc: nats.errors.Error | OSError, action: str) -> BusError:
    if isinstance(exc, nats.errors.ConnectionClosedError):
        return BusError(f"cannot {action}: the NATS connection is closed")
    if isinstance(exc, nats.errors.ConnectionReconnectingError | nats.errors.StaleConnectionError):
        return BusError(f"cannot {action}: the NATS connection is being re-established")
    if isinstance(exc, nats.errors.MaxPayloadError):
        return BusError(f"cannot {action}: the message is larger than the server accepts")
    if isinstance(exc, nats.errors.OutboundBufferLimitError):
        return BusError(f"cannot {action}: NATS is unreachable and the outbound buffer is full")
    if isinstance(exc, nats.errors.TimeoutError):
        return BusError(f"cannot {action}: the NATS server did not answer in time")
    return BusError(f"cannot {action}: {type(exc).__name__}: {exc}")


class _NatsStream(BufferedSubscription):
    def __init__(self, bus: NatsMessenger, subject: str, *, max_pending: int) -> None:
        super().__init__(subject, max_pending=max_pending)
        self._bus = bus
        self._sub: NatsSubscription | None = None

    def attach(self, sub: NatsSubscription) -> None:
        self._sub = sub

    async def on_message(self, msg: Msg) -> None:
        self.deliver(Message(subject=msg.subject, data=msg.data))

    async def unsubscribe(self) -> None:
        if self.ended:
            return
        self.end()
        await self._bus._detach(self, self._sub)


class _NatsService(_NatsStream):
    """A served subject: requests are answered by tasks; iterating just waits for unsubscribe."""

    def __init__(self, bus: NatsMessenger, subject: str, handler: Handler) -> None:
        super().__init__(bus, subject, max_pending=1)
        self._handler = handler
        self._tasks = HandlerTasks(subject)

    async def on_message(self, msg: Msg) -> None:
        if not self.ended:
            self._tasks.spawn(self._answer(msg))

    async def _answer(self, msg: Msg) -> None:
        outcome = await invoke_handler(self._handler, msg.data, subject=self.subject)
        if not msg.reply:
            logger.warning("request on %r carried no reply subject; answer dropped", self.subject)
            return
        headers = {ERROR_HEADER: "1"} if outcome.error is not None else None
        body = outcome.data if outcome.error is None else outcome.error.encode()
        try:
            await self._bus.client.publish(msg.reply, body, headers=headers)
        except (nats.errors.Error, OSError) as exc:
            # The requester will see RequestTimeout; there is nobody else to tell.
            logger.warning("could not answer a request on %r: %s", self.subject, exc)

    async def unsubscribe(self) -> None:
        if self.ended:
            return
        await super().unsubscribe()
        await self._tasks.cancel_all()


class NatsMessenger(Messenger):
    """A bus on a NATS connection. Create it with ``await runtimestate.bus.open_bus(url)``."""

    def __init__(self, client: Client, *, servers: str) -> None:
        self.client = client
        self._servers = servers
        self._streams: set[_NatsStream] = set()
        self._closed = False
        self._round_trips: set[asyncio.Task[None]] = set()
        # ping's echo: a subscription of this connection that resolves the waiting probes.
        self._echo_subject = client.new_inbox()
        self._echoes: dict[bytes, asyncio.Future[None]] = {}
        self._echo_sub: NatsSubscription | None = None

    @classmethod
    async def connect(
        cls, servers: list[str], *, connect_timeout: float, name: str | None = None
    ) -> NatsMessenger:
        shown = display_servers(servers)
        client = _Client()
        connected = False
        last_error: list[BaseException] = []

        async def on_error(exc: Exception) -> None:
            last_error[:] = [exc]
            # While (re)connecting every failed attempt lands here once a second; the disconnect
            # itself is logged once as a warning, the attempts only at debug level.
            level = logging.WARNING if connected and client.is_connected else logging.DEBUG
            logger.log(level, "NATS (%s): %s: %s", shown, type(exc).__name__, exc)

        async def on_disconnect() -> None:
            if connected and not client.is_closed:
                logger.warning("lost the connection to NATS (%s); reconnecting", shown)

        async def on_reconnect() -> None:
            logger.info("reconnected to NATS (%s)", shown)

        try:
            async with asyncio.timeout(connect_timeout):
                await client.connect(
                    servers,
                    name=name,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    connect_timeout=max(1, int(connect_timeout)),
                    reconnect_time_wait=_RECONNECT_WAIT,
                    max_reconnect_attempts=-1,
                    drain_timeout=_DRAIN_TIMEOUT,
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            await _abandon(client)
            cause = last_error[0] if last_error else exc
            reason = str(cause) or type(cause).__name__
            raise BusError(
                f"cannot connect to NATS at {shown} within {connect_timeout:g}s: {reason}"
            ) from exc
        connected = True
        messenger = cls(client, servers=shown)
        try:
            await messenger._start_echo()
        except (nats.errors.Error, OSError) as exc:
            await _abandon(client)
            raise _translate(exc, f"subscribe at NATS {shown}") from exc
        return messenger

    async def _start_echo(self) -> None:
        async def on_echo(msg: Msg) -> None:
            waiter = self._echoes.pop(msg.data, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        self._echo_sub = await self.client.subscribe(self._echo_subject, cb=on_echo)
        await self._round_trip()

    async def _round_trip(self) -> None:
        """A PING/PONG with the server, in a task of ours: a caller cancelled meanwhile stops
        waiting, but the PING's own future is left to its PONG (see the module docstring)."""
        task = asyncio.get_running_loop().create_task(
            self.client.flush(timeout=_FLUSH_TIMEOUT), name="runtimestate.bus nats round trip"
        )
        self._round_trips.add(task)
        task.add_done_callback(self._round_trip_done)
        await asyncio.shield(task)

    def _round_trip_done(self, task: asyncio.Task[None]) -> None:
        self._round_trips.discard(task)
        if not task.cancelled():
            # Retrieved so that an abandoned round trip's failure is not reported as never
            # retrieved; a caller still waiting got the same exception through the shield.
            task.exception()

    def _check_open(self) -> None:
        if self._closed:
            raise closed_error()

    async def publish(self, subject: str, data: bytes) -> None:
        self._check_open()
        validate_publish_subject(subject)
        payload = check_data(data)
        try:
            await self.client.publish(subject, payload)
        except (nats.errors.Error, OSError) as exc:
            raise _translate(exc, f"publish on {subject!r}") from exc

    async def stream(self, subject: str, *, max_pending: int = DEFAULT_MAX_PENDING) -> Subscription:
        self._check_open()
        validate_subscribe_subject(subject)
        check_max_pending(max_pending)
        return await self._subscribe(_NatsStream(self, subject, max_pending=max_pending))

    async def serve(self, subject: str, handler: Handler) -> Subscription:
        self._check_open()
        validate_subscribe_subject(subject)
        return await self._subscribe(_NatsService(self, subject, handler), queue=QUEUE_GROUP)

    async def _subscribe(self, stream: _NatsStream, *, queue: str = "") -> _NatsStream:
        action = f"subscribe to {stream.subject!r}"
        try:
            sub = await self.client.subscribe(stream.subject, queue=queue, cb=stream.on_message)
            stream.attach(sub)
            self._streams.add(stream)
            await self._round_trip()
        except asyncio.CancelledError:
            # The caller left while the server confirmed: the subscription must not outlive it.
            # Unsubscribing does not wait on the network, so it finishes before we re-raise.
            await asyncio.shield(stream.unsubscribe())
            raise
        except (nats.errors.Error, OSError) as exc:
            # The connection is failing; telling the server to forget the subscription would
            # fail the same way, so only our side is cleaned up.
            stream.end()
            self._streams.discard(stream)
            raise _translate(exc, action) from exc
        return stream

    async def _detach(self, stream: _NatsStream, sub: NatsSubscription | None) -> None:
        """Unsubscribe, and nothing else: no round trip that a cancelled caller could break.
        nats-py forgets the subscription at once and queues the UNSUB for its writer; a message
        still on its way is dropped, because the stream has ended."""
        self._streams.discard(stream)
        if sub is None or self._closed or self.client.is_closed:
            return
        try:
            await sub.unsubscribe()
        except nats.errors.BadSubscriptionError:
            # Already unsubscribed on the server side (auto-unsubscribe or a reconnect race).
            return
        except (nats.errors.Error, OSError) as exc:
            raise _translate(exc, f"unsubscribe from {stream.subject!r}") from exc

    async def request(self, subject: str, data: bytes, *, timeout: float) -> bytes:
        self._check_open()
        validate_publish_subject(subject)
        payload = check_data(data)
        check_timeout(timeout)
        try:
            msg = await self.client.request(subject, payload, timeout=timeout)
        except nats.errors.NoRespondersError as exc:
            raise NoResponders(f"no responder serves {subject!r}") from exc
        except nats.errors.TimeoutError as exc:
            raise RequestTimeout(f"no reply on {subject!r} within {timeout:g}s") from exc
        except (nats.errors.Error, OSError) as exc:
            raise _translate(exc, f"send a request on {subject!r}") from exc
        if msg.headers and ERROR_HEADER in msg.headers:
            raise RemoteError(msg.data.decode("utf-8", errors="replace"))
        return msg.data

    async def ping(self) -> None:
        """A message through the server and back to this connection within ``_PING_TIMEOUT``;
        ``BusError`` when it does not come back (see "Health proves delivery" above)."""
        self._check_open()
        if not self.client.is_connected:
            raise BusError(f"not connected to NATS at {self._servers}")
        token = secrets.token_hex(8).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._echoes[token] = waiter
        try:
            await self.client.publish(self._echo_subject, token)
            async with asyncio.timeout(_PING_TIMEOUT):
                await waiter
        except TimeoutError as exc:
            raise BusError(
                f"NATS at {self._servers} did not deliver a message back within {_PING_TIMEOUT:g}s"
            ) from exc
        except (nats.errors.Error, OSError) as exc:
            raise _translate(exc, f"reach NATS at {self._servers}") from exc
        finally:
            self._echoes.pop(token, None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # End our side first so consumers stop and handlers are cancelled, then let nats-py
        # drain: pending publishes are flushed to the server before the socket closes.
        for stream in list(self._streams):
            await stream.unsubscribe()
        for waiter in self._echoes.values():
            waiter.cancel()
        self._echoes.clear()
        if self.client.is_connected:
            try:
                await self.client.drain()
                return
            except (nats.errors.Error, OSError) as exc:
                logger.warning("NATS drain failed, closing instead: %s", exc)
        await _abandon(self.client)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<NatsMessenger {self._servers} {state} subscriptions={len(self._streams)}>"


async def _abandon(client: Client) -> None:
    """Close ``client`` after a failure; what goes wrong while closing changes nothing."""
    try:
        await client.close()
    except (nats.errors.Error, OSError) as exc:
        logger.debug("closing an abandoned NATS client failed: %s", exc)
