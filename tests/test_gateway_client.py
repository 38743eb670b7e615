"""The gateway's HTTP client against scripted servers on real sockets, on asyncio's loop and uvloop.

Each server here is a few lines of asyncio that answer exactly as a script says - well, or the
ways backends fail: never answering, stalling after the head, dropping the connection in the
middle of a body, sending more than they announced, a head that never ends, a status line that
is not HTTP, closing a kept-alive connection under a request, sending faster than anyone reads.
What the server saw (connections accepted, requests read, bytes it managed to write, whether the
client closed the connection) is the ground truth; time runs on a ``FakeClock``, so a timeout is
a clock moved, never a wait. Every test runs on both event loops: the service runs on uvloop,
whose transports differ from asyncio's in what they call when.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp.abc import AbstractResolver, ResolveResult
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from runtimestate.backends.http import PolicyResolver
from runtimestate.clock import FakeClock
from runtimestate.gateway.client import (
    Client,
    ConnectFailed,
    Disconnected,
    Malformed,
)
from runtimestate.urls import UrlPolicy, parse_networks
from tests.fixtures.polling import eventually

Run = Callable[[Callable[[], Coroutine[Any, Any, None]]], None]
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
# What a server does with one request: write its answer; False to close the connection after.
Script = Callable[[int, Reader, Writer], Awaitable[bool]]

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
# A failure bound for one scenario, below the suite's per-test timeout.
WITHIN = 40.0


@pytest.fixture(params=list(LOOPS))
def run(request: pytest.FixtureRequest) -> Run:
    """Runs a test's scenario on a fresh loop of the parametrized kind."""

    def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
        async def bounded() -> None:
            # Only turns a hang into a failure (naming where it hung); never a speed limit.
            async with asyncio.timeout(WITHIN):
                await scenario()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            runner.run(bounded())

    return run


