"""The official client packages against the emulators over real sockets.

If ``ollama``, ``openai`` or ``google-genai`` cannot parse what an emulator sends, the emulator
is not faithful, whatever its own tests say; these tests keep it honest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import ollama
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as genai_types

from runtimestate.testing import Emulator, GeminiModel, OllamaNode

OA_KEY = "sk-test-0123456789"
GM_KEY = "AIzaTest0123456789"


OllamaClients = Callable[[OllamaNode], ollama.AsyncClient]


@pytest.fixture
async def ollama_client() -> AsyncIterator[OllamaClients]:
    """Makes clients for nodes and closes them all, so no socket outlives its test."""
    made: list[ollama.AsyncClient] = []

    def make(node: OllamaNode) -> ollama.AsyncClient:
        made.append(ollama.AsyncClient(host=node.base_url, timeout=10))
        return made[-1]

    yield make
    for client in made:
        await client.close()  # type: ignore[no-untyped-call]


async def test_ollama_client_inventory(emu: Emulator, ollama_client: OllamaClients) -> None:
    node = emu.add_ollama("node-1", models=["llama3.2:1b"], pull_seconds=0.01)
    client = ollama_client(node)
    listed = await client.list()
    assert [m.model for m in listed.models] == ["llama3.2:1b"]
    assert listed.models[0].details is not None
    assert listed.models[0].details.family == "llama"
    progress = [p async for p in await client.pull("nomic-embed-text", stream=True)]
    assert progress[0].status == "pulling manifest"
    assert progress[-1].status == "success"
    assert any(p.total and p.completed == p.total for p in progress)
    shown = await client.show("nomic-embed-text")
    assert shown.capabilities == ["embedding"]
    assert shown.modelinfo is not None
    arch = shown.modelinfo["general.architecture"]
    assert shown.modelinfo[f"{arch}.context_length"] == 2048
    await client.delete("nomic-embed-text")
    with pytest.raises(ollama.ResponseError) as missing:
        await client.delete("nomic-embed-text")
    assert missing.value.status_code == 404
    assert (await client.ps()).models == []


async def test_ollama_client_pull_errors(emu: Emulator, ollama_client: OllamaClients) -> None:
    node = emu.add_ollama("n", pullable=["llama3"])
    client = ollama_client(node)
    with pytest.raises(ollama.ResponseError) as unknown:
        async for _ in await client.pull("mistral", stream=True):
            pass
    assert unknown.value.status_code == -1
    assert "file does not exist" in unknown.value.error
    with pytest.raises(ollama.ResponseError) as blocking:
        await client.pull("mistral")
    assert blocking.value.status_code == 500
    assert (await client.pull("llama3")).status == "success"


async def test_ollama_client_inference(emu: Emulator, ollama_client: OllamaClients) -> None:
    node = emu.add_ollama("n", models=["llama3.2:1b", "nomic-embed-text"])
    client = ollama_client(node)
    messages = [{"role": "user", "content": "why is the sky blue"}]
    whole = await client.chat(model="llama3.2:1b", messages=messages)
    assert whole.done
    assert whole.message.content
    assert "why is the sky blue" in whole.message.content
    parts = [
        c async for c in await client.chat(model="llama3.2:1b", messages=messages, stream=True)
    ]
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done_reason == "stop"
    assert parts[-1].eval_count == len(parts) - 1
    generated = await client.generate(model="llama3.2:1b", prompt="hello")
    assert generated.response
    generate_stream = await client.generate("llama3.2:1b", "hello", stream=True)
    streamed = [c.response or "" async for c in generate_stream]
    assert "".join(streamed) == generated.response
    embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    assert len(embedded.embeddings[0]) == 768
    with pytest.raises(ollama.ResponseError) as missing:
        await client.chat(model="nope", messages=messages)
    assert missing.value.status_code == 404
    node.faults.stream_error(after_lines=2, message="model runner crashed")
    with pytest.raises(ollama.ResponseError) as crashed:
        async for _ in await client.chat(model="llama3.2:1b", messages=messages, stream=True):
            pass
    assert crashed.value.status_code == -1
    assert crashed.value.error == "model runner crashed"


async def test_openai_client(emu: Emulator) -> None:
    acct = emu.add_openai("acct", api_key=OA_KEY, models=["gpt-4o", "text-embedding-3-small"])
    client = openai.AsyncOpenAI(api_key=OA_KEY, base_url=acct.base_url, max_retries=0, timeout=10)
    async with client:
        ids = [m.id async for m in client.models.list()]
        assert ids == ["gpt-4o", "text-embedding-3-small"]
        messages: list[openai.types.chat.ChatCompletionMessageParam] = [
            {"role": "user", "content": "hello"}
        ]
        whole = await client.chat.completions.create(model="gpt-4o", messages=messages)
        text = whole.choices[0].message.content
        assert text
        assert whole.usage is not None
        assert whole.usage.completion_tokens == len(text.split())
        stream = await client.chat.completions.create(
            model="gpt-4o",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces) == text
        vectors = await client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
        assert [len(d.embedding) for d in vectors.data] == [1536, 1536]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="gpt-9", messages=messages)
        acct.faults.stream_error(after_lines=2, message="server overloaded")
        with pytest.raises(openai.APIError, match="server overloaded"):
            async for _ in await client.chat.completions.create(
                model="gpt-4o", messages=messages, stream=True
            ):
                pass
        acct.faults.clear()
        acct.faults.fail(status=500, path="/models")
        with pytest.raises(openai.InternalServerError):
            await client.models.list()
        acct.faults.clear()
        acct.faults.fail(status=429, path="/v1/embeddings")
        with pytest.raises(openai.RateLimitError) as limited:
            await client.embeddings.create(model="text-embedding-3-small", input="a")
        assert limited.value.code == "rate_limit_exceeded"
        acct.faults.clear()
    wrong = openai.AsyncOpenAI(api_key="sk-wrong-0000000000", base_url=acct.base_url, max_retries=0)
    async with wrong:
        with pytest.raises(openai.AuthenticationError) as refused:
            await wrong.models.list()
    assert refused.value.code == "invalid_api_key"


async def test_openai_client_against_vllm(emu: Emulator) -> None:
    vllm = emu.add_vllm("v", model="meta-llama/Llama-3.1-8B-Instruct", api_key="vllm-key")
    client = openai.AsyncOpenAI(api_key="vllm-key", base_url=vllm.base_url + "/v1", max_retries=0)
    async with client:
        models = [m async for m in client.models.list()]
        assert models[0].owned_by == "vllm"
        assert (models[0].model_extra or {})["max_model_len"] == 8192
        reply = await client.completions.create(model=models[0].id, prompt="once upon")
        assert reply.choices[0].text
    wrong = openai.AsyncOpenAI(api_key="nope", base_url=vllm.base_url + "/v1", max_retries=0)
    async with wrong:
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()


def gemini_client(base_url: str, key: str = GM_KEY) -> genai.Client:
    options = genai_types.HttpOptions(base_url=base_url, api_version="v1beta", timeout=10_000)
    return genai.Client(api_key=key, http_options=options)


# google-genai subclasses aiohttp's ClientSession, which aiohttp deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:Inheritance class AiohttpClientSession:DeprecationWarning")
async def test_genai_client(emu: Emulator) -> None:
    models = [
        GeminiModel(name=f"models/gemini-test-{i}", methods=("generateContent",)) for i in range(5)
    ]
    embedder = GeminiModel(
        name="models/text-embedding-004", methods=("embedContent", "batchEmbedContents")
    )
    acct = emu.add_gemini("acct", api_key=GM_KEY, models=[*models, embedder])
    client = gemini_client(acct.base_url)
    pager = await client.aio.models.list(config={"page_size": 2})
    names = [m.name async for m in pager]
    assert names == [m.name for m in [*models, embedder]]
    page_sizes = [r.query.get("pageSize") for r in acct.requests]
    assert page_sizes == ["2", "2", "2"]
    first = await client.aio.models.get(model="gemini-test-0")
    assert first.input_token_limit == 1_048_576
    assert first.supported_actions == ["generateContent"]
    answer = await client.aio.models.generate_content(model="gemini-test-0", contents="hi there")
    assert answer.text
    assert "hi there" in answer.text
    chunks = [
        c.text or ""
        async for c in await client.aio.models.generate_content_stream(
            model="gemini-test-0", contents="hi there"
        )
    ]
    assert "".join(chunks) == answer.text
    embedded = await client.aio.models.embed_content(
        model="text-embedding-004", contents=["a", "b"]
    )
    assert embedded.embeddings is not None
    assert [len(e.values or []) for e in embedded.embeddings] == [768, 768]
    assert acct.requests[-1].path == "/v1beta/models/text-embedding-004:batchEmbedContents"
    with pytest.raises(genai_errors.ClientError) as missing:
        await client.aio.models.generate_content(model="nope", contents="x")
    assert missing.value.code == 404
    acct.faults.stream_error(after_lines=1, message="quota")
    with pytest.raises(genai_errors.APIError):
        async for _ in await client.aio.models.generate_content_stream(
            model="gemini-test-0", contents="hi there"
        ):
            pass
    await client.aio.aclose()
    bad = gemini_client(acct.base_url, key="AIzaWrongWrongWrong00")
    with pytest.raises(genai_errors.ClientError) as refused:
        await bad.aio.models.generate_content(model="gemini-test-0", contents="x")
    await bad.aio.aclose()
    assert refused.value.code == 400
    assert refused.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"
