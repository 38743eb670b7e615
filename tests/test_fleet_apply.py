"""``POST /fleet/apply`` and ``GET /fleet/export`` through the real app, on both store engines:
the round trip, dry runs that match the apply, all-or-nothing, prune, and errors with lines.

Ground truth is read from the store itself (and through the CRUD routes), never from the
answer of the route under test.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml

from runtimestate.api import ApiContext, create_app
from runtimestate.api.fleetfile import SCHEMA_PATH, fleet_schema
from runtimestate.bus import Messenger
from runtimestate.errors import NotFound
from runtimestate.store import Store

TOKEN = "fleet-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

FLEET = """\
version: 1
backends:
  - name: gpu-1
    baseUrl: http://10.0.0.1:11434
    type: ollama
  - name: gpu-2
    baseUrl: http://10.0.0.2:11434
    type: ollama
  - name: openai
    baseUrl: https://api.openai.com/v1
    type: openai
models:
  - model: llama3.2:1b
    contextLength: 8192
    canChat: true
    canStream: true
  - model: nomic-embed-text
    canEmbed: true
pools:
  - name: chat
    purposeType: chat
    backends: [gpu-1, gpu-2]
    models: [llama3.2:1b]
  - name: embed
    purposeType: embed
    backends: [gpu-2]
    models: [nomic-embed-text]
