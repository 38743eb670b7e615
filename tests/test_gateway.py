"""The gateway through the official ``openai`` and ``ollama`` SDKs, against the real service.

One service per module (in-process, on a real socket, SQLite store) in front of an emulated
fleet of every type the gateway serves: two Ollama nodes holding the same chat model, a vLLM
server, an OpenAI account, a Gemini account (reached through its OpenAI-compatible API), and a
second Gemini account at a host the Gemini key may not go to. Faults are armed at the emulator
and the ground truth - which backend got a request, whether a request is still open there, who
received which key - is read at the emulator, never from the gateway's own account of itself.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import ollama
import openai
import pytest
import pytest_asyncio
from typer.testing import CliRunner

from runtimestate.cli.app import app as cli_app
from runtimestate.gateway.completions import ChunkRewriter
from runtimestate.kinds.gemini import GEMINI_KEY
from runtimestate.kinds.openai import OPENAI_KEY
from runtimestate.service import Service
from runtimestate.settings import Settings
from runtimestate.store import Store
from runtimestate.testing import (
    Emulator,
    GeminiAccount,
    GeminiModel,
    OllamaNode,
    OpenAIAccount,
    VLLMServer,
)
from runtimestate.testing.base import EmulatedBackend
from tests.fixtures.common import EMULATOR_KEY_HOSTS
from tests.fixtures.polling import eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "gateway-admin-token-0123456789"
OPENAI_SECRET = "sk-gateway-test-0123456789abcdef"
CHAT = "llama3"
EMBED = "nomic-embed-text"
VLLM = "meta-llama/Llama-3.1-8B-Instruct"
GPT = "gpt-4o-mini"
GPT_EMBED = "text-embedding-3-small"
GEMINI_SECRET = "AIzaGatewayTest0123456789abcdef"
GEMINI = "gemini-2.0-flash"
GEMINI_EMBED = "text-embedding-004"
PULLING = "phi3:mini"
BODY_LIMIT = 64 * 1024


@dataclass
class Fleet:
    emu: Emulator
    node_a: OllamaNode
    node_b: OllamaNode
    vllm: VLLMServer
    account: OpenAIAccount
    gemini: GeminiAccount
    elsewhere: GeminiAccount  # at a host the Gemini key may not go to
    url: str
    admin: httpx.AsyncClient
    key: str
    clients: list[Any]

    @property
    def backends(self) -> tuple[EmulatedBackend, ...]:
        return (self.node_a, self.node_b, self.vllm, self.account, self.gemini, self.elsewhere)

    def named(self, name: str) -> EmulatedBackend:
        """The emulated backend a gateway answer names in ``X-Runtimestate-Backend``."""
        return next(b for b in self.backends if b.name == name)

    def openai(self, key: str | None = None, **headers: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=self.url + "/v1",
            api_key=self.key if key is None else key,
            max_retries=0,
            default_headers=headers or None,
        )
        self.clients.append(client)
        return client

    def ollama(self, key: str | None = None) -> ollama.AsyncClient:
        secret = self.key if key is None else key
        headers = {"Authorization": f"Bearer {secret}"} if secret else {}
        client = ollama.AsyncClient(host=self.url, headers=headers)
        self.clients.append(client._client)
        return client

    async def make_key(self, name: str, **scope: list[str]) -> str:
        response = await self.admin.post("/gateway/keys", json={"name": name, **scope})
        assert response.status_code == 201, response.text
        key: str = response.json()["key"]
        return key


def _declare(
    a: OllamaNode,
    b: OllamaNode,
    vllm: VLLMServer,
    account: OpenAIAccount,
    gemini: GeminiAccount,
    elsewhere: GeminiAccount,
) -> Callable[[Store], Awaitable[None]]:
    async def on_startup(store: Store) -> None:
        await store.create_backend(name="node-a", base_url=a.base_url, type="ollama")
        node_b = await store.create_backend(name="node-b", base_url=b.base_url, type="ollama")
        await store.create_backend(name="vllm-1", base_url=vllm.base_url, type="vllm")
        await store.create_backend(name="acct", base_url=account.base_url, type="openai")
        await store.set_kv(OPENAI_KEY, {"APIKey": OPENAI_SECRET, "Type": "openai"})
        await store.create_backend(name="gem", base_url=gemini.base_url, type="gemini")
        # The same emulator under another name for its host: not one the Gemini key may go to.
        await store.create_backend(
            name="gem-elsewhere",
            base_url=elsewhere.base_url.replace("//127.0.0.1:", "//localhost:"),
            type="gemini",
        )
        await store.set_kv(GEMINI_KEY, {"APIKey": GEMINI_SECRET, "Type": "gemini"})
        for model, embeds in (
            (CHAT, False),
            (EMBED, True),
            (VLLM, False),
            (GPT, False),
            (GPT_EMBED, True),
            (GEMINI, False),
            (GEMINI_EMBED, True),
            (PULLING, False),
        ):
            await store.append_model(
                model=model,
                context_length=8192,
                can_chat=not embeds,
                can_prompt=not embeds,
                can_stream=not embeds,
                can_embed=embeds,
            )
        pool = await store.create_pool(name="pool-b", purpose_type="general")
        await store.assign_backend_to_pool(pool_id=pool.id, backend_id=node_b.id)

    return on_startup


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Fleet]:
    async with Emulator() as emu:
        a = emu.add_ollama("node-a", models=[CHAT, EMBED], pull_seconds=3600)
        b = emu.add_ollama("node-b", models=[CHAT], pull_seconds=3600)
        vllm = emu.add_vllm("vllm-1", model=VLLM)
        account = emu.add_openai("acct", api_key=OPENAI_SECRET, models=[GPT, GPT_EMBED])
        gemini_models = [
            GeminiModel(name=GEMINI, methods=("generateContent", "countTokens")),
            GeminiModel(name=GEMINI_EMBED, methods=("embedContent",)),
        ]
        gemini = emu.add_gemini("gem", api_key=GEMINI_SECRET, models=gemini_models)
        elsewhere = emu.add_gemini("gem-elsewhere", api_key=GEMINI_SECRET, models=gemini_models)
        settings = Settings(
            data_dir=tmp_path_factory.mktemp("gateway"),
            port=0,
            token=TOKEN,
            cycle_interval=3600,
            delete_undeclared=False,
            gateway_max_body_bytes=BODY_LIMIT,
            gateway_backend_concurrency=2,
            gateway_refresh_interval=3600,
            # The cloud keys may go to the emulator's host (127.0.0.1), and nowhere else.
            cloud_key_hosts=EMULATOR_KEY_HOSTS,
        )
        service = Service(settings, on_startup=_declare(a, b, vllm, account, gemini, elsewhere))
        task = asyncio.create_task(service.run())
        url = await service.wait_started()
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        ) as admin:
            assert (await admin.post("/state/sync")).status_code == 200
            created = await admin.post("/gateway/keys", json={"name": "everything"})
            fleet = Fleet(
                emu=emu,
                node_a=a,
                node_b=b,
                vllm=vllm,
                account=account,
                gemini=gemini,
                elsewhere=elsewhere,
                url=url,
                admin=admin,
                key=created.json()["key"],
                clients=[],
            )
            yield fleet
        service.stop()
        async with asyncio.timeout(20):
            await task


@pytest_asyncio.fixture(autouse=True, loop_scope="module")
async def _clean(fleet: Fleet) -> AsyncIterator[None]:
    yield
    for backend in fleet.backends:
        backend.faults.clear()
    clients, fleet.clients = fleet.clients, []
    for client in clients:
        await (client.close() if isinstance(client, openai.AsyncOpenAI) else client.aclose())


def _chat_posts(backend: EmulatedBackend) -> int:
    return sum(1 for r in backend.requests if r.path.endswith("/chat/completions"))


# -- listings --------------------------------------------------------------------------------------


async def test_listings_show_each_served_model_once(fleet: Fleet) -> None:
    models = [m.id for m in (await fleet.openai().models.list()).data]
    # llama3 is on two nodes and listed once; the model being pulled is not listed.
    served = ["llama3:latest", "nomic-embed-text:latest", VLLM, GPT, GPT_EMBED]
    served += [f"models/{GEMINI}", f"models/{GEMINI_EMBED}"]
    assert sorted(models) == sorted(served)
    tags = await fleet.ollama().list()
    assert sorted(m.model or "" for m in tags.models) == sorted(models)
    await fleet.ollama().generate(model=CHAT, prompt="load it")
    # What the nodes say they have loaded, from both nodes, the model's name as they spell it.
    assert "llama3:latest" in [m.model for m in (await fleet.ollama().ps()).models]


# -- OpenAI routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CHAT, VLLM, GPT, GEMINI])
async def test_chat_keeps_openai_shapes_and_passes_fields_through(fleet: Fleet, model: str) -> None:
    client = fleet.openai()
    answer = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello gateway"}]
    )
    assert answer.choices[0].message.content is not None
    assert answer.choices[0].message.content.endswith("says: you wrote hello gateway")
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 6
    tools: Any = [
        {
            "type": "function",
            "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
        }
    ]
    raw = await client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "hello gateway"}],
        max_tokens=2,
        temperature=0.25,
        top_p=0.5,
        seed=7,
        stop=["END"],
        user="someone",
        tools=tools,
        tool_choice="auto",
        response_format={"type": "json_object"},
    )
    assert raw.parse().choices[0].finish_reason == "length"
    body = fleet.named(raw.headers["x-runtimestate-backend"]).requests[-1].json
    for field, value in {
        "max_tokens": 2,
        "temperature": 0.25,
        "top_p": 0.5,
        "stop": ["END"],
        "user": "someone",
        "tools": tools,
        "tool_choice": "auto",
        "response_format": {"type": "json_object"},
    }.items():
        assert body[field] == value, field


@pytest.mark.parametrize("model", [CHAT, VLLM, GPT, GEMINI])
async def test_streamed_chat_arrives_chunk_by_chunk_with_usage(fleet: Fleet, model: str) -> None:
    stream = await fleet.openai().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "stream this"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.endswith("says: you wrote stream this")
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert len(chunks) >= 6


async def test_completions_and_embeddings(fleet: Fleet) -> None:
    client = fleet.openai()
    for model in (CHAT, VLLM):
        done = await client.completions.create(model=model, prompt="complete me")
        assert done.choices[0].text.endswith("you wrote complete me")
        assert done.choices[0].finish_reason == "stop"
    for model, size in ((EMBED, 768), (GPT_EMBED, 1536), (GEMINI_EMBED, 768)):
        vectors = await client.embeddings.create(model=model, input=["one", "two"])
        assert [len(d.embedding) for d in vectors.data] == [size, size]
        assert vectors.usage.prompt_tokens == 2


def _carrying(backend: EmulatedBackend, secret: str) -> list[str]:
    """The paths of the requests ``backend`` received with ``secret`` in a header or the query."""
    return [
        r.path
        for r in backend.requests
        if secret in " ".join([*r.headers.values(), *r.query.values()])
    ]


async def test_gemini_is_served_through_its_openai_api_and_its_key_goes_only_there(
    fleet: Fleet,
) -> None:
    client = fleet.openai()
    before = len(fleet.gemini.requests)
    raw = await client.chat.completions.with_raw_response.create(
        model=GEMINI, messages=[{"role": "user", "content": "hello gemini"}]
    )
    assert raw.headers["x-runtimestate-backend"] == "gem"
    assert (raw.parse().choices[0].message.content or "").endswith("you wrote hello gemini")
    stream = await client.chat.completions.create(
        model=f"models/{GEMINI}",
        messages=[{"role": "user", "content": "stream gemini"}],
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.endswith("you wrote stream gemini")
    vectors = await client.embeddings.create(model=GEMINI_EMBED, input="embed gemini")
    assert [len(d.embedding) for d in vectors.data] == [768]
    # Legacy completions, which Gemini's OpenAI API lacks, go to it as chat completions.
    done = await client.completions.create(model=GEMINI, prompt="complete gemini", max_tokens=50)
    assert done.object == "text_completion"
    assert done.choices[0].text.endswith("you wrote complete gemini")
    assert done.choices[0].finish_reason == "stop"
    parts = await client.completions.create(model=GEMINI, prompt="stream it", stream=True)
    pieces = [c async for c in parts]
    assert "".join(c.choices[0].text for c in pieces if c.choices).endswith("you wrote stream it")
    assert {c.object for c in pieces} == {"text_completion"}
    # Ground truth at the emulator: the requests reached Gemini's OpenAI-compatible API, the
    # model named without "models/", the key as a bearer token.
    sent = fleet.gemini.requests[before:]
    assert [r.path for r in sent] == [
        "/v1beta/openai/chat/completions",
        "/v1beta/openai/chat/completions",
        "/v1beta/openai/embeddings",
        "/v1beta/openai/chat/completions",
        "/v1beta/openai/chat/completions",
    ]
    assert [r.json["model"] for r in sent] == [GEMINI, GEMINI, GEMINI_EMBED, GEMINI, GEMINI]
    assert sent[3].json["max_tokens"] == 50
    assert sent[3].json["messages"] == [{"role": "user", "content": "complete gemini"}]
    assert all(r.headers.get("Authorization") == f"Bearer {GEMINI_SECRET}" for r in sent)
    # The Gemini key reached the Gemini account on its allowed host, and no other backend: not
    # the other types, not the same emulator declared under a host the key may not go to (that
    # backend is in error instead, and serves nothing).
    assert _carrying(fleet.gemini, GEMINI_SECRET)
    for backend in fleet.backends:
        if backend is not fleet.gemini:
            assert _carrying(backend, GEMINI_SECRET) == [], backend.name
    states = {s["name"]: s for s in (await fleet.admin.get("/state")).json()}
    assert "credential of its own" in states["gem-elsewhere"]["error"]
    assert GEMINI_SECRET not in json.dumps(states)


async def test_a_chat_chunk_split_across_two_bodies_is_rewritten_whole() -> None:
    sent: list[bytes] = []

    async def collect(message: Any) -> None:
        sent.append(message["body"])

    rewrite = ChunkRewriter(collect)
    chunk = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "hi"}}],
    }
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"
    for body, more in (
        (b": ping\n\n" + event[:20], True),
        (event[20:], True),
        (b"data: [DONE]", False),
    ):
        await rewrite({"type": "http.response.body", "body": body, "more_body": more})
    out = b"".join(sent)
    assert out.startswith(b": ping\n\ndata: {")
    assert out.endswith(b"\n\ndata: [DONE]")
    rewritten = json.loads(out.split(b"\n\n")[1].removeprefix(b"data: "))
    assert rewritten["object"] == "text_completion"
    assert rewritten["choices"] == [
        {"index": 0, "text": "hi", "logprobs": None, "finish_reason": None}
    ]


# -- Ollama routes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [CHAT, VLLM, GPT, GEMINI])
async def test_ollama_sdk_on_every_type(fleet: Fleet, model: str) -> None:
    client = fleet.ollama()
    answer = await client.chat(
        model=model, messages=[{"role": "user", "content": "hi"}], options={"num_predict": 50}
    )
    assert (answer.message.content or "").endswith("you wrote hi")
    assert answer.done
    assert answer.done_reason == "stop"
    assert answer.eval_count == 5
    hi = [{"role": "user", "content": "hi"}]
    stream = await client.chat(model=model, messages=hi, stream=True)
    parts = [p async for p in stream]
    assert "".join(p.message.content or "" for p in parts).endswith("you wrote hi")
    assert parts[-1].done
    generated = await client.generate(model=model, prompt="why", system="be brief")
    assert (generated.response or "").endswith("you wrote why")
    assert "completion" in ((await client.show(model)).capabilities or [])


async def test_ollama_embed_native_and_translated(fleet: Fleet) -> None:
    client = fleet.ollama()
    native = await client.embed(model=EMBED, input=["a", "b"])
    assert [len(v) for v in native.embeddings] == [768, 768]
    translated = await client.embed(model=GPT_EMBED, input="a")
    assert [len(v) for v in translated.embeddings] == [1536]
    async with httpx.AsyncClient(base_url=fleet.url) as bare:
        version = await bare.get("/api/version", headers={"Authorization": f"Bearer {fleet.key}"})
    assert version.json()["version"]


# -- failures before and after the first byte ------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
async def test_a_backend_failing_before_the_first_byte_is_retried_on_another(
    fleet: Fleet, status: int
) -> None:
    fleet.node_a.faults.fail(status=status, path="/v1/chat/completions")
    before_a, before_b = _chat_posts(fleet.node_a), _chat_posts(fleet.node_b)
    client = fleet.openai(**{"X-Runtimestate-Policy": "round-robin"})
    served = []
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "retry me"}]
        )
        assert raw.parse().choices[0].finish_reason == "stop"
        served.append(raw.headers["x-runtimestate-backend"])
    assert served == ["node-b", "node-b"]
    # Ground truth at the emulator: node-a was tried (and failed) once, node-b answered twice.
    assert _chat_posts(fleet.node_a) - before_a == 1
    assert _chat_posts(fleet.node_b) - before_b == 2
    # One success on node-a resets its failure count, so the next case does not cool it down.
    fleet.node_a.faults.clear()
    for _ in range(2):
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "recover"}]
        )
    assert _chat_posts(fleet.node_a) - before_a == 2


async def test_a_stream_that_breaks_after_its_first_byte_is_not_retried(fleet: Fleet) -> None:
    for node in (fleet.node_a, fleet.node_b):
        node.faults.break_stream(after_lines=2, path="/v1/chat/completions")
    before = _chat_posts(fleet.node_a) + _chat_posts(fleet.node_b)
    stream = await fleet.openai().chat.completions.create(
        model=CHAT, messages=[{"role": "user", "content": "break"}], stream=True
    )
    received = []

    async def read() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError, match="broke off"):
        await read()
    assert len(received) == 2
    assert _chat_posts(fleet.node_a) + _chat_posts(fleet.node_b) - before == 1


async def test_a_stream_that_ends_without_its_terminator_is_an_error(fleet: Fleet) -> None:
    fleet.vllm.faults.end_stream(after_lines=2)
    stream = await fleet.openai().chat.completions.create(
        model=VLLM, messages=[{"role": "user", "content": "short"}], stream=True
    )
    with pytest.raises(openai.APIError, match="without its terminator"):
        async for _ in stream:
            pass
    for node in (fleet.node_a, fleet.node_b):
        node.faults.end_stream(after_lines=1, path="/api/chat")
    with pytest.raises(ollama.ResponseError, match="without its terminator"):
        async for _ in await fleet.ollama().chat(
            model=CHAT, messages=[{"role": "user", "content": "short"}], stream=True
        ):
            pass


async def test_a_client_that_disconnects_closes_the_backend_request(fleet: Fleet) -> None:
    for node in (fleet.node_a, fleet.node_b):
        node.faults.stall_stream(after_lines=2, path="/v1/chat/completions")
    body = {"model": CHAT, "messages": [{"role": "user", "content": "hang"}], "stream": True}
    # A pull may be open on a node all along (the declared model being pulled).
    base = fleet.node_a.active + fleet.node_b.active
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream(
            "POST",
            fleet.url + "/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {fleet.key}"},
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        await eventually(
            lambda: fleet.node_a.active + fleet.node_b.active == base + 1, what="the stream is open"
        )
    # The client is gone; the backend's request must end without the stall being released.
    await eventually(
        lambda: fleet.node_a.active + fleet.node_b.active == base, what="the backend request closed"
    )


# -- models that are not there ---------------------------------------------------------------------


async def test_a_declared_model_being_pulled_is_503_with_retry_after(fleet: Fleet) -> None:
    client = fleet.openai()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model=PULLING, messages=[{"role": "user", "content": "soon?"}]
        )
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) >= 1
    assert "node-a" in caught.value.message
    assert "node-b" in caught.value.message
    assert caught.value.code == "model_not_ready"


async def test_an_unknown_model_is_404_naming_the_closest(fleet: Fleet) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await fleet.openai().chat.completions.create(
            model="llama4", messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.code == "model_not_found"
    assert "llama3:latest" in caught.value.message


# -- keys ------------------------------------------------------------------------------------------


async def test_requests_without_a_valid_key_are_401(fleet: Fleet) -> None:
    async with httpx.AsyncClient(base_url=fleet.url) as bare:
        missing = await bare.post("/v1/chat/completions", json={"model": CHAT})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"  # the OpenAI error shape
    with pytest.raises(openai.AuthenticationError):
        await fleet.openai(key="rsk-not-a-key").models.list()
    with pytest.raises(ollama.ResponseError) as caught:
        await fleet.ollama(key="").list()
    assert caught.value.status_code == 401
    # The admin token is not a gateway key.
    with pytest.raises(openai.AuthenticationError):
        await fleet.openai(key=TOKEN).models.list()
    temporary = await fleet.make_key("temporary")
    assert (await fleet.openai(key=temporary).models.list()).data
    assert (await fleet.admin.delete("/gateway/keys/temporary")).status_code == 204
    with pytest.raises(openai.AuthenticationError):
        await fleet.openai(key=temporary).models.list()


async def test_a_key_limited_to_models_sees_and_uses_only_those(fleet: Fleet) -> None:
    key = await fleet.make_key("gpt-only", models=[GPT])
    client = fleet.openai(key=key)
    assert [m.id for m in (await client.models.list()).data] == [GPT]
    messages: Any = [{"role": "user", "content": "x"}]
    assert (await client.chat.completions.create(model=GPT, messages=messages)).choices
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model=CHAT, messages=messages)


async def test_a_key_limited_to_a_pool_routes_only_inside_it(fleet: Fleet) -> None:
    key = await fleet.make_key("pool-b-only", pools=["pool-b"])
    client = fleet.openai(key=key)
    assert [m.id for m in (await client.models.list()).data] == ["llama3:latest"]
    before_a = _chat_posts(fleet.node_a)
    for _ in range(4):
        raw = await client.chat.completions.with_raw_response.create(
            model=CHAT, messages=[{"role": "user", "content": "pool"}]
        )
        assert raw.headers["x-runtimestate-backend"] == "node-b"
    assert _chat_posts(fleet.node_a) == before_a
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model=GPT, messages=[{"role": "user", "content": "x"}])
    header = fleet.openai(**{"X-Runtimestate-Pool": "pool-b"})
    raw = await header.chat.completions.with_raw_response.create(
        model=CHAT, messages=[{"role": "user", "content": "pool"}]
    )
    assert raw.headers["x-runtimestate-backend"] == "node-b"


async def test_key_commands_print_once_list_and_remove(fleet: Fleet) -> None:
    runner = CliRunner()
    env = {"RUNTIMESTATE_URL": fleet.url, "RUNTIMESTATE_TOKEN": TOKEN}

    def run(*args: str) -> Any:
        return runner.invoke(cli_app, list(args), env=env)

    added = await asyncio.to_thread(run, "key", "add", "cli-key", "--model", GPT, "--quiet")
    assert added.exit_code == 0, added.output
    secret = added.output.strip()
    assert secret.startswith("rsk-")
    assert [m.id for m in (await fleet.openai(key=secret).models.list()).data] == [GPT]
    listed = await asyncio.to_thread(run, "key", "list", "--json")
    entry = next(k for k in json.loads(listed.output) if k["name"] == "cli-key")
    assert entry["models"] == [GPT]
    assert secret not in listed.output
    assert (await asyncio.to_thread(run, "key", "rm", "cli-key")).exit_code == 0
    with pytest.raises(openai.AuthenticationError):
        await fleet.openai(key=secret).models.list()


# -- bounds and metrics ----------------------------------------------------------------------------


async def test_a_body_over_the_limit_is_413(fleet: Fleet) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        await fleet.openai().chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "x" * BODY_LIMIT}]
        )
    assert caught.value.status_code == 413


async def test_beyond_the_concurrency_cap_the_next_backend_then_429(fleet: Fleet) -> None:
    for node in (fleet.node_a, fleet.node_b):
        node.faults.hang(path="/v1/chat/completions")
    body = {"model": CHAT, "messages": [{"role": "user", "content": "wait"}]}
    base_a, base_b = fleet.node_a.active, fleet.node_b.active
    headers = {"Authorization": f"Bearer {fleet.key}"}
    async with httpx.AsyncClient(base_url=fleet.url, headers=headers, timeout=30) as client:
        waiting = [
            asyncio.create_task(client.post("/v1/chat/completions", json=body)) for _ in range(4)
        ]
        # The cap is 2 per backend: the four spread over both nodes.
        await eventually(
            lambda: fleet.node_a.active == base_a + 2 and fleet.node_b.active == base_b + 2,
            what="both nodes full",
        )
        refused = await client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "backends_busy"
        for node in (fleet.node_a, fleet.node_b):
            node.faults.clear()
        assert [(await t).status_code for t in waiting] == [200, 200, 200, 200]


async def test_metrics_count_requests_tokens_and_first_tokens(fleet: Fleet) -> None:
    await fleet.openai().chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": "count me"}]
    )
    # Every series also carries this replica's instance label; the checks below leave it out.
    text = re.sub(r',?instance="[^"]*",?', ",", (await fleet.admin.get("/metrics")).text)
    text = text.replace("{,", "{").replace(",}", "}")
    assert any(
        line.startswith('runtimestate_gateway_requests_total{backend="acct",')
        and 'model="gpt-4o-mini",outcome="ok",route="/v1/chat/completions"}' in line
        for line in text.splitlines()
    )
    assert 'runtimestate_gateway_tokens_total{direction="out",model="gpt-4o-mini"}' in text
    assert 'runtimestate_gateway_first_token_seconds_count{route="/v1/chat/completions"}' in text
    assert 'runtimestate_gateway_in_flight{backend="acct"} 0.0' in text


async def test_bad_policy_and_unknown_pool_are_clear_errors(fleet: Fleet) -> None:
    with pytest.raises(openai.BadRequestError, match="unknown policy"):
        await fleet.openai(**{"X-Runtimestate-Policy": "fastest"}).chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.NotFoundError, match="no pool"):
        await fleet.openai(**{"X-Runtimestate-Pool": "nope"}).chat.completions.create(
            model=CHAT, messages=[{"role": "user", "content": "x"}]
        )


async def test_a_context_limit_400_is_relayed_as_it_is_and_not_retried(fleet: Fleet) -> None:
    fleet.vllm.context_limit = 3
    before = _chat_posts(fleet.vllm)
    try:
        with pytest.raises(openai.BadRequestError) as caught:
            await fleet.openai().chat.completions.create(
                model=VLLM, messages=[{"role": "user", "content": "far too many words"}]
            )
    finally:
        fleet.vllm.context_limit = None
    assert caught.value.code == "context_length_exceeded"
    assert _chat_posts(fleet.vllm) - before == 1


# Last in the module: it leaves vllm-1 cooling down.
async def test_providers_health_says_which_backend_cools_down_and_until_when(
    fleet: Fleet,
) -> None:
    fleet.vllm.faults.fail(status=500, path="/v1/chat/completions")
    before = _chat_posts(fleet.vllm)
    client = fleet.openai()
    for attempt in range(3):
        if attempt == 2:
            third = datetime.now(UTC)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model=VLLM, messages=[{"role": "user", "content": "fail"}]
            )
    # Ground truth at the emulator: three requests reached it; the fourth is refused by the
    # gateway without reaching it, because the backend cools down.
    assert _chat_posts(fleet.vllm) - before == 3
    with pytest.raises(openai.APIStatusError) as cooling:
        await client.chat.completions.create(
            model=VLLM, messages=[{"role": "user", "content": "fail"}]
        )
    assert cooling.value.status_code == 503
    assert _chat_posts(fleet.vllm) - before == 3
    health = {entry["name"]: entry for entry in (await fleet.admin.get("/providers/health")).json()}
    assert set(health) == {"node-a", "node-b", "vllm-1", "acct", "gem", "gem-elsewhere"}
    routing = health["vllm-1"]["routing"]
    until = datetime.fromisoformat(routing["coolingUntil"])
    # The gateway's default cooldown: 30 s from the third failure, which came between the
    # moment before that request and the moment after the answer above.
    assert third + timedelta(seconds=30) <= until <= datetime.now(UTC) + timedelta(seconds=30)
    assert routing["consecutiveFailures"] == 0, "the count starts again while it cools"
    assert "HTTP 500" in routing["lastError"]
    assert health["vllm-1"]["status"] != "error", "observed fine; only its traffic fails"
    assert health["node-a"]["routing"]["coolingUntil"] is None
    assert health["acct"]["type"] == "openai"
