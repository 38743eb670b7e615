"""The vLLM, OpenAI and Gemini emulators on the wire: listings, keys, paging, inference, faults."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from runtimestate.testing import Emulator, GeminiModel

OA_KEY = "sk-test-0123456789"
GM_KEY = "AIzaTest0123456789"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def sse_events(text: str) -> list[str]:
    return [
        block.removeprefix("data: ")
        for block in text.replace("\r\n", "\n").split("\n\n")
        if block.strip()
    ]


async def test_vllm_listing_health_and_key(emu: Emulator, http: httpx.AsyncClient) -> None:
    vllm = emu.add_vllm("v-1", model="meta-llama/Llama-3.1-8B-Instruct", max_model_len=8192)
    assert vllm.base_url == f"{emu.url}/vllm/v-1"
    body = (await http.get(vllm.base_url + "/v1/models")).json()
    assert body["object"] == "list"
    (entry,) = body["data"]
    assert entry["id"] == entry["root"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert (entry["owned_by"], entry["parent"], entry["max_model_len"]) == ("vllm", None, 8192)
    assert entry["permission"][0]["object"] == "model_permission"
    locked = emu.add_vllm("v-2", model="m", api_key="secret-key", max_model_len=None)
    refused = await http.get(locked.base_url + "/v1/models")
    assert (refused.status_code, refused.json()) == (401, {"error": "Unauthorized"})
    assert (await http.get(locked.base_url + "/health")).status_code == 200
    auth = {"Authorization": "Bearer secret-key"}
    allowed = await http.get(locked.base_url + "/v1/models", headers=auth)
    assert allowed.json()["data"][0]["max_model_len"] is None
    assert "secret-key" not in repr(locked)
    locked.add_adapter("sql-lora")
    served = (await http.get(locked.base_url + "/v1/models", headers=auth)).json()["data"]
    adapter = served[1]
    assert (adapter["id"], adapter["parent"], adapter["max_model_len"]) == ("sql-lora", "m", None)
    locked.healthy = False
    assert (await http.get(locked.base_url + "/health")).status_code == 503


async def test_vllm_inference_and_unknown_model(emu: Emulator, http: httpx.AsyncClient) -> None:
    vllm = emu.add_vllm("v", model="m")
    url = vllm.base_url + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    wrong = await http.post(url, json={"model": "other", "messages": messages})
    assert wrong.status_code == 404
    assert wrong.json()["error"]["type"] == "NotFoundError"
    completion = await http.post(
        vllm.base_url + "/v1/completions", json={"model": "m", "prompt": "say hi", "max_tokens": 3}
    )
    choice = completion.json()["choices"][0]
    assert choice["finish_reason"] == "length"
    assert completion.json()["usage"]["completion_tokens"] == 3


async def test_openai_listing_and_keys(emu: Emulator, http: httpx.AsyncClient) -> None:
    acct = emu.add_openai("acct", api_key=OA_KEY, models=["gpt-4o", "text-embedding-3-small"])
    assert acct.base_url == f"{emu.url}/openai/acct/v1"
    ok = await http.get(acct.base_url + "/models", headers={"Authorization": f"Bearer {OA_KEY}"})
    data = ok.json()["data"]
    assert [m["id"] for m in data] == ["gpt-4o", "text-embedding-3-small"]
    assert set(data[0]) == {"id", "object", "created", "owned_by"}
    assert data[0]["owned_by"] == "system"
    bad = await http.get(
        acct.base_url + "/models", headers={"Authorization": "Bearer sk-wrong-999999"}
    )
    assert bad.status_code == 401
    error = bad.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        None,
        "invalid_api_key",
    )
    assert "sk-wrong-999999" not in bad.text
    assert (await http.get(acct.base_url + "/models")).status_code == 401
    auth = {"Authorization": f"Bearer {OA_KEY}"}
    one = await http.get(acct.base_url + "/models/gpt-4o", headers=auth)
    assert one.json()["id"] == "gpt-4o"
    assert (await http.get(acct.base_url + "/models/gpt-9", headers=auth)).status_code == 404
    assert [r.path for r in acct.requests][:3] == ["/models"] * 3
    assert OA_KEY not in repr(acct) + repr(acct.requests)


async def test_openai_chat_stream_and_embeddings(emu: Emulator, http: httpx.AsyncClient) -> None:
    acct = emu.add_openai("acct", api_key=OA_KEY, models=["gpt-4o", "text-embedding-3-small"])
    auth = {"Authorization": f"Bearer {OA_KEY}"}
    url = acct.base_url + "/chat/completions"
    body: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi you"}]}
    whole = (await http.post(url, json=body, headers=auth)).json()
    assert whole["object"] == "chat.completion"
    message = whole["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert set(whole["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    options = {"stream": True, "stream_options": {"include_usage": True}}
    streamed = await http.post(url, json={**body, **options}, headers=auth)
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == message["content"]
    assert chunks[-1]["usage"] == whole["usage"]
    missing = await http.post(url, json={**body, "model": "gpt-9"}, headers=auth)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    required = await http.post(url, json={"model": "gpt-4o"}, headers=auth)
    assert required.json()["error"]["param"] == "messages"
    emb_url = acct.base_url + "/embeddings"
    emb = {"model": "text-embedding-3-small", "input": ["a", "b"]}
    floats = (await http.post(emb_url, json=emb, headers=auth)).json()
    assert [d["index"] for d in floats["data"]] == [0, 1]
    assert len(floats["data"][0]["embedding"]) == 1536
    packed = await http.post(emb_url, json={**emb, "encoding_format": "base64"}, headers=auth)
    raw = base64.b64decode(packed.json()["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


async def test_openai_stream_error_event(emu: Emulator, http: httpx.AsyncClient) -> None:
    acct = emu.add_openai("acct", api_key=OA_KEY, models=["gpt-4o"])
    acct.faults.stream_error(after_lines=1, message="overloaded")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}], "stream": True}
    reply = await http.post(
        acct.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {OA_KEY}"},
    )
    events = sse_events(reply.text)
    assert reply.status_code == 200
    assert len(events) == 2
    assert json.loads(events[1])["error"]["message"] == "overloaded"


def gemini_models(count: int) -> list[GeminiModel]:
    return [GeminiModel(name=f"gemini-test-{i:03d}") for i in range(count)]


async def test_gemini_paging(emu: Emulator, http: httpx.AsyncClient) -> None:
    acct = emu.add_gemini("acct", api_key=GM_KEY, models=gemini_models(120))
    url = acct.base_url + "/v1beta/models"
    headers = {"x-goog-api-key": GM_KEY}
    first = (await http.get(url, headers=headers)).json()
    assert len(first["models"]) == 50
    names = [m["name"] for m in first["models"]]
    token = first["nextPageToken"]
    while token:
        page = (await http.get(url, headers=headers, params={"pageToken": token})).json()
        names += [m["name"] for m in page["models"]]
        token = page.get("nextPageToken")
    assert names == [f"models/gemini-test-{i:03d}" for i in range(120)]
    big = (await http.get(url, params={"key": GM_KEY, "pageSize": 5000})).json()
    assert len(big["models"]) == 120
    assert "nextPageToken" not in big
    small = (await http.get(url, params={"key": GM_KEY, "pageSize": 7})).json()
    assert len(small["models"]) == 7
    entry = small["models"][0]
    assert {
        "name",
        "version",
        "displayName",
        "description",
        "inputTokenLimit",
        "outputTokenLimit",
        "supportedGenerationMethods",
    } <= set(entry)
    invalid = await http.get(url, params={"key": GM_KEY, "pageToken": "!!"})
    assert invalid.status_code == 400


async def test_gemini_keys_and_get(emu: Emulator, http: httpx.AsyncClient) -> None:
    acct = emu.add_gemini("acct", api_key=GM_KEY, models=["gemini-2.0-flash"])
    url = acct.base_url + "/v1beta/models"
    bad = await http.get(url, headers={"x-goog-api-key": "AIzaWrongWrongWrong"})
    assert bad.status_code == 400
    error = bad.json()["error"]
    assert (error["code"], error["status"]) == (400, "INVALID_ARGUMENT")
    assert error["message"] == "API key not valid. Please pass a valid API key."
    assert error["details"][0]["reason"] == "API_KEY_INVALID"
    assert (await http.get(url)).status_code == 403
    one = await http.get(url + "/gemini-2.0-flash", params={"key": GM_KEY})
    assert one.json()["name"] == "models/gemini-2.0-flash"
    missing = await http.get(url + "/nope", params={"key": GM_KEY})
    assert (missing.status_code, missing.json()["error"]["status"]) == (404, "NOT_FOUND")


async def test_gemini_inference(emu: Emulator, http: httpx.AsyncClient) -> None:
    embedder = GeminiModel(name="text-embedding-004", methods=("embedContent",))
    acct = emu.add_gemini("acct", api_key=GM_KEY, models=["gemini-2.0-flash", embedder])
    base = acct.base_url + "/v1beta/models/"
    headers = {"x-goog-api-key": GM_KEY}
    body = {"contents": [{"role": "user", "parts": [{"text": "tell me"}]}]}
    whole = (
        await http.post(base + "gemini-2.0-flash:generateContent", json=body, headers=headers)
    ).json()
    candidate = whole["candidates"][0]
    assert candidate["finishReason"] == "STOP"
    assert candidate["content"]["role"] == "model"
    text = candidate["content"]["parts"][0]["text"]
    assert whole["usageMetadata"]["promptTokenCount"] == 2
    streamed = await http.post(
        base + "gemini-2.0-flash:streamGenerateContent",
        params={"alt": "sse"},
        json=body,
        headers=headers,
    )
    chunks = [json.loads(e) for e in sse_events(streamed.text)]
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == text
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    array = await http.post(
        base + "gemini-2.0-flash:streamGenerateContent", json=body, headers=headers
    )
    assert len(array.json()) == len(chunks)
    unsupported = await http.post(
        base + "text-embedding-004:generateContent", json=body, headers=headers
    )
    assert unsupported.status_code == 404
    single = await http.post(
        base + "text-embedding-004:embedContent",
        json={"content": {"parts": [{"text": "a"}]}, "outputDimensionality": 16},
        headers=headers,
    )
    assert len(single.json()["embedding"]["values"]) == 16
    batch = await http.post(
        base + "text-embedding-004:batchEmbedContents",
        json={"requests": [{"content": {"parts": [{"text": t}]}} for t in ("a", "b")]},
        headers=headers,
    )
    vectors = batch.json()["embeddings"]
    assert len(vectors) == 2
    assert len(vectors[0]["values"]) == 768
    counted = await http.post(base + "gemini-2.0-flash:countTokens", json=body, headers=headers)
    assert counted.json() == {"totalTokens": 2}