"""


@pytest.fixture
async def client(store: Store, bus: Messenger) -> AsyncIterator[httpx.AsyncClient]:
    ctx = ApiContext(store=store, messenger=bus, token=TOKEN)
    transport = httpx.ASGITransport(app=create_app(ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://api", headers=AUTH) as c:
        yield c


async def apply(client: httpx.AsyncClient, text: str, **params: str) -> tuple[int, dict[str, Any]]:
    response = await client.post(
        "/fleet/apply",
        content=text.encode(),
        params=params,
        headers={"Content-Type": "application/yaml"},
    )
    return response.status_code, response.json()


async def snapshot(store: Store) -> dict[str, Any]:
    """Everything declared, by name, straight from the store."""
    backends = {b.id: b for b in await store.list_all_backends()}
    models = {m.id: m for m in await store.list_all_models()}
    pools = {p.id: p for p in await store.list_all_pools()}
    return {
        "backends": sorted((b.name, b.base_url, b.type) for b in backends.values()),
        "models": sorted(
            (m.model, m.context_length, m.can_chat, m.can_embed, m.can_prompt, m.can_stream)
            for m in models.values()
        ),
        "pools": sorted((p.name, p.purpose_type) for p in pools.values()),
        "pool_backends": sorted(
            (pools[p].name, backends[b].name) for p, b in await store.list_pool_backends()
        ),
        "pool_models": sorted(
            (pools[p].name, models[m].model) for p, m in await store.list_pool_models()
        ),
    }


async def test_apply_declares_the_file_and_a_second_apply_changes_nothing(
    client: httpx.AsyncClient, store: Store
) -> None:
    status, plan = await apply(client, FLEET)
    assert status == 200, plan
    assert plan["applied"] is True
    assert plan["counts"] == {
        "added": 3 + 2 + 2 + 3 + 2,
        "changed": 0,
        "removed": 0,
        "unchanged": 0,
        "undeclared": 0,
    }
    assert await snapshot(store) == {
        "backends": [
            ("gpu-1", "http://10.0.0.1:11434", "ollama"),
            ("gpu-2", "http://10.0.0.2:11434", "ollama"),
            ("openai", "https://api.openai.com/v1", "openai"),
        ],
        "models": [
            ("llama3.2:1b", 8192, True, False, False, True),
            ("nomic-embed-text", 0, False, True, False, False),
        ],
        "pools": [("chat", "chat"), ("embed", "embed")],
        "pool_backends": [("chat", "gpu-1"), ("chat", "gpu-2"), ("embed", "gpu-2")],
        "pool_models": [("chat", "llama3.2:1b"), ("embed", "nomic-embed-text")],
    }
    before = await snapshot(store)
    updated = {b.name: b.updated_at for b in await store.list_all_backends()}

    status, again = await apply(client, FLEET)
    assert status == 200
    assert again["applied"] is False
    assert again["changes"] == []
    assert again["counts"]["unchanged"] == 12
    assert await snapshot(store) == before
    # Nothing was rewritten either.
    assert {b.name: b.updated_at for b in await store.list_all_backends()} == updated


async def test_export_round_trips_and_applying_it_is_a_no_op(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await apply(client, FLEET))[0] == 200
    # Declared through the CRUD routes too, so the export is not just the file echoed back.
    extra = {"name": "cpu-1", "baseUrl": "http://10.0.0.9:11434", "type": "vllm"}
    assert (await client.post("/backends", json=extra)).status_code == 201
    exported = await client.get("/fleet/export")
    assert exported.status_code == 200
    assert exported.headers["content-type"].startswith("application/yaml")
    text = exported.text
    data = yaml.safe_load(text)
    assert [b["name"] for b in data["backends"]] == ["cpu-1", "gpu-1", "gpu-2", "openai"]
    before = await snapshot(store)

    status, plan = await apply(client, text, prune="true")
    assert status == 200
    assert plan["applied"] is False
    assert plan["changes"] == []
    assert await snapshot(store) == before
    assert (await client.get("/fleet/export")).text == text

    # JSON is a fleet file too, and the export in JSON is the same declaration.
    as_json = (await client.get("/fleet/export", params={"format": "json"})).json()
    assert as_json == data
    status, plan = await apply(client, json.dumps(as_json), prune="true")
    assert (status, plan["changes"]) == (200, [])


async def test_exported_ids_let_a_rename_apply_as_a_change(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await apply(client, FLEET))[0] == 200
    text = (await client.get("/fleet/export")).text
    renamed = text.replace("name: gpu-1", "name: gpu-one").replace("- gpu-1", "- gpu-one")
    status, plan = await apply(client, renamed, prune="true")
    assert status == 200, plan
    assert plan["changes"] == [
        {
            "action": "change",
            "kind": "backend",
            "name": "gpu-one",
            "fields": {"name": ["gpu-1", "gpu-one"]},
        }
    ]
    assert ("chat", "gpu-one") in (await snapshot(store))["pool_backends"]


async def test_dry_run_shows_exactly_what_apply_then_does(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await apply(client, FLEET))[0] == 200
    changed = (
        FLEET.replace("http://10.0.0.2:11434", "http://10.0.0.22:11434")
        .replace("contextLength: 8192", "contextLength: 4096")
        .replace("backends: [gpu-1, gpu-2]", "backends: [gpu-1, gpu-3]")
        .replace(
            "  - name: openai\n    baseUrl: https://api.openai.com/v1\n    type: openai\n",
            "  - name: gpu-3\n    baseUrl: http://10.0.0.3:11434\n    type: vllm\n",
        )
    )
    before = await snapshot(store)
    status, dry = await apply(client, changed, dryRun="true", prune="true")
    assert status == 200, dry
    assert dry["dryRun"] is True
    assert dry["applied"] is False
    assert await snapshot(store) == before

    status, done = await apply(client, changed, prune="true")
    assert status == 200
    assert done["changes"] == dry["changes"]
    assert done["counts"] == dry["counts"]
    assert {(c["action"], c["kind"], c["name"]) for c in done["changes"]} == {
        ("change", "backend", "gpu-2"),
        ("change", "model", "llama3.2:1b"),
        ("add", "backend", "gpu-3"),
        ("remove", "backend", "openai"),
        ("add", "pool-backend", "chat/gpu-3"),
        ("remove", "pool-backend", "chat/gpu-2"),
    }
    after = await snapshot(store)
    assert ("gpu-2", "http://10.0.0.22:11434", "ollama") in after["backends"]
    assert ("gpu-3", "http://10.0.0.3:11434", "vllm") in after["backends"]
    assert "openai" not in {name for name, _, _ in after["backends"]}
    assert after["pool_backends"] == [("chat", "gpu-1"), ("chat", "gpu-3"), ("embed", "gpu-2")]


async def test_without_prune_nothing_is_removed(client: httpx.AsyncClient, store: Store) -> None:
    assert (await apply(client, FLEET))[0] == 200
    smaller = "backends:\n  - name: gpu-1\n    baseUrl: http://10.0.0.1:11434\n    type: ollama\n"
    smaller += "pools:\n  - name: chat\n    purposeType: chat\n    backends: [gpu-1]\n"
    before = await snapshot(store)
    status, plan = await apply(client, smaller)
    assert status == 200
    assert plan["changes"] == []
    # gpu-2, openai, both models, the embed pool and four memberships are kept.
    assert plan["counts"]["undeclared"] == 2 + 2 + 1 + 4
    assert await snapshot(store) == before

    status, plan = await apply(client, smaller, prune="true")
    assert status == 200
    assert plan["counts"]["removed"] == 2 + 2 + 1 + 4
    assert await snapshot(store) == {
        "backends": [("gpu-1", "http://10.0.0.1:11434", "ollama")],
        "models": [],
        "pools": [("chat", "chat")],
        "pool_backends": [("chat", "gpu-1")],
        "pool_models": [],
    }


async def test_an_invalid_entry_in_the_middle_applies_nothing_and_names_line_and_field(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await apply(client, FLEET))[0] == 200
    before = await snapshot(store)
    lines = FLEET.splitlines()
    # The second backend's URL (line 7) is broken; the entries around it are new or changed.
    assert lines[6] == "    baseUrl: http://10.0.0.2:11434"
    lines[6] = "    baseUrl: ftp://10.0.0.2"
    lines[3] = "    baseUrl: http://10.0.0.11:11434"
    text = "\n".join(lines) + "\n  - name: new-pool\n    purposeType: x\n"
    response = await client.post("/fleet/apply", content=text, params={"file": "prod.yaml"})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_input"
    assert error["field"] == "backends[1].baseUrl"
    assert error["message"].startswith("prod.yaml:7: backends[1].baseUrl: must be an http")
    assert await snapshot(store) == before


async def test_every_problem_is_reported_with_its_line(client: httpx.AsyncClient) -> None:
    text = """\