class Peer:
    """A scripted HTTP/1.1 server on a loopback port (see the module docstring)."""

    def __init__(self, script: Script, *, tls: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self.client_closed = 0  # connections the client closed (EOF or reset)
        self.sent = 0  # body bytes a streaming script managed to hand to the kernel
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: list[Writer] = []

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    async def __aenter__(self) -> Peer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        # A script still waiting (the scenario failed before it let it go) is stopped.
        _, waiting = await asyncio.wait(self._handlers, timeout=1) if self._handlers else ((), ())
        for handler in waiting:
            handler.cancel()

    async def _serve(self, reader: Reader, writer: Writer) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.client_closed += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests.append(head)
                if not await self.script(len(self.requests) - 1, reader, writer):
                    return
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    async def silence(self, reader: Reader) -> bool:
        """Answer nothing more until the client closes the connection."""
        with contextlib.suppress(ConnectionError):
            await reader.read()
        self.client_closed += 1
        return False

    async def wait_closed_by_client(self, count: int = 1) -> None:
        await eventually(
            lambda: self.client_closed >= count, what="the client closed its connection"
        )


def answer(body: bytes = b"ok", *, status: str = "200 OK", extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode("latin-1") + body
    )


def always(data: bytes) -> Script:
    async def script(index: int, reader: Reader, writer: Writer) -> bool:
        writer.write(data)
        await writer.drain()
        return True

    return script


def client(**options: Any) -> Client:
    options.setdefault("connect_timeout", 10.0)
    options.setdefault("clock", FakeClock())
    return Client(**options)


async def get(
    c: Client,
    url: str,
    *,
    method: str = "GET",
    total: float | None = None,
    idle: float | None = None,
) -> bytes:
    if total is None and idle is None:
        total = 30.0
    body = b"{}" if method == "POST" else None
    response = await c.request(method, url, body, total=total, idle=idle)
    return await response.read()


async def until_waiting(clock: FakeClock, count: int = 1) -> None:
    await eventually(lambda: clock.sleepers >= count, what="the client is waiting on its clock")


# -- bodies ----------------------------------------------------------------------------------------


def test_bodies_by_length_by_chunks_and_until_close(run: Run) -> None:
    async def scenario() -> None:
        answers = [
            answer(b'{"a": 1}'),
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nTrailer: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end",
        ]

        async def script(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(answers[index])
            return index < 2  # the last body ends when the connection closes

        async with Peer(script) as peer:
            c = client()
            assert await get(c, peer.url + "/a") == b'{"a": 1}'
            assert await get(c, peer.url + "/b") == b"abcdefg"
            response = await c.request("GET", peer.url + "/c", total=30)
            assert response.header(b"content-type") == "text/plain"
            assert await response.read() == b"until the end"
            # The length and chunked answers kept their connection; the one read until close
            # did not.
            assert peer.connections == 1
            assert c.connections(peer.url) == (0, 0)
            await c.aclose()

    run(scenario)


def test_head_204_and_304_have_no_body_and_keep_the_connection(run: Run) -> None:
    async def scenario() -> None:
        answers = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n",  # HEAD: the length, no body
            b"HTTP/1.1 204 No Content\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nContent-Length: 50\r\n\r\n",
            b"HTTP/1.1 100 Continue\r\n\r\n" + answer(b"after an interim answer"),
        ]

        async with Peer(lambda i, r, w: _write(w, answers[i])) as peer:
            c = client()
            assert await get(c, peer.url, method="HEAD") == b""
            assert await get(c, peer.url) == b""
            assert await get(c, peer.url) == b""
            assert await get(c, peer.url) == b"after an interim answer"
            assert peer.connections == 1
            assert peer.requests[0].startswith(b"HEAD / HTTP/1.1\r\n")
            await c.aclose()

    run(scenario)


async def _write(writer: Writer, data: bytes) -> bool:
    writer.write(data)
    await writer.drain()
    return True


def test_chunks_split_across_reads_are_put_together(run: Run) -> None:
    async def scenario() -> None:
        wire = (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"a\r\n0123456789\r\n1b\r\nabcdefghijklmnopqrstuvwxyz!\r\n0\r\n\r\n"
        )

        async def script(index: int, reader: Reader, writer: Writer) -> bool:
            # One byte at a time, each given a turn of the loop to arrive on its own.
            for i in range(len(wire)):
                writer.write(wire[i : i + 1])
                await writer.drain()
                for _ in range(3):
                    await asyncio.sleep(0)
            return True

        async with Peer(script) as peer:
            c = client()
            response = await c.request("POST", peer.url, b"{}", idle=30)
            pieces = []
            while piece := await response.chunk():
                pieces.append(piece)
            assert b"".join(pieces) == b"0123456789abcdefghijklmnopqrstuvwxyz!"
            assert len(pieces) > 1
            # The whole answer was read: the connection is back in the pool, and used again.
            assert await get(c, peer.url) == b"0123456789abcdefghijklmnopqrstuvwxyz!"
            assert peer.connections == 1
            await c.aclose()

    run(scenario)


# -- a server that breaks off --------------------------------------------------------------------


def test_a_body_dropped_in_the_middle_is_disconnected(run: Run) -> None:
    async def scenario() -> None:
        async def by_length(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
            return False

        async def by_chunks(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await writer.drain()
            await asyncio.sleep(0)
            return False

        async with Peer(by_length) as peer:
            c = client()
            with pytest.raises(Disconnected, match="before the answer ended") as caught:
                await get(c, peer.url)
            assert caught.value.before_answer is False
            await c.aclose()
        async with Peer(by_chunks) as peer:
            c = client()
            response = await c.request("POST", peer.url, b"{}", idle=30)
            assert await response.chunk() == b"first"
            with pytest.raises(Disconnected, match="before the answer ended"):
                await response.chunk()
            await c.aclose()

    run(scenario)


def test_more_bytes_than_announced_end_the_answer_and_the_connection(run: Run) -> None:
    async def scenario() -> None:
        async with Peer(always(answer(b"hello")[:-5] + b"helloEXTRA BYTES")) as peer:
            c = client()
            assert await get(c, peer.url) == b"hello"
            assert await get(c, peer.url) == b"hello"
            # What came after the announced length could be the start of anything: the
            # connection it came on is not used again.
            assert peer.connections == 2
            await c.aclose()

    run(scenario)


def test_a_fresh_connection_closed_before_any_answer_is_not_repeated(run: Run) -> None:
    async def scenario() -> None:
        async def close_at_once(index: int, reader: Reader, writer: Writer) -> bool:
            return False

        async with Peer(close_at_once) as peer:
            c = client()
            with pytest.raises(Disconnected, match="before any answer") as caught:
                await get(c, peer.url)
            assert caught.value.before_answer is True
            assert len(peer.requests) == 1
            await c.aclose()

    run(scenario)


def test_a_kept_alive_connection_the_server_closed_is_tried_once_more_on_a_new_one(
    run: Run,
) -> None:
    async def scenario() -> None:
        async def close_the_second(index: int, reader: Reader, writer: Writer) -> bool:
            if index == 1:
                return False  # the server's idle close crossing the request: no answer
            writer.write(answer(f"answer {index}".encode()))
            return True

        async with Peer(close_the_second) as peer:
            c = client()
            assert await get(c, peer.url) == b"answer 0"
            assert c.connections(peer.url) == (1, 1)
            assert await get(c, peer.url) == b"answer 2"
            # The second request went out twice: on the kept-alive connection, which closed
            # without an answer, then once on a new one.
            assert len(peer.requests) == 3
            assert peer.connections == 2
            await c.aclose()

    run(scenario)


def test_an_idle_connection_the_server_closed_is_not_used(run: Run) -> None:
    async def scenario() -> None:
        async def answer_and_close(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(answer(b"once"))
            await writer.drain()
            return False  # closed after answering, without saying so

        async with Peer(answer_and_close) as peer:
            c = client()
            assert await get(c, peer.url) == b"once"
            await eventually(lambda: c.connections(peer.url) == (0, 0), what="the close seen")
            assert await get(c, peer.url) == b"once"
            assert len(peer.requests) == 2
            assert peer.connections == 2
            await c.aclose()

    run(scenario)


def test_an_answer_saying_connection_close_is_not_pooled(run: Run) -> None:
    async def scenario() -> None:
        # The server says it will close, and then does not: the client must close it.
        async with Peer(always(answer(b"bye", extra="Connection: close\r\n"))) as peer:
            c = client()
            assert await get(c, peer.url) == b"bye"
            await peer.wait_closed_by_client()
            assert await get(c, peer.url) == b"bye"
            assert peer.connections == 2
            await c.aclose()

    run(scenario)


# -- time ----------------------------------------------------------------------------------------


def test_a_server_that_never_answers_times_out_and_is_closed(run: Run) -> None:
    async def scenario() -> None:
        async def hold(index: int, reader: Reader, writer: Writer) -> bool:
            return await peer.silence(reader)

        async with Peer(hold) as peer:
            clock = FakeClock()
            c = client(clock=clock)
            waiting = asyncio.create_task(get(c, peer.url, total=30))
            await until_waiting(clock)
            clock.advance(29)
            await eventually(lambda: len(peer.requests) == 1, what="the request arrived")
            assert not waiting.done()
            clock.advance(2)
            with pytest.raises(TimeoutError):
                await waiting
            await peer.wait_closed_by_client()
            await c.aclose()

    run(scenario)


def test_a_head_then_silence_times_out_as_a_whole_and_per_wait(run: Run) -> None:
    async def scenario() -> None:
        async def stall(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            return await peer.silence(reader)

        async with Peer(stall) as peer:
            clock = FakeClock()
            c = client(clock=clock)
            response = await c.request("POST", peer.url, b"{}", total=30)
            reading = asyncio.create_task(response.read())
            await until_waiting(clock)
            clock.advance(31)
            with pytest.raises(TimeoutError):
                await reading
            await peer.wait_closed_by_client(1)

            streamed = await c.request("POST", peer.url, b"{}", idle=5)
            assert await streamed.chunk() == b"first"
            reading = asyncio.create_task(streamed.chunk())
            # The bound counts from the start of each wait: let this one start.
            await eventually(lambda: streamed.waiter is not None, what="the reader waits")
            clock.advance(4)
            await asyncio.sleep(0)
            assert not reading.done()
            clock.advance(2)
            with pytest.raises(TimeoutError):
                await reading
            await peer.wait_closed_by_client(2)
            await c.aclose()

    run(scenario)


def test_a_cancelled_reader_closes_the_connection_at_once(run: Run) -> None:
    async def scenario() -> None:
        async def stream(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            return await peer.silence(reader)

        async with Peer(stream) as peer:
            c = client()
            response = await c.request("POST", peer.url, b"{}", idle=600)
            assert await response.chunk() == b"first"
            reading = asyncio.create_task(response.chunk())
            await asyncio.sleep(0)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
            # The backend sees the close now, not when its stream (never) ends.
            await peer.wait_closed_by_client()
            assert c.connections(peer.url) == (0, 0)
            await c.aclose()

    run(scenario)


# -- answers that are not HTTP -------------------------------------------------------------------


def test_a_head_over_the_bound_or_without_end_is_malformed(run: Run) -> None:
    async def scenario() -> None:
        big = answer(extra=f"X-Padding: {'p' * 100_000}\r\n")
        async with Peer(always(big)) as peer:
            c = client(max_head_bytes=16 * 1024)
            with pytest.raises(Malformed, match="head exceeds 16384 bytes"):
                await get(c, peer.url)
            await c.aclose()

        async def endless(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Endless: ")
            try:
                while True:
                    writer.write(b"e" * 4096)
                    await writer.drain()
            except ConnectionError:
                peer.client_closed += 1
            return False

        async with Peer(endless) as peer:
            c = client(max_head_bytes=16 * 1024)
            with pytest.raises(Malformed, match="head exceeds"):
                await get(c, peer.url)
            await peer.wait_closed_by_client()
            await c.aclose()

    run(scenario)


@pytest.mark.parametrize(
    "wire",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n",
        b"HTTP/1.1 2x0 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
    ],
)
def test_an_answer_that_is_not_http_is_malformed_with_its_cause(run: Run, wire: bytes) -> None:
    async def scenario() -> None:
        async with Peer(always(wire)) as peer:
            c = client()
            with pytest.raises(Malformed, match=r"malformed answer: \w+") as caught:
                await get(c, peer.url)
            assert "Authorization" not in str(caught.value)
            await c.aclose()

    run(scenario)


# -- the pool and backpressure --------------------------------------------------------------------


def test_the_pool_holds_its_bound_per_origin(run: Run) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def slow(index: int, reader: Reader, writer: Writer) -> bool:
            await release.wait()
            writer.write(answer(f"{index}".encode()))
            return True

        async with Peer(slow) as peer:
            c = client(limit=2)
            requests = [asyncio.create_task(get(c, peer.url)) for _ in range(5)]
            await eventually(lambda: len(peer.requests) == 2, what="two requests at the server")
            assert peer.connections == 2
            release.set()
            answers = await asyncio.gather(*requests)
            assert sorted(answers) == [b"0", b"1", b"2", b"3", b"4"]
            assert peer.connections == 2
            assert c.connections(peer.url) == (2, 2)
            await c.aclose()

    run(scenario)


def test_a_reader_that_does_not_read_stops_the_server_writing(run: Run) -> None:
    total = 64 * 1024 * 1024
    piece = b"z" * (64 * 1024)

    async def scenario() -> None:
        async def flood(index: int, reader: Reader, writer: Writer) -> bool:
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {total}\r\n\r\n".encode())
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
            while peer.sent < total:
                writer.write(piece)
                await writer.drain()
                peer.sent += len(piece)
            return True

        async with Peer(flood) as peer:
            c = client(read_buffer=256 * 1024)
            response = await c.request("GET", peer.url, idle=30)
            last = -1

            def stopped() -> bool:
                # Nothing more taken by the kernel between two looks: the writes are blocked.
                nonlocal last
                seen, last = last, peer.sent
                return seen == last

            await eventually(stopped, what="the server's writes blocked", every=0.2)
            assert peer.sent < total // 4
            received = 0
            while chunk := await response.chunk():
                received += len(chunk)
            assert received == total
            assert peer.sent == total
            await c.aclose()

    run(scenario)


# -- https and the network policy ----------------------------------------------------------------


def _certificate(tmp: Path) -> tuple[ssl.SSLContext, bytes]:
    """A server context with a self-signed certificate for localhost, and that certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM)
    (tmp / "cert.pem").write_bytes(pem)
    (tmp / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    return server, pem


def test_https_to_a_trusted_certificate_and_never_to_an_untrusted_one(
    run: Run, tmp_path: Path
) -> None:
    server, pem = _certificate(tmp_path)

    async def scenario() -> None:
        async with Peer(always(answer(b"secret answer")), tls=server) as peer:
            url = f"https://localhost:{peer.port}/v1/models"
            trusting = client(ssl_context=ssl.create_default_context(cadata=pem.decode()))
            assert await get(trusting, url) == b"secret answer"
            assert await get(trusting, url) == b"secret answer"
            assert peer.connections == 1
            assert peer.requests[0].startswith(b"GET /v1/models HTTP/1.1\r\nHost: localhost:")
            await trusting.aclose()
            default = client()
            with pytest.raises(ConnectFailed, match="certificate verify failed"):
                await get(default, url)
            assert len(peer.requests) == 2
            await default.aclose()

    run(scenario)


class MovingName(AbstractResolver):
    """A name server whose one name points wherever the test says."""

    def __init__(self, address: str) -> None:
        self.address = address

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=self.address, port=port, family=socket.AF_INET, proto=0, flags=0
            )
        ]

    async def close(self) -> None:
        return None


def test_names_are_resolved_through_the_network_policy_at_every_connection(run: Run) -> None:
    async def scenario() -> None:
        async with Peer(always(answer(b"fine", extra="Connection: close\r\n"))) as peer:
            names = MovingName("127.0.0.1")
            c = client(resolver=PolicyResolver(UrlPolicy(), inner=names))
            url = f"http://moving.example:{peer.port}/v1/models"
            assert await get(c, url) == b"fine"
            names.address = "169.254.169.254"
            with pytest.raises(ConnectFailed, match=r"169\.254\.169\.254, in the denied network"):
                await get(c, url)
            assert peer.connections == 1
            await c.aclose()

            loopback = parse_networks(["127.0.0.0/8", "::1/128"], "deny")
            denying = client(resolver=PolicyResolver(UrlPolicy(denied=loopback)))
            with pytest.raises(ConnectFailed, match="localhost resolves only to refused"):
                await get(denying, f"http://localhost:{peer.port}/")
            assert peer.connections == 1
            await denying.aclose()

    run(scenario)


def test_a_refused_connection_names_its_cause(run: Run) -> None:
    async def scenario() -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]  # bound, never listening: refused
            c = client()
            with pytest.raises(ConnectFailed, match="Connection refused"):
                await get(c, f"http://127.0.0.1:{port}/")
            await c.aclose()

    run(scenario)
