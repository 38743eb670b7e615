"""The HTTP API through the real app (httpx ``ASGITransport``) on both store engines: auth,
validation with the field named, paging, 404/409, and the declared-state routes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from runtimestate import OPENAI_KEY
from runtimestate.api import ApiContext, create_app
from runtimestate.bus import Messenger
from runtimestate.store import Store

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def client(store: Store, bus: Messenger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ApiContext(store=store, messenger=bus, token=TOKEN, version="9.9"))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=AUTH) as c:
        yield c


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    assert body["error"]["code"] == code
    error: dict[str, Any] = body["error"]
    return error


async def backend(client: httpx.AsyncClient, name: str, url: str | None = None) -> dict[str, Any]:
    body = {"name": name, "baseUrl": url or f"http://{name}.example:11434", "type": "ollama"}
    response = await client.post("/backends", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_every_route_but_health_requires_the_token(client: httpx.AsyncClient) -> None:
    schema = (await client.get("/openapi.json")).json()
    checked = 0
    for path, operations in schema["paths"].items():
        concrete = path.replace("{", "").replace("}", "").replace(":path", "")
        for method in operations:
            for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong-token"}):
                response = await client.request(method, concrete, headers=headers)
                if path == "/health":
                    assert response.status_code == 200
                    continue
                error = error_of(response, 401, "unauthorized")
                assert TOKEN not in response.text
                assert "token" in error["message"]
                checked += 1
    # Every operation but /health: the 38 admin operations, the fleet file's five, the gateway
    # keys' three, the named secrets' three, the queue's retry, GET /cluster, GET
    # /providers/health and GET /state/{backend}/errors, each tried without and with a wrong
    # token.
    assert checked == 2 * 53
    # The schema itself too; the browser UIs, which could not send the token, are not served.
    error_of(await client.get("/openapi.json", headers={"Authorization": ""}), 401, "unauthorized")
    for ui in ("/docs", "/redoc"):
        error_of(await client.get(ui), 404, "not_found")


async def test_backend_crud_and_shape(client: httpx.AsyncClient) -> None:
    created = await backend(client, "node-1")
    assert set(created) == {"id", "name", "baseUrl", "type", "createdAt", "updatedAt", "apiKey"}
    assert created["type"] == "ollama"
    assert created["apiKey"] is None
    fetched = (await client.get(f"/backends/{created['id']}")).json()
    assert fetched == created
    response = await client.put(
        f"/backends/{created['id']}",
        json={"name": "node-1b", "baseUrl": "https://node.example/", "type": "vllm"},
    )
    assert response.status_code == 200
    updated = response.json()
    assert (updated["name"], updated["baseUrl"], updated["type"]) == (
        "node-1b",
        "https://node.example",
        "vllm",
    )
    assert (await client.delete(f"/backends/{created['id']}")).status_code == 204
    error_of(await client.get(f"/backends/{created['id']}"), 404, "not_found")
    error_of(await client.delete(f"/backends/{created['id']}"), 404, "not_found")


async def test_duplicates_are_409_with_the_field(client: httpx.AsyncClient) -> None:
    await backend(client, "node-1", "http://a.example")
    same_name = {"name": "node-1", "baseUrl": "http://b.example", "type": "ollama"}
    assert error_of(await client.post("/backends", json=same_name), 409, "conflict")["field"] == (
        "name"
    )
    same_url = {"name": "node-2", "baseUrl": "http://a.example", "type": "ollama"}
    assert error_of(await client.post("/backends", json=same_url), 409, "conflict")["field"] == (
        "baseUrl"
    )


@pytest.mark.parametrize(
    ("body", "field", "fragment"),
    [
        ({"name": "n", "baseUrl": "http://h", "type": "llamafile"}, "type", "'gemini'"),
        ({"name": "n", "baseUrl": "ftp://h", "type": "ollama"}, "baseUrl", "http"),
        ({"name": "n", "baseUrl": "http://", "type": "ollama"}, "baseUrl", "host"),
        ({"name": "  ", "baseUrl": "http://h", "type": "ollama"}, "name", "must not be empty"),
        ({"baseUrl": "http://h", "type": "ollama"}, "name", "required"),
        ({"name": "n", "baseURL": "http://h", "type": "ollama"}, "baseUrl", "required"),
    ],
)
async def test_invalid_backend_names_the_field(
    client: httpx.AsyncClient, body: dict[str, str], field: str, fragment: str
) -> None:
    error = error_of(await client.post("/backends", json=body), 422, "invalid_input")
    assert error["field"] == field
    assert fragment in error["message"]


async def test_unknown_type_lists_the_supported_ones(client: httpx.AsyncClient) -> None:
    body = {"name": "n", "baseUrl": "http://h", "type": "llamafile"}
    message = error_of(await client.post("/backends", json=body), 422, "invalid_input")["message"]
    for supported in ("ollama", "vllm", "openai", "gemini"):
        assert supported in message


@pytest.mark.parametrize(
    ("method", "path", "body", "field"),
    [
        ("POST", "/backends", {"name": "a\x00b", "baseUrl": "http://h", "type": "ollama"}, "name"),
        ("POST", "/models", {"model": "llama3\x00"}, "model"),
        ("POST", "/pools", {"name": "p", "purposeType": "\x00chat"}, "purposeType"),
        ("POST", "/providers/openai/configure", {"apiKey": "sk-\x00abc"}, "apiKey"),
        ("GET", "/backends/a%00b", None, "backend_id"),
        ("POST", "/models", {"model": "llama3\n:8b"}, "model"),
        ("POST", "/backends", {"name": "a\tb", "baseUrl": "http://h", "type": "ollama"}, "name"),
    ],
)
async def test_a_control_character_is_a_documented_422(
    client: httpx.AsyncClient, method: str, path: str, body: Any, field: str
) -> None:
    # PostgreSQL cannot store a NUL, and a name with a newline could never be named again in a
    # path (DELETE /models/{model} answered 405); the schema refuses both, so each is a 422
    # naming the field rather than an undocumented 400 or 405 (schemathesis found them).
    error = error_of(await client.request(method, path, json=body), 422, "invalid_input")
    assert error["field"] == field


@pytest.mark.parametrize(
    ("content", "headers"),
    [
        (b"{not json", {"Content-Type": "application/json"}),
        (b"", {"Content-Type": "application/json"}),
        (b"[1, 2]", {"Content-Type": "application/json"}),
        (b"\xff\xfe", {"Content-Type": "application/json"}),
    ],
)
async def test_malformed_bodies_are_422(
    client: httpx.AsyncClient, content: bytes, headers: dict[str, str]
) -> None:
    response = await client.post("/backends", content=content, headers=headers)
    error_of(response, 422, "invalid_input")


@pytest.mark.parametrize(
    ("query", "status", "field"),
    [
        ("limit=0", 422, "limit"),
        ("limit=1001", 422, "limit"),
        ("limit=99999999999999999999", 422, "limit"),
        ("limit=abc", 422, "limit"),
        ("cursor=not-a-cursor", 400, "cursor"),
        ("cursor=" + "x" * 600, 422, "cursor"),
    ],
)
async def test_bad_paging_parameters(
    client: httpx.AsyncClient, query: str, status: int, field: str
) -> None:
    for path in ("/backends", "/models", "/pools", "/pool-by-purpose/chat"):
        response = await client.get(f"{path}?{query}")
        code = "invalid_input"
        assert error_of(response, status, code)["field"] == field


async def test_pagination_follows_x_next_cursor(client: httpx.AsyncClient) -> None:
    created = {(await backend(client, f"node-{i}"))["id"] for i in range(5)}
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        response = await client.get("/backends", params=params)
        assert response.status_code == 200
        pages += 1
        seen += [item["id"] for item in response.json()]
        cursor = response.headers.get("X-Next-Cursor")
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == 5
    assert set(seen) == created


async def test_models_are_changed_by_id_and_removed_by_name(client: httpx.AsyncClient) -> None:
    body = {"model": "library/llama3:8b", "contextLength": 8192, "canChat": True}
    response = await client.post("/models", json=body)
    assert response.status_code == 201, response.text
    model = response.json()
    assert set(model) == {
        "id",
        "model",
        "contextLength",
        "canChat",
        "canEmbed",
        "canPrompt",
        "canStream",
        "createdAt",
        "updatedAt",
    }
    assert (model["contextLength"], model["canChat"], model["canEmbed"]) == (8192, True, False)
    error_of(await client.post("/models", json=body), 409, "conflict")
    update = {"model": "library/llama3:8b", "contextLength": 4096, "canEmbed": True}
    updated = (await client.put(f"/models/{model['id']}", json=update)).json()
    assert (updated["contextLength"], updated["canChat"], updated["canEmbed"]) == (
        4096,
        False,
        True,
    )
    bad = {"model": "m", "contextLength": -1}
    assert error_of(await client.post("/models", json=bad), 422, "invalid_input")["field"] == (
        "contextLength"
    )
    listed = (await client.get("/models")).json()
    assert [m["model"] for m in listed] == ["library/llama3:8b"]
    assert (await client.delete("/models/library/llama3:8b")).status_code == 204
    error_of(await client.delete("/models/library/llama3:8b"), 404, "not_found")
    error_of(await client.put(f"/models/{model['id']}", json=update), 404, "not_found")


async def test_pools_by_id_name_and_purpose(client: httpx.AsyncClient) -> None:
    response = await client.post("/pools", json={"name": "chat", "purposeType": "inference"})
    assert response.status_code == 201
    pool = response.json()
    assert set(pool) == {"id", "name", "purposeType", "createdAt", "updatedAt"}
    await client.post("/pools", json={"name": "embed", "purposeType": "embedding"})
    error_of(
        await client.post("/pools", json={"name": "chat", "purposeType": "x"}), 409, "conflict"
    )
    assert (await client.get(f"/pools/{pool['id']}")).json() == pool
    assert (await client.get("/pool-by-name/chat")).json() == pool
    by_purpose = (await client.get("/pool-by-purpose/inference")).json()
    assert [p["name"] for p in by_purpose] == ["chat"]
    renamed = await client.put(
        f"/pools/{pool['id']}", json={"name": "chat2", "purposeType": "inference"}
    )
    assert renamed.json()["name"] == "chat2"
    error_of(await client.get("/pool-by-name/chat"), 404, "not_found")
    assert len((await client.get("/pools")).json()) == 2
    assert (await client.delete(f"/pools/{pool['id']}")).status_code == 204
    error_of(await client.get(f"/pools/{pool['id']}"), 404, "not_found")


async def test_associations_both_ways(client: httpx.AsyncClient) -> None:
    pool = (await client.post("/pools", json={"name": "p", "purposeType": "chat"})).json()
    node = await backend(client, "node-1")
    model = (await client.post("/models", json={"model": "llama3.2:1b"})).json()
    p, b, m = pool["id"], node["id"], model["id"]
    assert (await client.post(f"/backend-associations/{p}/backends/{b}")).status_code == 204
    assert (await client.post(f"/model-associations/{p}/models/{m}")).status_code == 204
    error_of(await client.post(f"/backend-associations/{p}/backends/{b}"), 409, "conflict")
    error_of(await client.post(f"/model-associations/{p}/models/{m}"), 409, "conflict")
    backends = (await client.get(f"/backend-associations/{p}/backends")).json()
    assert [x["id"] for x in backends] == [b]
    assert [x["id"] for x in (await client.get(f"/backend-associations/{b}/pools")).json()] == [p]
    assert [x["id"] for x in (await client.get(f"/model-associations/{p}/models")).json()] == [m]
    assert [x["id"] for x in (await client.get(f"/model-associations/{m}/pools")).json()] == [p]
    assert (await client.delete(f"/backend-associations/{p}/backends/{b}")).status_code == 204
    assert (await client.delete(f"/model-associations/{p}/models/{m}")).status_code == 204
    error_of(await client.delete(f"/backend-associations/{p}/backends/{b}"), 404, "not_found")
    error_of(await client.delete(f"/model-associations/{p}/models/{m}"), 404, "not_found")
    assert (await client.get(f"/backend-associations/{p}/backends")).json() == []
    for path in (
        "/backend-associations/nope/backends",
        "/backend-associations/nope/pools",
        "/model-associations/nope/models",
        "/model-associations/nope/pools",
        f"/backend-associations/nope/backends/{b}",
    ):
        method = "POST" if path.count("/") == 4 else "GET"
        error_of(await client.request(method, path), 404, "not_found")


async def test_provider_keys_are_stored_but_only_shown_masked(
    client: httpx.AsyncClient, store: Store
) -> None:
    key = "sk-test-0123456789abcdefWXYZ"
    status = (await client.get("/providers/openai/status")).json()
    assert status == {
        "type": "openai",
        "configured": False,
        "backends": 0,
        "healthy": 0,
        "models": 0,
        "error": None,
    }
    error_of(await client.get("/providers/openai/config"), 404, "not_found")
    response = await client.post("/providers/openai/configure", json={"apiKey": key})
    assert response.status_code == 200
    assert response.json() == {"APIKey": "****WXYZ", "Type": "openai"}
    assert (await client.get("/providers/openai/status")).json()["configured"] is True
    shown = await client.get("/providers/openai/config")
    assert shown.json() == {"APIKey": "****WXYZ", "Type": "openai"}
    configs = await client.get("/providers/configs")
    assert configs.json() == [{"APIKey": "****WXYZ", "Type": "openai"}]
    for answer in (response, shown, configs):
        assert key not in answer.text
    # The reconciler reads the key from the store in the Go package's shape, in clear.
    assert (await store.get_kv(OPENAI_KEY)).value == {"APIKey": key, "Type": "openai"}
    assert (await client.delete("/providers/openai/config")).status_code == 204
    assert (await client.get("/providers/openai/status")).json()["configured"] is False
    error_of(await client.delete("/providers/openai/config"), 404, "not_found")
    error = error_of(
        await client.post("/providers/azure/configure", json={"apiKey": key}), 422, "invalid_input"
    )
    assert error["field"] == "provider"
    empty = await client.post("/providers/gemini/configure", json={"apiKey": " "})
    assert error_of(empty, 422, "invalid_input")["field"] == "apiKey"
    short = await client.post("/providers/gemini/configure", json={"apiKey": "n"})
    assert error_of(short, 422, "invalid_input")["field"] == "apiKey"


async def test_state_routes_without_a_reconciler_are_503(client: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/state"), ("POST", "/state/sync"), ("GET", "/state/plan")):
        error_of(await client.request(method, path), 503, "unavailable")


async def test_unknown_route_and_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    error_of(await client.get("/nowhere"), 404, "not_found")
    error_of(await client.patch("/backends"), 405, "unsupported")


async def test_version_and_health(client: httpx.AsyncClient) -> None:
    assert (await client.get("/version")).json() == {"version": "9.9", "api": "1"}
    health = await client.get("/health", headers={"Authorization": ""})
    assert health.json() == {"status": "ok", "store": "ok", "bus": "ok", "reasons": []}


async def test_health_is_503_when_the_store_is_closed(
    client: httpx.AsyncClient, store: Store
) -> None:
    await store.close()
    response = await client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body == {
        "status": "unavailable",
        "store": "error",
        "bus": "ok",
        "reasons": ["store error"],
    }


async def test_health_is_503_when_the_bus_is_closed(
    client: httpx.AsyncClient, bus: Messenger
) -> None:
    await bus.close()
    response = await client.get("/health")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "store": "ok",
        "bus": "error",
        "reasons": ["bus error"],
    }