backends:
  - name: a
    baseUrl: http://10.0.0.1
    type: ollama
    type: vllm
  - name: a
    baseUrl: http://10.0.0.2
    type: potato
models:
  - model: m
    contextLength: -1
    colour: blue
pools:
  - name: p
    purposeType: chat
    backends: [nobody]
"""
    response = await client.post("/fleet/apply", content=text, params={"file": "f.yaml"})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    # YAML's own rule (the last duplicate key wins) would hide the first: it is refused.
    assert message == "f.yaml:5: backends[0].type: is given twice in one mapping"

    text = text.replace("    type: vllm\n", "")
    message = (await client.post("/fleet/apply", content=text, params={"file": "f.yaml"})).json()[
        "error"
    ]["message"]
    assert "f.yaml:7: backends[1].type: Input should be 'ollama'" in message
    assert "f.yaml:10: models[0].contextLength: Input should be greater than or equal to 0" in (
        message
    )
    assert "f.yaml:11: models[0].colour: Extra inputs are not permitted" in message

    valid = text.replace("potato", "vllm").replace("-1", "1").replace("    colour: blue\n", "")
    message = (await client.post("/fleet/apply", content=valid, params={"file": "f.yaml"})).json()[
        "error"
    ]["message"]
    assert "f.yaml:5: backends[1].name: 'a' is already declared at backends[0]" in message
    valid = valid.replace(
        "  - name: a\n    baseUrl: http://10.0.0.2", "  - name: b\n    baseUrl: http://10.0.0.2"
    )
    response = await client.post("/fleet/apply", content=valid, params={"file": "f.yaml"})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "f.yaml:14: pools[0].backends[0]: backend 'nobody' is declared nowhere"
    )
    bad_yaml = await client.post("/fleet/apply", content="backends: [\n", params={"file": "f"})
    assert bad_yaml.status_code == 422
    assert bad_yaml.json()["error"]["message"].startswith("f:2: ")


async def test_a_refused_write_rolls_back_every_earlier_write(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await apply(client, FLEET))[0] == 200
    before = await snapshot(store)
    # Valid on its own, but swapping two base URLs collides inside the store's unique index
    # after the pruning deletes and the first update have run: all of it must be undone.
    swapped = (
        FLEET.replace("http://10.0.0.1:11434", "SWAP")
        .replace("http://10.0.0.2:11434", "http://10.0.0.1:11434")
        .replace("SWAP", "http://10.0.0.2:11434")
        .replace("  - model: nomic-embed-text\n    canEmbed: true\n", "")
        .replace("    models: [nomic-embed-text]\n", "")
    )
    status, body = await apply(client, swapped, prune="true")
    assert status == 409, body
    assert await snapshot(store) == before


async def test_an_id_cannot_change_and_a_taken_url_is_refused_before_writing(
    client: httpx.AsyncClient, store: Store
) -> None:
    assert (await apply(client, FLEET))[0] == 200
    before = await snapshot(store)
    with_id = FLEET.replace("  - name: gpu-2\n", "  - name: gpu-2\n    id: other-id\n")
    response = await client.post("/fleet/apply", content=with_id, params={"file": "f"})
    assert response.status_code == 422
    assert response.json()["error"]["message"] == (
        "f:7: backends[1].id: 'gpu-2' is declared with id "
        f"{(await store.get_backend_by_name('gpu-2')).id!r}; an id cannot change"
    )
    taken = "backends:\n  - name: other\n    baseUrl: http://10.0.0.1:11434\n    type: ollama\n"
    response = await client.post("/fleet/apply", content=taken, params={"file": "f"})
    assert response.status_code == 422
    assert (
        "f:3: backends[0].baseUrl: backend 'gpu-1' already has this base URL"
        in (response.json()["error"]["message"])
    )
    assert await snapshot(store) == before


def test_the_shipped_json_schema_is_the_generated_one() -> None:
    shipped = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert shipped == fleet_schema(), (
        "regenerate it: python -c 'from runtimestate.api.fleetfile import write_schema; "
        "write_schema()'"
    )


async def test_the_schema_is_served_and_describes_the_file(client: httpx.AsyncClient) -> None:
    served = (await client.get("/fleet/schema")).json()
    assert served == fleet_schema()
    backend = served["$defs"]["FleetBackend"]
    assert set(backend["required"]) == {"name", "baseUrl", "type"}
    assert backend["additionalProperties"] is False
    assert (await client.get("/fleet/schema", headers={"Authorization": ""})).status_code == 401


SECRET_VALUE = "sk-vllm-shared-0123456789abcdef"
ROTATED_VALUE = "sk-vllm-rotated-0123456789abcdef"
WITH_SECRET = """\
backends:
  - name: vllm-1
    baseUrl: http://10.0.1.1:8000
    type: vllm
    apiKeySecret: vllm-key
  - name: vllm-2
    baseUrl: http://10.0.1.2:8000
    type: vllm
