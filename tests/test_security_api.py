"""The admin API under hostile input, on both store engines: every request an attacker or a
careless operator might send is answered in the one error shape, never a 500, and nothing it
refuses reaches the store.

Ids, names and model names by their grammar; model names unique by their normalized form, also
under concurrent creates; strict types; backend URLs (user-info, fragments, link-local and
denied networks, the service itself); request bounds (413/414/431, answered before the body is
read); invalid JSON located by line and column; per-backend credentials write-only; and one
audit line per change, naming the caller's token id but never the token.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from runtimestate.api import ApiContext, create_app
from runtimestate.api.audit import token_id
from runtimestate.bus import Messenger
from runtimestate.store import Store
from runtimestate.urls import UrlPolicy, parse_networks

TOKEN = "security-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMIT = 1024 * 1024  # the default


def make_client(ctx: ApiContext) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_app(ctx))
    return httpx.AsyncClient(transport=transport, base_url="http://api", headers=AUTH)


@pytest.fixture
async def client(store: Store, bus: Messenger) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ApiContext(store=store, messenger=bus, token=TOKEN)
    assert ctx.limits.max_body == LIMIT
    async with make_client(ctx) as c:
        yield c


def error_of(response: httpx.Response, status: int, field: str | None = None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "field"}
    if field is not None:
        assert body["error"]["field"] == field, body
    message: str = body["error"]["message"]
    return message


def backend_body(
    name: object = "n1", url: str = "http://node-1.example:11434", **extra: Any
) -> Any:
    return {"name": name, "baseUrl": url, "type": "ollama", **extra}


# ---- identifiers ---------------------------------------------------------------------------
BAD_IDS = ["a/b", "..", ".", "?x#y", "a b", "a%2Fb", "x" * 129, "", "é", "a\x00b"]


async def test_ids_are_path_safe_and_bounded(client: httpx.AsyncClient, store: Store) -> None:
    for bad in BAD_IDS:
        for route, body in (
            ("/backends", backend_body(id=bad)),
            ("/models", {"model": "m1", "id": bad}),
            ("/pools", {"name": "p", "purposeType": "chat", "id": bad}),
        ):
            error_of(await client.post(route, json=body), 422, "id")
    assert await store.list_all_backends() == []
    assert await store.list_all_models() == []
    for good in ("node-1.a_b", "...", ".hidden", "x" * 128):
        created = await client.post(
            "/backends", json=backend_body(good, f"http://{len(good)}.x", id=good)
        )
        assert created.status_code == 201, created.text
        assert (await client.get(f"/backends/{good}")).json()["id"] == good
        assert (await client.delete(f"/backends/{good}")).status_code == 204


BAD_NAMES = [
    "a\x00b",
    "line\nbreak",
    "tab\there",
    "\u202eevil.exe",  # right-to-left override: displays as another name
    "zero\u200bwidth",
    "nel\x85inside",
    "   ",
    "x" * 257,
    "n" * 100_000,
]


async def test_backend_and_pool_names_are_printable_and_bounded(
    client: httpx.AsyncClient, store: Store
) -> None:
    for bad in BAD_NAMES:
        error_of(await client.post("/backends", json=backend_body(bad)), 422, "name")
        error_of(await client.post("/pools", json={"name": bad, "purposeType": "c"}), 422, "name")
        error = await client.post("/pools", json={"name": "p", "purposeType": bad})
        error_of(error, 422, "purposeType")
    assert await store.list_all_pools() == []
    # Printable text of any script, and SQL-looking text, are names like any other.
    for good in ("GPU box ü 1", "节点-一", "x'; DROP TABLE backends;--", "x" * 256):
        response = await client.post("/pools", json={"name": good, "purposeType": "chat"})
        assert response.status_code == 201, response.text
        assert response.json()["name"] == good
    assert len(await store.list_all_pools()) == 4
    assert (await client.get("/backends")).status_code == 200


BAD_MODELS = [
    "a|b:1b",
    "../../etc/passwd",
    "library/../secret",
    "bad name with spaces?",
    "🦙",
    "a..b",
    "/leading",
    "trailing/",
    "x" * 257,
    "m\x00",
    "a/b/c/d",
    "name:",
    "x'; DROP TABLE models;--",
]
GOOD_MODELS = [
    "llama3",
    "llama3.2:1b",
    "library/llama3:8b-instruct-q4_K_M",
    "registry.ollama.ai/library/mistral:latest",
    "localhost:5000/team/m:v1",
    "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
    "meta-llama/Llama-3.1-8B-Instruct",
    "gpt-4o-2024-08-06",
    "ft:gpt-4o-mini:org:custom:id1",
    "models/gemini-1.5-pro",
    "text-embedding-3-small",
]


async def test_model_names_follow_the_backend_grammars(
    client: httpx.AsyncClient, store: Store
) -> None:
    for bad in BAD_MODELS:
        error_of(await client.post("/models", json={"model": bad}), 422, "model")
    assert await store.list_all_models() == []
    for good in GOOD_MODELS:
        response = await client.post("/models", json={"model": good})
        assert response.status_code == 201, (good, response.text)
    # The store refuses the same names when called directly, not only the API.
    for bad in BAD_MODELS[:3]:
        with pytest.raises(Exception, match="not a model name"):
            await store.append_model(model=bad)
    assert len(await store.list_all_models()) == len(GOOD_MODELS)


async def test_model_names_are_unique_by_their_normalized_form(
    client: httpx.AsyncClient, store: Store
) -> None:
    first = (await client.post("/models", json={"model": "llama3"})).json()
    for spelling in (
        "llama3:latest",
        "Llama3:LATEST",
        "library/llama3",
        "registry.ollama.ai/library/llama3:latest",
    ):
        message = error_of(await client.post("/models", json={"model": spelling}), 409, "model")
        assert "'llama3'" in message
        assert first["id"] in message
    other = (await client.post("/models", json={"model": "mistral"})).json()
    renamed = await client.put(f"/models/{other['id']}", json={"model": "LLAMA3"})
    assert "'llama3'" in error_of(renamed, 409, "model")
    # Its own spelling may change.
    again = await client.put(f"/models/{first['id']}", json={"model": "Llama3:latest"})
    assert again.status_code == 200
    assert again.json()["model"] == "Llama3:latest"
    # Removal by name accepts any spelling of it.
    assert (await client.delete("/models/llama3")).status_code == 204
    assert [m.model for m in await store.list_all_models()] == ["mistral"]


async def test_concurrent_duplicate_creates_make_one_model(
    client: httpx.AsyncClient, store: Store
) -> None:
    spellings = ["qwen2", "Qwen2", "qwen2:latest", "QWEN2:Latest", "library/qwen2"] * 2
    answers = await asyncio.gather(
        *(client.post("/models", json={"model": name}) for name in spellings)
    )
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [201] + [409] * (len(spellings) - 1), [a.text for a in answers]
    assert len(await store.list_all_models()) == 1


async def test_types_are_strict(client: httpx.AsyncClient, store: Store) -> None:
    for field, value in (
        ("contextLength", True),
        ("contextLength", "8192"),
        ("contextLength", 1.5),
        ("contextLength", -1),
        ("contextLength", 2**31),
        ("canChat", 1),
        ("canChat", "true"),
        ("canChat", None),
        ("model", 5),
        ("model", ["m"]),
    ):
        body = {"model": "m1", field: value}
        error_of(await client.post("/models", json=body), 422, field)
    error_of(await client.post("/backends", json=backend_body(name=7)), 422, "name")
    error_of(await client.post("/backends", json=backend_body(type=1)), 422, "type")
    assert await store.list_all_models() == []


async def test_unknown_fields_and_malformed_bodies(client: httpx.AsyncClient) -> None:
    error_of(await client.post("/backends", json=backend_body(admin=True)), 422, "admin")
    for raw in (b"[]", b"null", b'"x"', b"{}", b"\xff\xfe", b'{"name": "a"' + b"}" * 10_000):
        response = await client.post(
            "/backends", content=raw, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422, (raw[:20], response.text)
        error_of(response, 422)


async def test_invalid_json_names_line_and_column(client: httpx.AsyncClient) -> None:
    raw = b'{\n  "name": "n1",\n  "baseUrl": ,\n  "type": "ollama"\n}'
    response = await client.post(
        "/backends", content=raw, headers={"Content-Type": "application/json"}
    )
    message = error_of(response, 422)
    assert "not valid JSON" in message
    assert "line 3, column 14" in message, message


# ---- URLs ----------------------------------------------------------------------------------
async def test_backend_urls_carry_no_credentials_or_fragments(
    client: httpx.AsyncClient, store: Store
) -> None:
    for url in (
        "http://user:pass@node:11434",
        "http://user@node:11434",
        "http://127.0.0.1:9@evil.com",
        "http://node:11434/#frag",
        "http://node:11434#",
        "ftp://node",
        "http://",
        "http://node:99999",
        "http://node:0",
        "http://no de",
        "javascript:alert(1)",
        "file:///etc/passwd",
    ):
        response = await client.post("/backends", json=backend_body(url=url))
        error_of(response, 422, "baseUrl")
        assert "pass@" not in response.text
    assert await store.list_all_backends() == []


async def test_link_local_and_denied_networks_are_refused(store: Store, bus: Messenger) -> None:
    policy = UrlPolicy(
        allowed=parse_networks(["10.0.0.0/8", "127.0.0.0/8", "::1/128"], "allow"),
        denied=parse_networks(["169.254.0.0/16", "fe80::/10", "10.9.0.0/16"], "deny"),
    )
    ctx = ApiContext(store=store, messenger=bus, token=TOKEN, url_policy=policy)
    async with make_client(ctx) as client:
        for url in (
            "http://169.254.169.254/latest/meta-data",
            "http://[fe80::1]:11434",
            "http://[::ffff:169.254.169.254]",
            "http://10.9.1.1:11434",
            "http://192.168.1.5:11434",
        ):
            error_of(await client.post("/backends", json=backend_body(url=url)), 400, "baseUrl")
        ok = await client.post("/backends", json=backend_body(url="http://10.1.2.3:11434"))
        assert ok.status_code == 201, ok.text
        moved = await client.put(
            f"/backends/{ok.json()['id']}", json=backend_body(url="http://169.254.1.1")
        )
        error_of(moved, 400, "baseUrl")
    assert [b.base_url for b in await store.list_all_backends()] == ["http://10.1.2.3:11434"]


async def test_the_default_policy_denies_link_local(client: httpx.AsyncClient) -> None:
    response = await client.post("/backends", json=backend_body(url="http://169.254.169.254"))
    assert "169.254" in error_of(response, 400, "baseUrl")


async def test_a_backend_pointing_at_the_service_itself_is_refused(
    store: Store, bus: Messenger
) -> None:
    policy = UrlPolicy()
    policy.serving_at("127.0.0.1", 18080)
    ctx = ApiContext(store=store, messenger=bus, token=TOKEN, url_policy=policy)
    async with make_client(ctx) as client:
        for url in ("http://127.0.0.1:18080", "http://localhost:18080/", "http://[::1]:18080"):
            message = error_of(await client.post("/backends", json=backend_body(url=url)), 400)
            assert "itself" in message
        other_port = await client.post("/backends", json=backend_body(url="http://127.0.0.1:18081"))
        assert other_port.status_code == 201


async def test_a_fleet_file_is_held_to_the_network_policy(store: Store, bus: Messenger) -> None:
    policy = UrlPolicy(denied=parse_networks(["169.254.0.0/16", "10.9.0.0/16"], "deny"))
    policy.serving_at("127.0.0.1", 18080)
    ctx = ApiContext(store=store, messenger=bus, token=TOKEN, url_policy=policy)
    fleet = """\
