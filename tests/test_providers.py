"""Every client of every backend type against the emulators, over real sockets.

One emulator serves an Ollama node, two vLLM servers (chat and embedding), an OpenAI account and
a Gemini account. Snapshots are built by hand from ``LLMState`` records, providers come from the
real adapter and clients from a real :class:`ClientPool`. The stream-cancellation tests put a
small TCP relay between the client and the emulator, so "the connection was closed" is observed
on the wire, not inferred from the SDK.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import httpx
import httpx2
import pytest

from runtimestate import kinds
from runtimestate.backends import HttpClient
from runtimestate.clock import FakeClock
from runtimestate.errors import (
    AllCoolingDown,
    BackendError,
    BackendUnreachable,
    BadRequest,
    InvalidInput,
    KeyRejected,
    ProtocolError,
    RateLimited,
    ServerError,
    Unsupported,
)
from runtimestate.providers import (
    ChatMessage,
    ClientPool,
    HealthConfig,
    ModelClient,
    Provider,
    local_provider_adapter,
)
from runtimestate.providers.limits import ResponseTooLarge, bounded_transport
from runtimestate.records import BackendInfo, ListModelResponse, LLMState
from runtimestate.resolver import Resolver, ResolveRequest
from runtimestate.status import status_error_class
from runtimestate.testing import EmulatedBackend, Emulator, GeminiModel
from tests.fixtures.polling import eventually

OPENAI_KEY = "sk-test-0123456789abcdef"
GEMINI_KEY = "AIzaTest0123456789abcdef"
COMPATIBLE_KEY = "local-test-0123456789"
KINDS = ("ollama", "vllm", "openai", "gemini")
CHAT = {"can_chat": True, "can_prompt": True, "can_stream": True}
EMBED = {"can_embed": True}


@dataclass(frozen=True, kw_only=True)
class Fleet:
    emu: Emulator
    backends: dict[str, EmulatedBackend]
    snapshot: dict[str, LLMState]
    chat_models: dict[str, str]
    embed_models: dict[str, str]


def llm_state(
    backend_id: str, kind: str, base_url: str, models: dict[str, dict[str, bool]], key: str | None
) -> LLMState:
    info = BackendInfo(id=backend_id, name=backend_id, base_url=base_url, type=kind)
    pulled = tuple(
        ListModelResponse(name=name, model=name, context_length=8192, **caps)
        for name, caps in models.items()
    )
    return LLMState(
        id=backend_id, name=backend_id, backend=info, pulled_models=pulled
    ).with_api_key(key)


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with Emulator(latency=0.0) as emu:
        node = emu.add_ollama("node-1", models=["llama3.2:1b", "nomic-embed-text"])
        vllm = emu.add_vllm("v-chat", model="meta-llama/Llama-3.1-8B-Instruct")
        vllm_embed = emu.add_vllm("v-embed", model="BAAI/bge-small-en-v1.5")
        oa = emu.add_openai("acct", api_key=OPENAI_KEY, models=["gpt-4o", "text-embedding-3-small"])
        gm = emu.add_gemini(
            "acct",
            api_key=GEMINI_KEY,
            models=[
                GeminiModel(name="gemini-2.0-flash"),
                GeminiModel(name="text-embedding-004", methods=("embedContent",)),
            ],
        )
        compatible = emu.add_openai_compatible("lm", models=["qwen2.5-7b"], api_key=COMPATIBLE_KEY)
        chat_models = {
            "openai-compatible": "qwen2.5-7b",
            "ollama": "llama3.2:1b",
            "vllm": "meta-llama/Llama-3.1-8B-Instruct",
            "openai": "gpt-4o",
            "gemini": "models/gemini-2.0-flash",
        }
        embed_models = {
            "ollama": "nomic-embed-text:latest",
            "vllm": "BAAI/bge-small-en-v1.5",
            "openai": "text-embedding-3-small",
            "gemini": "models/text-embedding-004",
        }
        snapshot = {
            "openai-compatible": llm_state(
                "openai-compatible",
                "openai-compatible",
                compatible.base_url,
                {"qwen2.5-7b": CHAT},
                COMPATIBLE_KEY,
            ),
            "ollama": llm_state(
                "ollama",
                "ollama",
                node.base_url,
                {"llama3.2:1b": CHAT, "nomic-embed-text:latest": EMBED},
                None,
            ),
            "vllm": llm_state("vllm", "vllm", vllm.base_url, {chat_models["vllm"]: CHAT}, None),
            "vllm-embed": llm_state(
                "vllm-embed", "vllm", vllm_embed.base_url, {embed_models["vllm"]: EMBED}, None
            ),
            "openai": llm_state(
                "openai",
                "openai",
                oa.base_url,
                {"gpt-4o": CHAT, "text-embedding-3-small": EMBED},
                OPENAI_KEY,
            ),
            "gemini": llm_state(
                "gemini",
                "gemini",
                gm.base_url,
                {chat_models["gemini"]: CHAT, embed_models["gemini"]: EMBED},
                GEMINI_KEY,
            ),
        }
        backends: dict[str, EmulatedBackend] = {
            "openai-compatible": compatible,
            "ollama": node,
            "vllm": vllm,
            "vllm-embed": vllm_embed,
            "openai": oa,
            "gemini": gm,
        }
        yield Fleet(
            emu=emu,
            backends=backends,
            snapshot=snapshot,
            chat_models=chat_models,
            embed_models=embed_models,
        )


@pytest.fixture
async def pool() -> AsyncIterator[ClientPool]:
    async with ClientPool(timeout=5.0, stream_idle_timeout=5.0) as clients:
        yield clients


async def client_for(
    fleet: Fleet, pool: ClientPool, kind: str, *, embed: bool = False
) -> ModelClient:
    providers = await local_provider_adapter(fleet.snapshot)(kind)
    wanted = (fleet.embed_models if embed else fleet.chat_models)[kind]
    (provider,) = [p for p in providers if p.model == wanted]
    return pool.client(provider, provider.backends[0])


USER = [ChatMessage(role="user", content="hello there")]


@pytest.mark.parametrize("kind", KINDS)
async def test_chat_prompt_and_stream(fleet: Fleet, pool: ClientPool, kind: str) -> None:
    client = await client_for(fleet, pool, kind)
    result = await client.chat([{"role": "system", "content": "be brief"}, *map(vars_of, USER)])
    assert result.message.role == "assistant"
    assert "you wrote hello there" in result.message.content
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens > 0
    text = await client.prompt("write a haiku", system="you are a poet")
    assert "you wrote write a haiku" in text
    chunks = [chunk async for chunk in client.stream(USER)]
    assert len(chunks) > 1
    assert "".join(chunks).strip() == result.message.content.strip()
    prompted = [chunk async for chunk in client.stream(prompt="stream me", system="sys")]
    assert "you wrote stream me" in "".join(prompted)
    assert pool.size == 1  # one SDK client, reused by every call


def vars_of(message: ChatMessage) -> dict[str, str]:
    return {"role": message.role, "content": message.content}


@pytest.mark.parametrize("kind", KINDS)
async def test_embed_one_text_or_a_batch(fleet: Fleet, pool: ClientPool, kind: str) -> None:
    client = await client_for(fleet, pool, kind, embed=True)
    (single,) = await client.embed("alpha")
    batch = await client.embed(["alpha", "beta"])
    assert len(batch) == 2
    assert batch[0] == pytest.approx(single)
    assert batch[1] != batch[0]
    assert len(single) == len(batch[1]) > 8


ONE_VECTOR = {
    "ollama": b'{"model": "m", "embeddings": [[0.5, 0.5]]}',
    "vllm": b'{"object": "list", "model": "m", "data": [{"object": "embedding", "index": 0, '
    b'"embedding": [0.5, 0.5]}], "usage": {"prompt_tokens": 1, "total_tokens": 1}}',
    "gemini": b'{"embeddings": [{"values": [0.5, 0.5]}]}',
}
ONE_VECTOR["openai"] = ONE_VECTOR["vllm"]


@pytest.mark.parametrize("kind", KINDS)
async def test_an_embedding_answer_without_one_vector_per_text_is_malformed(
    fleet: Fleet, pool: ClientPool, kind: str
) -> None:
    client = await client_for(fleet, pool, kind, embed=True)
    fleet.backends["vllm-embed" if kind == "vllm" else kind].faults.fail(
        status=200, body=ONE_VECTOR[kind], times=1
    )
    with pytest.raises(ProtocolError, match="malformed embedding response"):
        await client.embed(["alpha", "beta"])


@pytest.mark.parametrize("kind", KINDS)
async def test_missing_capability_fails_before_any_request(
    fleet: Fleet, pool: ClientPool, kind: str
) -> None:
    backend = fleet.backends[kind]
    chat = await client_for(fleet, pool, kind)
    embed = await client_for(fleet, pool, kind, embed=True)
    before = len(backend.requests)
    with pytest.raises(Unsupported, match="cannot embed"):
        await chat.embed("x")
    with pytest.raises(Unsupported, match="cannot chat"):
        await embed.chat(USER)
    with pytest.raises(Unsupported, match="cannot stream"):
        async for _ in embed.stream(USER):
            pass
    assert len(backend.requests) == before
    assert pool.size == 0


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_arguments_fail_before_any_request_and_do_not_cool_the_backend(
    fleet: Fleet, pool: ClientPool, kind: str
) -> None:
    # Sent as is, these reach the SDK, whose own validation error (Ollama's) read as a malformed
    # response and counted against a healthy backend.
    backend = fleet.backends[kind]
    chat = await client_for(fleet, pool, kind)
    embed = await client_for(fleet, pool, kind, embed=True)
    before = len(backend.requests)
    bad_messages: list[object] = [
        [{"role": "user", "content": None}],
        [{"role": 3, "content": "hi"}],
        ["hello"],
        "hello",
        {"role": "user", "content": "hi"},
    ]
    for messages in bad_messages:
        with pytest.raises(InvalidInput) as info:
            await chat.chat(messages)  # type: ignore[arg-type]
        assert info.value.field == "messages"
        with pytest.raises(InvalidInput):
            _ = [c async for c in chat.stream(messages)]  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="prompt must be a string"):
        await chat.prompt(None)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="system must be a string"):
        await chat.prompt("hi", system=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="prompt must be a string"):
        _ = [c async for c in chat.stream(prompt=b"hi")]  # type: ignore[arg-type]
    for texts in ([1, 2], ["ok", None], 42):
        with pytest.raises(InvalidInput) as info:
            await embed.embed(texts)  # type: ignore[arg-type]
        assert info.value.field == "texts"
    assert len(backend.requests) == before
    assert pool.health.snapshot() == {}
    assert pool.size == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.parametrize("kind", KINDS)
async def test_backend_errors_become_project_errors(
    fleet: Fleet, pool: ClientPool, kind: str
) -> None:
    backend = fleet.backends[kind]
    client = await client_for(fleet, pool, kind)
    cases: list[tuple[int, type[BackendError]]] = [
        (500, ServerError),
        (503, ServerError),
        (429, RateLimited),
        (404, BadRequest),
    ]
    for status, error in cases:
        backend.faults.fail(status=status, times=1)
        with pytest.raises(error) as info:
            await client.chat(USER)
        message = str(info.value)
        assert f"{kind} backend {kind!r}" in message
        assert info.value.backend == client.backend.base_url
        assert info.value.__cause__ is not None
    backend.faults.malformed(times=1)
    with pytest.raises(ProtocolError, match="malformed"):
        await client.chat(USER)
    backend.faults.stream_error(after_lines=2, message="model crashed")
    with pytest.raises(ServerError, match="model crashed"):
        _ = [chunk async for chunk in client.stream(USER)]
    backend.faults.clear()
    backend.faults.break_stream(after_lines=2)
    with pytest.raises(BackendUnreachable):
        _ = [chunk async for chunk in client.stream(USER)]
    backend.faults.clear()


@pytest.mark.parametrize("kind", KINDS)
async def test_unreachable_and_timeouts(fleet: Fleet, kind: str) -> None:
    backend = fleet.backends[kind]
    # The deadlines run on the pool's clock: the test moves it, nothing waits for real time.
    clock = FakeClock()
    async with ClientPool(timeout=0.3, stream_idle_timeout=0.3, clock=clock) as pool:
        client = await client_for(fleet, pool, kind)
        backend.faults.hang()
        call = asyncio.create_task(client.chat(USER))
        await eventually(
            lambda: backend.active == 1 and clock.sleepers == 1, what="the call at the backend"
        )
        clock.advance(0.29)
        assert clock.sleepers == 1  # the call's deadline has not passed yet
        clock.advance(0.01)
        with pytest.raises(BackendUnreachable, match=r"no answer within 0\.3s"):
            await call
        backend.faults.clear()
        backend.faults.stall_stream(after_lines=2)
        chunks: list[str] = []

        async def read() -> None:
            async for chunk in client.stream(USER):
                chunks.append(chunk)

        reading = asyncio.create_task(read())
        await eventually(lambda: chunks and clock.sleepers == 1, what="the stream under way")

        def stalled() -> bool:
            # Each wait for a chunk has its own idle deadline: move past it until one expires.
            clock.advance(0.3)
            return reading.done()

        await eventually(stalled, what="the stalled stream given up")
        with pytest.raises(BackendUnreachable, match=r"stalled for 0\.3s"):
            await reading
        backend.faults.clear()
        dead = fleet.snapshot[kind].backend.base_url.replace(
            fleet.emu.url, f"http://127.0.0.1:{free_port()}"
        )
        info = fleet.snapshot[kind].backend.model_copy(update={"base_url": dead})
        moved = fleet.snapshot[kind].model_copy(update={"backend": info})
        (provider, *_) = await local_provider_adapter(
            {kind: moved.with_api_key(fleet.snapshot[kind].api_key)}
        )()
        with pytest.raises(BackendUnreachable, match="unreachable") as caught:
            await pool.client(provider, provider.backends[0]).chat(USER)
        assert dead in str(caught.value)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_redirect_is_not_followed(fleet: Fleet, pool: ClientPool, kind: str) -> None:
    # A backend answering 307 to elsewhere: following it would carry the request, and Gemini's
    # key header (which HTTP clients keep across hosts), to the redirect's target.
    visited = asyncio.Event()

    async def sink(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        visited.set()
        writer.close()

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 307 Temporary Redirect\r\nLocation: " + target.encode() + b"\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        writer.close()

    sink_server = await asyncio.start_server(sink, "127.0.0.1", 0)
    target = f"http://127.0.0.1:{sink_server.sockets[0].getsockname()[1]}/elsewhere"
    server = await asyncio.start_server(redirect, "127.0.0.1", 0)
    async with sink_server, server:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        state = fleet.snapshot[kind]
        moved = state.model_copy(
            update={"backend": state.backend.model_copy(update={"base_url": url})}
        ).with_api_key(state.api_key)
        provider = next(p for p in await local_provider_adapter({kind: moved})() if p.can_chat)
        with pytest.raises(ProtocolError, match="307"):
            await pool.client(provider, provider.backends[0]).chat(USER)
    assert not visited.is_set()


WRONG_KEYS = {
    "openai": "sk-wrong-key-9876543210",
    "gemini": "AIzaWrongKey9876543210",
    "vllm": "vllm-wrong-key-9876543210",
}


@pytest.mark.parametrize("kind", sorted(WRONG_KEYS))
async def test_a_rejected_key_is_reported_without_the_key(
    fleet: Fleet, pool: ClientPool, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = WRONG_KEYS[kind]
    if kind == "vllm":  # a vLLM server started with --api-key
        guarded = fleet.emu.add_vllm("v-key", model="m", api_key="vllm-right-key-0123456789")
        state = llm_state("v-key", "vllm", guarded.base_url, {"m": CHAT}, wrong)
    else:
        state = fleet.snapshot[kind].with_api_key(wrong)
    providers = await local_provider_adapter({kind: state})()
    provider = next(p for p in providers if p.can_chat)
    client = pool.client(provider, provider.backends[0])
    caplog.set_level(logging.DEBUG, logger="runtimestate")
    for _ in range(pool.health.config.failure_threshold):
        with pytest.raises(KeyRejected) as info:
            await client.chat(USER)
    assert "cooling down" in caplog.text  # a rejected key cools the backend down, and says so
    for text in (str(info.value), repr(info.value), repr(client), repr(provider), caplog.text):
        assert wrong not in text
        assert wrong[:-4] not in text


async def test_gemini_takes_nothing_from_the_environment(
    fleet: Fleet, pool: ClientPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_API_KEY", "AIzaFromTheEnvironment0123")
    monkeypatch.setenv("GOOGLE_GENAI_USE_VERTEXAI", "true")
    backend = fleet.backends["gemini"]
    before = len(backend.requests)
    keyless = fleet.snapshot["gemini"].with_api_key(None)
    provider = next(p for p in await local_provider_adapter({"gemini": keyless})() if p.can_chat)
    with pytest.raises(KeyRejected, match="no API key configured"):
        await pool.client(provider, provider.backends[0]).chat(USER)
    assert len(backend.requests) == before
    # With the snapshot's key, the Gemini API (not Vertex AI) is called despite the variable.
    client = await client_for(fleet, pool, "gemini")
    assert "you wrote" in (await client.chat(USER)).message.content


@pytest.mark.parametrize("kind", KINDS)
async def test_failures_cool_the_backend_down(fleet: Fleet, kind: str) -> None:
    clock = FakeClock()
    config = HealthConfig(failure_threshold=2, cooldown_seconds=60)
    async with ClientPool(clock=clock, health_config=config) as pool:
        providers = await local_provider_adapter(fleet.snapshot)(kind)
        resolver = Resolver(providers, pool=pool)
        request = ResolveRequest(models=(fleet.chat_models[kind],))
        backend = fleet.backends[kind]
        backend.faults.fail(status=500, times=2)
        for _ in range(2):
            with pytest.raises(ServerError):
                await resolver.resolve_chat(request).client.chat(USER)
        with pytest.raises(AllCoolingDown) as info:
            resolver.resolve_chat(request)
        assert (info.value.retry_at - clock.now()).total_seconds() == 60
        backend.faults.fail(status=400, times=3)
        clock.advance(60)
        for _ in range(3):  # the caller's mistakes do not cool a backend down
            with pytest.raises(BadRequest):
                await resolver.resolve_chat(request).client.chat(USER)
        result = await resolver.resolve_chat(request).client.chat(USER)
        assert "you wrote" in result.message.content
        view = pool.health.snapshot()[kind]
        assert view["coolingUntil"] is None
        assert view["inFlight"] == 0


class Relay:
    """A TCP relay to the emulator that notices when the client closes its connection."""

    def __init__(self, port: int) -> None:
        self._port = port
        self.client_closed = asyncio.Event()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._port)
        down = asyncio.create_task(self._pipe(up_reader, writer), name="relay-down")
        self._tasks.add(down)
        await self._pipe(reader, up_writer)
        self.client_closed.set()
        await down

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_calls_reuse_one_connection(fleet: Fleet, kind: str) -> None:
    emu_port = int(fleet.emu.url.rsplit(":", 1)[1])
    relay = Relay(emu_port)
    async with relay as port, ClientPool() as pool:
        state = fleet.snapshot[kind]
        url = state.backend.base_url.replace(fleet.emu.url, f"http://127.0.0.1:{port}")
        moved = state.model_copy(
            update={"backend": state.backend.model_copy(update={"base_url": url})}
        ).with_api_key(state.api_key)
        providers = await local_provider_adapter({kind: moved})()
        provider = next(p for p in providers if p.can_stream)
        for _ in range(3):  # a new ModelClient per request, as the resolver hands them out
            client = pool.client(provider, provider.backends[0])
            await client.chat(USER)
            await client.prompt("again")
            _ = [chunk async for chunk in client.stream(USER)]
        assert relay.connections == 1
        assert pool.size == 1


@pytest.mark.parametrize("how", ["aclose", "cancel"])
@pytest.mark.parametrize("kind", KINDS)
async def test_closing_a_stream_closes_its_connection(fleet: Fleet, kind: str, how: str) -> None:
    emu_port = int(fleet.emu.url.rsplit(":", 1)[1])
    relay = Relay(emu_port)
    async with relay as port, ClientPool() as pool:
        state = fleet.snapshot[kind]
        url = state.backend.base_url.replace(fleet.emu.url, f"http://127.0.0.1:{port}")
        moved = state.model_copy(
            update={"backend": state.backend.model_copy(update={"base_url": url})}
        ).with_api_key(state.api_key)
        providers = await local_provider_adapter({kind: moved})()
        provider: Provider = next(p for p in providers if p.can_stream)
        client = pool.client(provider, provider.backends[0])
        fleet.backends[kind].faults.stall_stream(after_lines=3)
        first = asyncio.Event()

        async def read() -> None:
            async with aclosing(client.stream(USER)) as chunks:
                async for _ in chunks:
                    first.set()
                    if how == "aclose":
                        return

        reader = asyncio.create_task(read(), name="stream-reader")
        await asyncio.wait_for(first.wait(), 5)
        if how == "cancel":
            assert pool.health.in_flight(provider.backends[0].id) == 1
            reader.cancel()
        if how == "cancel":
            with pytest.raises(asyncio.CancelledError):
                await reader
        else:
            await reader
        await asyncio.wait_for(relay.client_closed.wait(), 5)
        assert pool.health.in_flight(provider.backends[0].id) == 0
        fleet.backends[kind].faults.clear()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_stream_that_never_ends_is_cut_at_the_size_bound(fleet: Fleet, kind: str) -> None:
    # A stalled server keeps the connection open: only our bound can end this stream, and the
    # relay shows that ending it closes the connection.
    emu_port = int(fleet.emu.url.rsplit(":", 1)[1])
    relay = Relay(emu_port)
    async with relay as port, ClientPool(max_stream_chars=3) as pool:
        state = fleet.snapshot[kind]
        url = state.backend.base_url.replace(fleet.emu.url, f"http://127.0.0.1:{port}")
        moved = state.model_copy(
            update={"backend": state.backend.model_copy(update={"base_url": url})}
        ).with_api_key(state.api_key)
        providers = await local_provider_adapter({kind: moved})()
        provider = next(p for p in providers if p.can_stream)
        client = pool.client(provider, provider.backends[0])
        fleet.backends[kind].faults.stall_stream(after_lines=3)
        received: list[str] = []

        async def read() -> None:
            async for chunk in client.stream(USER):
                received.append(chunk)

        with pytest.raises(ProtocolError, match="stream exceeded 3 characters") as info:
            await read()
        assert sum(map(len, received)) <= 3
        assert info.value.backend == url
        await asyncio.wait_for(relay.client_closed.wait(), 5)
        assert pool.health.in_flight(provider.backends[0].id) == 0
        fleet.backends[kind].faults.clear()
    with pytest.raises(InvalidInput, match="max_stream_chars"):
        ClientPool(max_stream_chars=0)


@pytest.mark.parametrize("kind", KINDS)
async def test_an_oversized_answer_is_a_protocol_error(fleet: Fleet, kind: str) -> None:
    backend = fleet.backends[kind]
    embed_backend = fleet.backends["vllm-embed" if kind == "vllm" else kind]
    async with ClientPool(max_body_bytes=64 * 1024) as pool:
        client = await client_for(fleet, pool, kind)
        embed = await client_for(fleet, pool, kind, embed=True)
        backend.faults.oversized(size=4 * 1024 * 1024, times=1)
        with pytest.raises(ProtocolError, match="larger than 65536 bytes") as info:
            await client.chat(USER)
        assert info.value.backend == client.backend.base_url
        embed_backend.faults.oversized(size=4 * 1024 * 1024, times=1)
        with pytest.raises(ProtocolError, match="larger than 65536 bytes"):
            await embed.embed("alpha")
        # Answers under the bound, streams included, are untouched.
        assert "you wrote" in (await client.chat(USER)).message.content
        assert "you wrote" in "".join([c async for c in client.stream(USER)])
    with pytest.raises(InvalidInput, match="max_body_bytes"):
        ClientPool(max_body_bytes=0)


@pytest.mark.parametrize("module", [httpx, httpx2], ids=["httpx", "httpx2"])
async def test_the_body_bound_also_counts_bodies_of_unannounced_length(
    module: ModuleType,
) -> None:
    sent: list[int] = []

    async def body(size: int) -> AsyncIterator[bytes]:
        for _ in range(size // 1024):
            sent.append(1024)
            yield b"x" * 1024

    def handler(request: Any) -> Any:
        size = int(request.url.params["size"])
        kind = request.url.params.get("type", "application/json")
        return module.Response(200, headers={"content-type": kind}, content=body(size))

    transport = bounded_transport(module, 4096, inner=module.MockTransport(handler))
    async with module.AsyncClient(transport=transport, base_url="http://h") as http:
        assert len((await http.get("/", params={"size": 4096})).content) == 4096
        sent.clear()
        with pytest.raises(ResponseTooLarge, match="larger than 4096 bytes"):
            await http.get("/", params={"size": 1024 * 1024})
        assert sum(sent) == 5 * 1024  # reading stopped at the first chunk past the bound
        streamed = await http.get("/", params={"size": 8192, "type": "text/event-stream"})
        assert len(streamed.content) == 8192  # streams are bounded by characters instead


async def test_snapshot_to_streamed_chat_answer(fleet: Fleet) -> None:
    # The README example: from a snapshot to a streamed chat answer.
    providers = await local_provider_adapter(fleet.snapshot)("ollama", "vllm")
    async with ClientPool() as pool:
        resolver = Resolver(providers, pool=pool)
        chosen = resolver.resolve_stream(ResolveRequest(models=("llama3.1", "llama3.2")))
        answer = "".join(
            [chunk async for chunk in chosen.client.stream([{"role": "user", "content": "hi"}])]
        )
    assert chosen.backend_id == "vllm"
    assert "you wrote hi" in answer


@pytest.mark.parametrize("kind", KINDS)
async def test_a_streams_latency_is_the_time_to_its_first_chunk(fleet: Fleet, kind: str) -> None:
    clock = FakeClock()
    async with ClientPool(clock=clock) as pool:
        client = await client_for(fleet, pool, kind)
        chunks = 0
        async for _ in client.stream(USER):
            chunks += 1
            clock.advance(10)  # a long answer, slowly streamed after a prompt first chunk
        assert chunks > 1
        view = pool.health.snapshot()[client.backend.id]
        assert view["latencySeconds"] == 0.0  # measured, and not the stream's 10 s per chunk
        assert view["inFlight"] == 0


async def test_clients_feed_the_latency_average_that_lowest_latency_reads() -> None:
    # The emulator's latency and the clients' measurements run on one FakeClock: the slow
    # node's answer takes exactly 0.05 s of it, the fast node's none.
    clock = FakeClock()
    async with Emulator(clock=clock) as emu, ClientPool(clock=clock) as pool:
        slow = emu.add_ollama("slow", models=["llama3.2:1b"])
        fast = emu.add_ollama("fast", models=["llama3.2:1b"])
        slow.faults.latency = 0.05
        snapshot = {
            name: llm_state(name, "ollama", node.base_url, {"llama3.2:1b": CHAT}, None)
            for name, node in (("slow", slow), ("fast", fast))
        }
        resolver = Resolver(await local_provider_adapter(snapshot)(), pool=pool)
        request = ResolveRequest(models=("llama3.2:1b",), policy="lowest-latency")
        picks = []
        for _ in range(6):
            chosen = resolver.resolve_chat(request)
            picks.append(chosen.backend_id)
            call = asyncio.create_task(chosen.client.chat(USER))
            if chosen.backend_id == "slow":
                # Parked in its latency, next to the call's own deadline.
                await eventually(
                    lambda: slow.active == 1 and clock.sleepers == 2, what="the slow answer"
                )
                clock.advance(0.05)
            await call
    assert set(picks[:2]) == {"slow", "fast"}  # unmeasured backends are tried first
    assert picks[2:] == ["fast"] * 4
    assert pool.health.latency("slow") == pytest.approx(0.05)
    assert pool.health.latency("fast") == 0.0


# Every error status the emulated servers can send, with their own error bodies: what both HTTP
# stacks (the drivers' aiohttp session, each kind's SDK client) must read the same way.
ERROR_STATUSES = (400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 501, 502, 503, 504)


@pytest.mark.parametrize("kind", kinds.names())
async def test_both_http_stacks_classify_every_status_alike(
    fleet: Fleet, pool: ClientPool, kind: str
) -> None:
    backend = fleet.backends[kind]
    client = await client_for(fleet, pool, kind)
    http = HttpClient(timeout=5.0)
    seen: dict[int, tuple[type[BackendError], type[BackendError]]] = {}
    try:
        for status in ERROR_STATUSES:
            backend.faults.clear()
            backend.faults.fail(status=status)
            with pytest.raises(BackendError) as by_driver:
                await http.request_bytes("GET", backend.base_url + "/anything")
            with pytest.raises(BackendError) as by_client:
                await client.chat(USER)
            seen[status] = (type(by_driver.value), type(by_client.value))
    finally:
        backend.faults.clear()
        await http.aclose()
    expected = {status: (status_error_class(status),) * 2 for status in ERROR_STATUSES}
    assert seen == expected
    assert seen[403] == (KeyRejected, KeyRejected)


def test_the_status_table_says_what_to_do() -> None:
    assert [status_error_class(s) for s in (301, 307)] == [ProtocolError, ProtocolError]
    assert [status_error_class(s) for s in (401, 403)] == [KeyRejected, KeyRejected]
    assert status_error_class(429) is RateLimited
    assert [status_error_class(s) for s in (400, 404, 413, 422)] == [BadRequest] * 4
    assert [status_error_class(s) for s in (500, 502, 503, 504, 600)] == [ServerError] * 5


async def test_an_openai_compatible_backend_is_called_with_its_own_key(
    fleet: Fleet, pool: ClientPool
) -> None:
    client = await client_for(fleet, pool, "openai-compatible")
    result = await client.chat(USER)
    assert "qwen2.5-7b says" in result.message.content
    chunks = [chunk async for chunk in client.stream(USER)]
    assert "".join(chunks) == result.message.content
    server = fleet.backends["openai-compatible"]
    assert [r.headers.get("Authorization") for r in server.requests] == [
        f"Bearer {COMPATIBLE_KEY}"
    ] * 2
