"""The OpenAI-protocol client against the behaviours of real OpenAI-compatible servers that are
not vLLM, each reproduced by a switchable emulator mode: per-token embeddings, a 200 stream that
closes without its terminator, ``: ping`` comments in SSE, a pooled connection closed before any
answer, the context limit enforced with the real 400, and connection errors that must name their
cause. The emulator's request log is the ground truth for what was sent."""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from runtimestate.errors import BackendUnreachable, BadRequest, InvalidInput, ProtocolError
from runtimestate.providers import BackendRef, Capability, ClientPool, ModelClient, Provider
from runtimestate.testing import Emulator
from runtimestate.testing.compatible import CompatibleServer

MODEL = "qwen2.5-7b"


@dataclass
class Server:
    emu: Emulator
    server: CompatibleServer
    pool: ClientPool

    def client(self, base_url: str | None = None) -> ModelClient:
        backend = BackendRef(
            id="lm",
            name="lm",
            base_url=base_url or self.server.base_url,
            type="openai-compatible",
        )
        provider = Provider(
            type="openai-compatible",
            model=MODEL,
            context_length=4096,
            capabilities=frozenset(Capability),
            backends=(backend,),
        )
        return self.pool.client(provider, backend)

    def posts(self, path: str) -> int:
        return sum(1 for r in self.server.requests if r.path.endswith(path))


@pytest.fixture
async def lm() -> AsyncIterator[Server]:
    async with Emulator() as emu, ClientPool(timeout=10, stream_idle_timeout=10) as pool:
        yield Server(emu=emu, server=emu.add_openai_compatible("lm", models=[MODEL]), pool=pool)


async def _collect(client: ModelClient) -> str:
    return "".join([c async for c in client.stream([{"role": "user", "content": "go on"}])])


async def test_per_token_embeddings_are_a_protocol_error(lm: Server) -> None:
    client = lm.client()
    assert [len(v) for v in await client.embed(["one two", "three"])] == [1536, 1536]
    lm.server.per_token_embeddings = True
    with pytest.raises(ProtocolError, match="per-token"):
        await client.embed(["one two", "three"])


async def test_a_stream_without_finish_reason_or_done_is_an_error(lm: Server) -> None:
    client = lm.client()
    lm.server.faults.end_stream(after_lines=0, times=1)  # a 200 that closes without events
    with pytest.raises(ProtocolError, match="without a finish_reason"):
        await _collect(client)
    lm.server.faults.end_stream(after_lines=3, times=1)  # some text, then nothing
    with pytest.raises(ProtocolError, match="without a finish_reason"):
        await _collect(client)
    assert (await _collect(client)).endswith("you wrote go on")


async def test_ping_comments_in_sse_are_ignored(lm: Server) -> None:
    lm.server.sse_pings = True
    assert (await _collect(lm.client())).endswith("you wrote go on")


async def test_a_pooled_connection_closed_before_any_answer_is_retried_once(lm: Server) -> None:
    client = lm.client()
    lm.server.faults.drop(times=1, path="/v1/chat/completions")
    answer = await client.chat([{"role": "user", "content": "again"}])
    assert answer.message.content.endswith("you wrote again")
    assert lm.posts("/chat/completions") == 2  # the dropped request and its one repeat
    assert lm.pool.health.snapshot()["lm"]["consecutiveFailures"] == 0
    lm.server.faults.drop(times=2, path="/v1/chat/completions")
    with pytest.raises(BackendUnreachable, match="closed the connection"):
        await client.chat([{"role": "user", "content": "again"}])
    assert lm.posts("/chat/completions") == 4  # once more, never twice


async def test_the_context_limit_is_the_callers_400_not_a_backend_failure(lm: Server) -> None:
    lm.server.context_limit = 3
    with pytest.raises(BadRequest, match="maximum context length is 3 tokens"):
        await lm.client().chat([{"role": "user", "content": "far too many words here"}])
    assert lm.pool.health.snapshot()["lm"]["consecutiveFailures"] == 0


async def test_connection_errors_name_their_cause_and_the_backend(lm: Server) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(BackendUnreachable, match="connection refused") as refused:
        await lm.client(closed).chat([{"role": "user", "content": "x"}])
    assert closed in str(refused.value)
    lm.server.faults.break_stream(after_lines=2)
    with pytest.raises(BackendUnreachable, match=r"closed the connection|broke") as broken:
        await _collect(lm.client())
    assert lm.server.base_url in str(broken.value)
    assert "Connection error." not in str(broken.value)


@pytest.mark.parametrize("kind", ["ollama", "openai-compatible", "gemini"])
async def test_chat_passes_generation_parameters_and_says_why_it_ended(kind: str) -> None:
    async with Emulator() as emu, ClientPool(timeout=10) as pool:
        if kind == "ollama":
            server: Any = emu.add_ollama("n", models=["llama3"])
            model, key, sent = "llama3:latest", None, "/api/chat"
        elif kind == "gemini":
            server = emu.add_gemini("g", api_key="AIzaTest0123456789", models=["gemini-2.0-flash"])
            model, key, sent = "models/gemini-2.0-flash", "AIzaTest0123456789", "generateContent"
        else:
            server = emu.add_openai_compatible("lm", models=[MODEL])
            model, key, sent = MODEL, None, "/chat/completions"
        backend = BackendRef(id="b", name="b", base_url=server.base_url, type=kind, api_key=key)
        provider = Provider(
            type=kind,
            model=model,
            context_length=4096,
            capabilities=frozenset(Capability),
            backends=(backend,),
        )
        client = pool.client(provider, backend)
        full = await client.chat([{"role": "user", "content": "tell me more"}])
        assert full.finish_reason == "stop"
        cut = await client.chat(
            [{"role": "user", "content": "tell me more"}],
            max_tokens=2,
            temperature=0.5,
            top_p=0.9,
            stop=["END"],
            seed=3,
        )
        assert cut.finish_reason == "length"
        assert len(cut.message.content.split()) == 2
        body = next(r.json for r in reversed(server.requests) if r.path.endswith(sent))
        text = json.dumps(body)
        for value in ("0.5", "0.9", "END", "3"):
            assert value in text, value
        with pytest.raises(InvalidInput):
            await client.chat([{"role": "user", "content": "x"}], max_tokens=0)