backends:
  - name: fine
    baseUrl: http://10.1.0.1:11434
    type: ollama
  - name: metadata
    baseUrl: http://169.254.169.254
    type: ollama
  - name: denied
    baseUrl: http://10.9.0.7:11434
    type: ollama
  - name: itself
    baseUrl: http://localhost:18080
    type: ollama
"""
    async with make_client(ctx) as client:
        for params in ({"dryRun": "true"}, {}):
            response = await client.post(
                "/fleet/apply", content=fleet, params={**params, "file": "prod.yaml"}
            )
            message = error_of(response, 422, "backends[1].baseUrl")
            assert "prod.yaml:6: backends[1].baseUrl: the URL resolves to 169.254.169.254" in (
                message
            )
            assert "prod.yaml:9: backends[2].baseUrl: the URL resolves to 10.9.0.7" in message
            assert "prod.yaml:12: backends[3].baseUrl: the URL points at this" in message
            assert await store.list_all_backends() == []
        good = fleet.split("  - name: metadata")[0]
        assert (await client.post("/fleet/apply", content=good)).status_code == 200
        moved = good.replace("10.1.0.1", "10.9.0.1")
        error_of(await client.post("/fleet/apply", content=moved), 422, "backends[0].baseUrl")
    assert [b.base_url for b in await store.list_all_backends()] == ["http://10.1.0.1:11434"]


# ---- limits --------------------------------------------------------------------------------
class CountingBody:
    """A request body that counts how many of its chunks the server pulled."""

    def __init__(self, chunks: int, size: int = 16 * 1024) -> None:
        self.chunks = chunks
        self.size = size
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self.chunks):
            self.pulled += 1
            yield b" " * self.size


async def test_an_oversized_body_is_413_before_it_is_read(
    client: httpx.AsyncClient, store: Store
) -> None:
    declared = CountingBody(chunks=12_800)  # 200 MB announced
    response = await client.post(
        "/backends",
        content=declared,
        headers={"Content-Type": "application/json", "Content-Length": str(200 * 1024 * 1024)},
    )
    assert "larger than" in error_of(response, 413)
    assert response.json()["error"]["code"] == "too_large"
    assert declared.pulled == 0
    # Without a length (chunked), reading stops at the first chunk past the limit.
    streamed = CountingBody(chunks=12_800)
    response = await client.post(
        "/backends", content=streamed, headers={"Content-Type": "application/json"}
    )
    error_of(response, 413)
    assert streamed.pulled <= LIMIT // streamed.size + 1
    assert await store.list_all_backends() == []


async def test_long_paths_and_headers_are_414_and_431(client: httpx.AsyncClient) -> None:
    error_of(await client.get("/backends/" + "a" * 60_000), 414)
    error_of(await client.get("/backends?cursor=" + "c" * 10_000), 414)
    error_of(await client.get("/backends", headers={"X-Filler": "f" * 10_000}), 431)
    many = {f"X-Filler-{i}": "f" * 4000 for i in range(10)}
    error_of(await client.get("/backends", headers=many), 431)
    # Refused before authentication too: nothing past the bounds is looked at.
    error_of(await client.get("/backends/" + "a" * 60_000, headers={"Authorization": ""}), 414)


async def test_bad_paging_and_traversal_never_500(client: httpx.AsyncClient) -> None:
    for query in ("limit=0", "limit=1001", "limit=-1", "limit=abc", "limit=true", "limit=1e3"):
        error_of(await client.get(f"/backends?{query}"), 422, "limit")
    for cursor in ("garbage", "W10", "eyJ4IjoxfQ", "%00", "WzEsIDJd" * 50):
        response = await client.get("/models", params={"cursor": cursor})
        assert response.status_code in {400, 422}, response.text
        error_of(response, response.status_code)
    for path in (
        "/backends/..%2F..%2Fetc%2Fpasswd",
        "/backends/%2e%2e",
        "/models/..%2F..%2Fetc%2Fpasswd",
        "/pools/%00",
        "/pool-by-name/%2e%2e%2f",
    ):
        for method in ("GET", "DELETE"):
            response = await client.request(method, path)
            if response.status_code == 307:
                # Starlette's trailing-slash redirect, to the same route without the slash.
                assert response.headers["location"].startswith("http://api/pool-by-name/")
                continue
            assert response.status_code in {404, 405, 422}, (method, path, response.text)
            error_of(response, response.status_code)


async def test_a_token_in_the_query_string_is_not_accepted(client: httpx.AsyncClient) -> None:
    for query in (f"token={TOKEN}", f"access_token={TOKEN}", f"api_key={TOKEN}"):
        response = await client.get(f"/backends?{query}", headers={"Authorization": ""})
        error_of(response, 401)
        assert TOKEN not in response.text


# ---- per-backend credentials ---------------------------------------------------------------
async def test_a_backend_credential_is_write_only(client: httpx.AsyncClient, store: Store) -> None:
    secret = "vllm-secret-0123456789-WXYZ"
    created = await client.post("/backends", json=backend_body(apiKey=secret, type="vllm"))
    assert created.status_code == 201, created.text
    backend_id = created.json()["id"]
    answers = [created, await client.get(f"/backends/{backend_id}"), await client.get("/backends")]
    for answer in answers:
        assert secret not in answer.text
    assert created.json()["apiKey"] == "****WXYZ"
    assert answers[2].json()[0]["apiKey"] == "****WXYZ"
    key = f"backend-credential:{backend_id}"
    assert (await store.get_kv(key)).value == {"APIKey": secret, "Type": "vllm"}
    # PUT without apiKey keeps it, with a new one replaces it, with null removes it.
    kept = await client.put(f"/backends/{backend_id}", json=backend_body(name="n2", type="vllm"))
    assert kept.json()["apiKey"] == "****WXYZ"
    changed = await client.put(
        f"/backends/{backend_id}",
        json=backend_body(apiKey="other-secret-0123456789-ABCD", type="vllm"),
    )
    assert changed.json()["apiKey"] == "****ABCD"
    removed = await client.put(
        f"/backends/{backend_id}", json=backend_body(apiKey=None, type="vllm")
    )
    assert removed.json()["apiKey"] is None
    assert (await store.list_kv_prefix("backend-credential:")).items == []
    # A refused declaration leaves no credential behind; a deleted backend takes its own along.
    duplicate = await client.post("/backends", json=backend_body(apiKey=secret, type="vllm"))
    error_of(duplicate, 409)
    await client.put(f"/backends/{backend_id}", json=backend_body(apiKey=secret, type="vllm"))
    assert (await client.delete(f"/backends/{backend_id}")).status_code == 204
    assert (await store.list_kv_prefix("backend-credential:")).items == []
    for bad in ("short", "with\nnewline-0123456789", 12345678901):
        error_of(
            await client.post("/backends", json=backend_body(apiKey=bad, type="vllm")),
            422,
            "apiKey",
        )


# ---- audit ---------------------------------------------------------------------------------
async def test_every_change_writes_one_audit_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-audit-0123456789abcdef"
    caplog.set_level(logging.INFO, logger="runtimestate.audit")
    created = await client.post("/backends", json=backend_body())
    backend_id = created.json()["id"]
    await client.post("/backends", json=backend_body())  # 409
    await client.get("/backends")  # a read: not audited
    await client.post("/providers/openai/configure", json={"apiKey": secret})
    await client.delete(f"/backends/{backend_id}")
    await client.delete("/models/nothing", headers={"Authorization": "Bearer wrong-token-123"})
    records = [r for r in caplog.records if r.name == "runtimestate.audit"]
    seen = [
        (r.action, r.outcome, r.status, r.token_id)  # type: ignore[attr-defined]
        for r in records
    ]
    mine = token_id(TOKEN)
    assert seen == [
        ("create_backend", "ok", 201, mine),
        ("create_backend", "refused", 409, mine),
        ("configure", "ok", 200, mine),
        ("delete_backend", "ok", 204, mine),
        ("delete_model", "refused", 401, None),
    ]
    assert records[0].target == {"id": backend_id}  # type: ignore[attr-defined]
    assert records[2].target == {"provider": "openai"}  # type: ignore[attr-defined]
    assert records[3].target == {"backend_id": backend_id}  # type: ignore[attr-defined]
    for record in records:
        text = str(vars(record))
        assert TOKEN not in text
        assert secret not in text
