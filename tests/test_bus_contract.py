"""The message-bus contract, run against the in-process bus and NATS alike.

Every test that takes ``messenger`` runs twice (``[memory]`` and ``[nats]``); a rule that holds on
one implementation only is a bug. Subjects carry a per-test prefix so tests sharing the session's
NATS server never see each other's messages. Waiting is done on events, on the messages
themselves, or by polling a condition with a deadline — never by sleeping a fixed time and
hoping.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from runtimestate.bus import Handler, Message, Messenger, Subscription, open_bus
from runtimestate.bus.common import BufferedSubscription
from runtimestate.errors import (
    BusError,
    InvalidInput,
    NoResponders,
    NotFound,
    RemoteError,
    RequestTimeout,
)
from tests.fixtures.nats import (
    find_nats_server,
    free_port,
    nats_server,
    start_nats_server,
    stop_nats_server,
)
from tests.fixtures.polling import eventually

WAIT = 5.0


@pytest.fixture
def subject() -> Callable[[str], str]:
    prefix = f"t{uuid.uuid4().hex[:12]}"
    return lambda name: f"{prefix}.{name}"


async def take(subscription: Subscription, count: int) -> list[bytes]:
    """The next ``count`` payloads, failing the test if they do not come within ``WAIT``."""
    received: list[bytes] = []
    if count == 0:
        return received
    async with asyncio.timeout(WAIT):
        async for message in subscription:
            received.append(message.data)
            if len(received) == count:
                break
    return received


async def drain(subscription: Subscription) -> list[bytes]:
    """Everything left until the iteration ends (it must end within ``WAIT``)."""
    async with asyncio.timeout(WAIT):
        return [message.data async for message in subscription]


async def test_every_subscriber_gets_every_message(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    subs = [await messenger.stream(subject("fan")) for _ in range(3)]
    other = await messenger.stream(subject("other"))
    for payload in (b"a", b"b", b"c"):
        await messenger.publish(subject("fan"), payload)
    await messenger.publish(subject("other"), b"only-this")

    for sub in subs:
        assert await take(sub, 3) == [b"a", b"b", b"c"]
    assert await take(other, 1) == [b"only-this"]


async def test_messages_carry_their_subject(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    async with await messenger.stream(subject("tagged")) as sub:
        await messenger.publish(subject("tagged"), b"x")
        async with asyncio.timeout(WAIT):
            message = await anext(aiter(sub))
    assert message == Message(subject=subject("tagged"), data=b"x")


async def test_order_of_one_publisher_is_kept(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    sub = await messenger.stream(subject("order"), max_pending=2000)
    sent = [str(i).encode() for i in range(1000)]
    for payload in sent:
        await messenger.publish(subject("order"), payload)

    assert await take(sub, 1000) == sent
    assert sub.dropped == 0


async def test_wildcards_follow_nats_rules(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    one = await messenger.stream(subject("jobs.*"))
    rest = await messenger.stream(subject("jobs.>"))
    await messenger.publish(subject("jobs.a.deep"), b"deep")
    await messenger.publish(subject("jobs.a"), b"shallow")
    await messenger.publish(subject("jobs"), b"parent")
    await messenger.publish(subject("jobs.b"), b"end")

    assert await take(one, 2) == [b"shallow", b"end"]
    assert await take(rest, 3) == [b"deep", b"shallow", b"end"]


async def test_unsubscribe_stops_delivery_and_ends_iteration(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    leaving = await messenger.stream(subject("unsub"))
    staying = await messenger.stream(subject("unsub"))
    await messenger.publish(subject("unsub"), b"before")
    assert await take(leaving, 1) == [b"before"]

    await leaving.unsubscribe()
    await leaving.unsubscribe()  # idempotent
    await messenger.publish(subject("unsub"), b"after")

    # "after" provably went out (the other subscriber has it) yet the leaver's stream just ends.
    assert await take(staying, 2) == [b"before", b"after"]
    assert await drain(leaving) == []


async def test_unsubscribe_keeps_what_was_already_buffered(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    sub = await messenger.stream(subject("buffered"))
    witness = await messenger.stream(subject("buffered"))
    for payload in (b"1", b"2", b"3"):
        await messenger.publish(subject("buffered"), payload)
    await take(witness, 3)
    assert isinstance(sub, BufferedSubscription)
    await eventually(lambda: sub.pending == 3, within=WAIT, what="three messages pending")

    await sub.unsubscribe()
    assert await drain(sub) == [b"1", b"2", b"3"]


async def test_async_with_unsubscribes_on_exit(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    witness = await messenger.stream(subject("ctx"))
    async with await messenger.stream(subject("ctx")) as sub:
        await messenger.publish(subject("ctx"), b"inside")
        assert await take(sub, 1) == [b"inside"]
    await messenger.publish(subject("ctx"), b"outside")

    assert await take(witness, 2) == [b"inside", b"outside"]
    assert await drain(sub) == []


async def test_a_blocked_consumer_wakes_when_unsubscribed(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    sub = await messenger.stream(subject("wake"))
    reader = asyncio.create_task(drain(sub))
    await asyncio.sleep(0)  # let the reader reach its wait
    await sub.unsubscribe()
    assert await reader == []


async def test_request_gets_the_handlers_reply(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    async def shout(data: bytes) -> bytes:
        return data.upper()

    async with await messenger.serve(subject("rpc"), shout):
        assert await messenger.request(subject("rpc"), b"hello", timeout=WAIT) == b"HELLO"
        assert await messenger.request(subject("rpc"), b"", timeout=WAIT) == b""


async def test_request_nobody_serves_raises_no_responders(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    with pytest.raises(NoResponders, match="rpc"):
        await messenger.request(subject("rpc"), b"anyone?", timeout=WAIT)


async def test_request_after_unserve_raises_no_responders(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    async def echo(data: bytes) -> bytes:
        return data

    service = await messenger.serve(subject("rpc"), echo)
    assert await messenger.request(subject("rpc"), b"x", timeout=WAIT) == b"x"
    await service.unsubscribe()
    await service.unsubscribe()  # idempotent
    with pytest.raises(NoResponders):
        await messenger.request(subject("rpc"), b"x", timeout=WAIT)
    assert await drain(service) == []


async def test_request_past_its_timeout_raises_request_timeout(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    never = asyncio.Event()
    started = asyncio.Event()

    async def stuck(data: bytes) -> bytes:
        started.set()
        await never.wait()
        return data

    async with await messenger.serve(subject("slow"), stuck):
        with pytest.raises(RequestTimeout, match="slow"):
            await messenger.request(subject("slow"), b"x", timeout=0.2)
        assert started.is_set()


async def test_a_slow_request_does_not_hold_up_the_next(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    release = asyncio.Event()

    async def handler(data: bytes) -> bytes:
        if data == b"wait":
            await release.wait()
        else:
            release.set()
        return data

    async with await messenger.serve(subject("concurrent"), handler):
        waiting = asyncio.create_task(
            messenger.request(subject("concurrent"), b"wait", timeout=WAIT)
        )
        assert await messenger.request(subject("concurrent"), b"go", timeout=WAIT) == b"go"
        assert await waiting == b"wait"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("model 'x' is not declared"), "model 'x' is not declared"),
        (NotFound("no backend b1"), "no backend b1"),
        (KeyError(), "KeyError"),
        (RuntimeError("key sk-abcdefghijklmnop leaked"), "sk-ab****"),
    ],
)
async def test_handler_exception_reaches_the_requester(
    messenger: Messenger, subject: Callable[[str], str], error: Exception, expected: str
) -> None:
    async def handler(data: bytes) -> bytes:
        if data == b"fail":
            raise error
        return b"fine"

    async with await messenger.serve(subject("err"), handler):
        with pytest.raises(RemoteError) as caught:
            await messenger.request(subject("err"), b"fail", timeout=WAIT)
        # The service survives its handler's failure.
        assert await messenger.request(subject("err"), b"ok", timeout=WAIT) == b"fine"
    assert expected in str(caught.value)
    assert "abcdefghijklmnop" not in str(caught.value)


async def test_handler_returning_non_bytes_is_a_remote_error(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    async def wrong(data: bytes) -> bytes:
        return data.decode()  # type: ignore[return-value]

    async with await messenger.serve(subject("wrong"), wrong):
        with pytest.raises(RemoteError, match="str, not bytes"):
            await messenger.request(subject("wrong"), b"x", timeout=WAIT)


async def test_each_request_is_answered_by_exactly_one_responder(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    calls: list[str] = []

    def responder(name: str) -> Handler:
        async def handle(data: bytes) -> bytes:
            calls.append(name)
            return name.encode()

        return handle

    first = await messenger.serve(subject("pool"), responder("first"))
    second = await messenger.serve(subject("pool"), responder("second"))
    replies = [await messenger.request(subject("pool"), b"", timeout=WAIT) for _ in range(20)]
    await first.unsubscribe()
    await second.unsubscribe()

    assert len(calls) == 20
    assert sorted(reply.decode() for reply in replies) == sorted(calls)


async def test_slow_subscriber_never_blocks_publisher_and_loses_oldest(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    slow = await messenger.stream(subject("flood"), max_pending=10)
    witness = await messenger.stream(subject("flood"), max_pending=1000)
    sent = [str(i).encode() for i in range(100)]
    async with asyncio.timeout(WAIT):  # a blocked publisher would fail here, not hang
        for payload in sent:
            await messenger.publish(subject("flood"), payload)

    assert await take(witness, 100) == sent
    await eventually(lambda: slow.dropped == 90, within=WAIT, what="90 messages dropped")
    assert await take(slow, 10) == sent[-10:]
    assert witness.dropped == 0


async def test_close_is_idempotent_and_final(
    messenger: Messenger, subject: Callable[[str], str]
) -> None:
    async def echo(data: bytes) -> bytes:
        return data

    sub = await messenger.stream(subject("closing"))
    await messenger.serve(subject("svc"), echo)
    await messenger.ping()
    await messenger.close()
    await messenger.close()

    assert await drain(sub) == []
    await sub.unsubscribe()
    with pytest.raises(BusError, match="closed"):
        await messenger.publish(subject("closing"), b"x")
    with pytest.raises(BusError, match="closed"):
        await messenger.stream(subject("closing"))
    with pytest.raises(BusError, match="closed"):
        await messenger.request(subject("svc"), b"x", timeout=WAIT)
    with pytest.raises(BusError, match="closed"):
        await messenger.serve(subject("svc"), echo)
    with pytest.raises(BusError, match="closed"):
        await messenger.ping()


async def test_async_with_messenger_closes_it() -> None:
    async with await open_bus("memory://") as bus:
        await bus.ping()
    with pytest.raises(BusError):
        await bus.ping()


@pytest.mark.parametrize("bad", ["", "a..b", "a b", ".a", "a.", "a.*", "a.>", "a\r\nPUB x"])
async def test_publish_subject_is_validated(messenger: Messenger, bad: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await messenger.publish(bad, b"x")
    assert caught.value.field == "subject"
    with pytest.raises(InvalidInput):
        await messenger.request(bad, b"x", timeout=1)


@pytest.mark.parametrize("bad", ["", "a.>.b", "a.b*", "a >"])
async def test_subscribe_subject_is_validated(messenger: Messenger, bad: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await messenger.stream(bad)
    assert caught.value.field == "subject"


async def test_arguments_are_validated(messenger: Messenger, subject: Callable[[str], str]) -> None:
    with pytest.raises(InvalidInput) as caught:
        await messenger.stream(subject("x"), max_pending=0)
    assert caught.value.field == "max_pending"
    with pytest.raises(InvalidInput) as caught:
        await messenger.request(subject("x"), b"", timeout=0)
    assert caught.value.field == "timeout"
    # bytes(5) would have sent five zero bytes; bytes("x") raised a bare TypeError.
    for data in (5, "text", None):
        with pytest.raises(InvalidInput) as caught:
            await messenger.publish(subject("x"), data)  # type: ignore[arg-type]
        assert caught.value.field == "data"
        with pytest.raises(InvalidInput) as caught:
            await messenger.request(subject("x"), data, timeout=1)  # type: ignore[arg-type]
        assert caught.value.field == "data"


@pytest.mark.parametrize("url", [None, "memory://"])
async def test_memory_urls_open_the_in_process_bus(url: str | None) -> None:
    bus = await open_bus(url)
    try:
        sub = await bus.stream("hello")
        await bus.publish("hello", b"world")
        assert await take(sub, 1) == [b"world"]
    finally:
        await bus.close()


@pytest.mark.parametrize(
    "url",
    [
        "",
        "redis://127.0.0.1:6379",
        "http://127.0.0.1:4222",
        "nats://",
        "nats://127.0.0.1:notaport",
        "nats://127.0.0.1:4222/path",
        "nats://127.0.0.1:4222,amqp://127.0.0.1",
        "127.0.0.1:4222",
    ],
)
async def test_invalid_url_is_rejected(url: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        await open_bus(url)
    assert caught.value.field == "url"


async def test_unreachable_nats_is_a_bus_error() -> None:
    port = free_port()
    url = f"nats://user:hunter2secret@127.0.0.1:{port},nats://127.0.0.1:{port}"
    with pytest.raises(BusError) as caught:
        await open_bus(url, connect_timeout=0.5)
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "hunter2secret" not in message


@pytest.mark.nats
def test_a_nats_binary_that_gives_no_server_falls_back_to_the_url_then_skips_or_fails(
    tmp_path: Path, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = str(tmp_path / "nats-server")  # cannot be run: as good as one that fails
    log_path = tmp_path / "nats.log"
    monkeypatch.setenv("RUNTIMESTATE_TEST_NATS_URL", nats_url)
    with nats_server(missing, log_path) as url:
        assert url == nats_url
    monkeypatch.delenv("RUNTIMESTATE_TEST_NATS_URL")
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match="nats-server"), nats_server(missing, log_path):
        pass
    monkeypatch.setenv("CI", "true")
    failing = pytest.raises(pytest.fail.Exception, match="required under CI=true")
    with failing, nats_server(missing, log_path):
        pass


@pytest.fixture
async def peers(nats_url: str) -> AsyncIterator[tuple[Messenger, Messenger]]:
    first = await open_bus(nats_url)
    second = await open_bus(nats_url)
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


@pytest.mark.nats
async def test_nats_connections_share_the_bus(
    peers: tuple[Messenger, Messenger], subject: Callable[[str], str]
) -> None:
    first, second = peers

    async def answer(data: bytes) -> bytes:
        return b"from second: " + data

    sub = await second.stream(subject("replicas"))
    await second.serve(subject("ask"), answer)
    for i in range(200):
        await first.publish(subject("replicas"), str(i).encode())

    assert await take(sub, 200) == [str(i).encode() for i in range(200)]
    assert await first.request(subject("ask"), b"hi", timeout=WAIT) == b"from second: hi"


@pytest.mark.nats
async def test_close_delivers_what_was_published_before(
    nats_url: str, subject: Callable[[str], str]
) -> None:
    async with await open_bus(nats_url) as receiver:
        sub = await receiver.stream(subject("last"))
        sender = await open_bus(nats_url)
        await sender.publish(subject("last"), b"goodbye")
        await sender.close()
        assert await take(sub, 1) == [b"goodbye"]


def _raw_publish(url: str, subject: str, data: bytes) -> None:
    """Publish over a plain socket, without yielding to the event loop.

    A messenger that returned from ``stream`` with its SUB still queued in the client would not
    have sent it yet when this runs, so the server would route the message to nobody.
    """
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=WAIT) as raw:
        reader = raw.makefile("rb")
        assert reader.readline().startswith(b"INFO")
        raw.sendall(
            b'CONNECT {"verbose":false,"pedantic":false}\r\n'
            + f"PUB {subject} {len(data)}\r\n".encode()
            + data
            + b"\r\nPING\r\n"
        )
        # The server handles a connection's commands in order: PONG means the PUB was routed.
        assert reader.readline() == b"PONG\r\n"


@pytest.mark.nats
async def test_stream_returns_only_once_the_server_knows_the_subscription(
    nats_url: str, subject: Callable[[str], str]
) -> None:
    async with await open_bus(nats_url) as bus:
        sub = await bus.stream(subject("registered"))
        _raw_publish(nats_url, subject("registered"), b"first")
        assert await take(sub, 1) == [b"first"]


async def ping_works(bus: Messenger) -> bool:
    try:
        await bus.ping()
    except BusError:
        return False
    return True


async def ping_fails(bus: Messenger) -> bool:
    return not await ping_works(bus)


@pytest.mark.nats
async def test_nats_messenger_survives_a_server_restart(
    tmp_path: Path, subject: Callable[[str], str]
) -> None:
    binary = find_nats_server()
    if binary is None:
        pytest.skip("restarting a server needs the nats-server binary")
    log_path = tmp_path / "nats-server.log"
    process, port = start_nats_server(binary, log_path)
    url = f"nats://127.0.0.1:{port}"
    try:
        async with await open_bus(url) as bus:
            sub = await bus.stream(subject("after-restart"))
            stop_nats_server(process)
            await eventually(lambda: ping_fails(bus), within=WAIT, what="a failing ping")

            process, _ = start_nats_server(binary, log_path, port=port)
            # The client retries once a second; a successful ping means the SUBs were replayed.
            await eventually(lambda: ping_works(bus), within=3 * WAIT, what="a working ping")
            async with await open_bus(url) as other:
                await other.publish(subject("after-restart"), b"back")
            assert await take(sub, 1) == [b"back"]
    finally:
        stop_nats_server(process)
