"""The NATS bus stays able to hear after its subscribers leave in the middle of a round trip.

A subscriber leaves by being cancelled: an SSE client disconnects while its stream is being set
up or torn down, a request handler's task is cancelled. nats-py pairs every PING it sends with
the next PONG through a future; a cancelled ``flush`` cancelled that future, and the PONG that
arrived later made the connection's reader die (``InvalidStateError``), leaving the replica deaf
until nats-py's idle check reconnected minutes later. These tests cancel at exactly those points
and then require a message from another connection to arrive, and ``ping`` to prove delivery.
"""

from __future__ import annotations

import asyncio

import pytest

from runtimestate.bus import Messenger, open_bus
from runtimestate.errors import BusError

pytestmark = pytest.mark.nats

# A bound on waiting for a delivery that, on a healthy connection, takes milliseconds.
_DELIVERY_BOUND = 5.0


async def _leave_mid_round_trip(bus: Messenger, subject: str, times: int) -> None:
    """Start subscribing (or unsubscribing) and cancel the caller while it waits for the PONG."""
    for _ in range(times):
        joining = asyncio.create_task(bus.stream(subject))
        await asyncio.sleep(0)
        joining.cancel()
        results = await asyncio.gather(joining, return_exceptions=True)
        if not isinstance(results[0], BaseException):
            leaving = asyncio.create_task(results[0].unsubscribe())
            await asyncio.sleep(0)
            leaving.cancel()
            await asyncio.gather(leaving, return_exceptions=True)


async def _receives(bus: Messenger, sender: Messenger, subject: str) -> bytes:
    async with await bus.stream(subject) as sub:
        await sender.publish(subject, b"still listening")
        async with asyncio.timeout(_DELIVERY_BOUND):
            async for message in sub:
                return message.data
    raise AssertionError("the subscription ended without a message")


async def test_subscribers_cancelled_mid_round_trip_leave_the_connection_hearing(
    nats_url: str,
) -> None:
    async with await open_bus(nats_url) as bus, await open_bus(nats_url) as sender:
        async with await bus.stream("deaf.before") as before:
            await _leave_mid_round_trip(bus, "deaf.leaver", times=20)
            # Let every PONG of the abandoned round trips come back and be processed.
            await bus.ping()
            await sender.publish("deaf.before", b"old subscription")
            async with asyncio.timeout(_DELIVERY_BOUND):
                async for message in before:
                    assert message.data == b"old subscription"
                    break
        assert await _receives(bus, sender, "deaf.after") == b"still listening"
        await bus.ping()


async def test_a_cancelled_ping_leaves_the_connection_hearing(nats_url: str) -> None:
    async with await open_bus(nats_url) as bus, await open_bus(nats_url) as sender:
        for _ in range(20):
            probe = asyncio.create_task(bus.ping())
            await asyncio.sleep(0)
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        await bus.ping()
        assert await _receives(bus, sender, "deaf.ping") == b"still listening"


async def test_ping_proves_delivery_and_fails_when_the_reader_is_gone(nats_url: str) -> None:
    async with await open_bus(nats_url) as bus:
        await bus.ping()
        # What the old failure left behind: a connection whose reader has stopped. Flushing
        # still "works" on it (nats-py falls back to writing the buffer); a delivery does not.
        reader = bus.client._reading_task  # type: ignore[attr-defined]
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        with pytest.raises(BusError, match="deliver"):
            await bus.ping()