"""


async def credential(store: Store, name: str) -> dict[str, Any] | None:
    """A backend's stored credential, read from the store (opened by its master key)."""
    (backend,) = [b for b in await store.list_all_backends() if b.name == name]
    try:
        value = (await store.get_kv(f"backend-credential:{backend.id}")).value
    except NotFound:
        return None
    assert isinstance(value, dict)
    return value


async def test_a_file_names_a_backends_secret_and_never_holds_it(
    client: httpx.AsyncClient, store: Store
) -> None:
    status, body = await apply(client, WITH_SECRET, file="prod.yaml")
    assert status == 422
    assert body["error"]["field"] == "backends[0].apiKeySecret"
    assert body["error"]["message"].startswith(
        "prod.yaml:5: backends[0].apiKeySecret: no secret named 'vllm-key'"
    )
    assert await store.list_all_backends() == []

    made = await client.put("/secrets/vllm-key", json={"value": SECRET_VALUE})
    assert made.status_code == 200, made.text
    assert made.json() == {"name": "vllm-key", "value": "****cdef", "usedBy": []}
    status, body = await apply(client, WITH_SECRET, dryRun="true")
    assert status == 200
    added = {c["name"]: c["fields"] for c in body["changes"] if c["kind"] == "backend"}
    assert added["vllm-1"]["apiKeySecret"] == "vllm-key"
    assert "apiKeySecret" not in added["vllm-2"]
    assert await store.list_all_backends() == []

    status, body = await apply(client, WITH_SECRET)
    assert status == 200
    assert body["applied"]
    assert await credential(store, "vllm-1") == {
        "APIKey": SECRET_VALUE,
        "Type": "vllm",
        "Secret": "vllm-key",
    }
    assert await credential(store, "vllm-2") is None
    listed = (await client.get("/backends")).json()
    assert {b["name"]: b["apiKey"] for b in listed} == {"vllm-1": "****cdef", "vllm-2": None}
    status, body = await apply(client, WITH_SECRET)
    assert (status, body["applied"], body["counts"]["unchanged"]) == (200, False, 2)

    exported = (await client.get("/fleet/export")).text
    assert "apiKeySecret: vllm-key" in exported
    assert SECRET_VALUE not in exported
    status, body = await apply(client, exported)
    assert (status, body["applied"]) == (200, False)

    # Rotating the secret re-writes every credential that names it, in one step.
    vllm_1 = next(b["id"] for b in listed if b["name"] == "vllm-1")
    rotated = await client.put("/secrets/vllm-key", json={"value": ROTATED_VALUE})
    assert rotated.json()["usedBy"] == [vllm_1]
    assert (await credential(store, "vllm-1") or {})["APIKey"] == ROTATED_VALUE
    refused = await client.delete("/secrets/vllm-key")
    assert refused.status_code == 409
    assert vllm_1 in refused.json()["error"]["message"]
    secrets = (await client.get("/secrets")).json()
    assert secrets[0]["value"] == "****cdef"
    assert ROTATED_VALUE not in json.dumps(secrets)

    # Another name in the file moves the backend to that secret; a direct key drops the name.
    await client.put("/secrets/other-key", json={"value": "sk-other-0123456789abcdef"})
    status, body = await apply(client, WITH_SECRET.replace("vllm-key", "other-key"))
    assert body["changes"] == [
        {
            "action": "change",
            "kind": "backend",
            "name": "vllm-1",
            "fields": {"apiKeySecret": ["vllm-key", "other-key"]},
        }
    ]
    assert (await credential(store, "vllm-1") or {})["Secret"] == "other-key"
    assert (await client.delete("/secrets/vllm-key")).status_code == 204
    assert [s["name"] for s in (await client.get("/secrets")).json()] == ["other-key"]


async def test_a_key_for_a_backend_type_that_takes_none_is_refused(
    client: httpx.AsyncClient, store: Store
) -> None:
    """An Ollama node takes no key and a cloud backend uses its account's: a key given to one
    of them would be stored and never sent, so it is refused - by the API and in a file."""
    key = "sk-unused-0123456789abcdef"
    for backend_type, hint in (("ollama", "never sent"), ("openai", "/providers/openai")):
        declared = {"name": "b", "baseUrl": "http://10.0.2.1:8000", "type": backend_type}
        refused = await client.post("/backends", json={**declared, "apiKey": key})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["field"] == "apiKey"
        assert hint in refused.json()["error"]["message"]
        assert key not in refused.text
    assert await store.list_all_backends() == []

    made = await client.post(
        "/backends",
        json={"name": "v", "baseUrl": "http://10.0.2.2:8000", "type": "vllm", "apiKey": key},
    )
    assert made.status_code == 201, made.text
    assert made.json()["apiKey"] == "****cdef"
    assert await credential(store, "v") is not None
    # Turned into a type that takes no key, the backend does not keep one it would never send.
    backend_id = made.json()["id"]
    moved = await client.put(
        f"/backends/{backend_id}",
        json={"name": "v", "baseUrl": "http://10.0.2.2:8000", "type": "ollama"},
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["apiKey"] is None
    assert await credential(store, "v") is None

    assert (await client.put("/secrets/node-key", json={"value": SECRET_VALUE})).status_code == 200
    status, body = await apply(
        client,
        "backends:\n  - name: n1\n    baseUrl: http://10.0.2.3:11434\n    type: ollama\n"
        "    apiKeySecret: node-key\n",
        file="nodes.yaml",
    )
    assert status == 422
    assert body["error"]["field"] == "backends[0].apiKeySecret"
    assert "Ollama backends take no key" in body["error"]["message"]
