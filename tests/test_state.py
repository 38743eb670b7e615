"""The backend cycle end to end: real drivers over sockets against the emulators, on both stores.

Covers the backend cycle and the weaknesses of the Go runtimestate package that live in it
(sequential I/O, tag normalization, silent failures). Cloud drivers have their own file,
``test_state_cloud.py``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from datetime import timedelta

import pytest

from runtimestate.backends import HttpClient
from runtimestate.bus import Messenger
from runtimestate.clock import FakeClock
from runtimestate.errors import InvalidInput, StoreError
from runtimestate.metrics import REGISTRY
from runtimestate.records import LLMState
from runtimestate.state import State
from runtimestate.store import Store
from runtimestate.testing import Emulator, OllamaNode
from runtimestate.testing.store import FaultyStore
from tests.fixtures.common import EMULATOR_KEY_HOSTS
from tests.fixtures.polling import eventually


def metric(name: str, **labels: str) -> float:
    """A sample read through the registry's public API (0 before the series exists)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def declare_chat(store: Store, *names: str) -> None:
    for name in names:
        await store.append_model(
            model=name, context_length=4096, can_chat=True, can_prompt=True, can_stream=True
        )


def paths(node: OllamaNode, method: str, path: str) -> list[object]:
    return [r.json for r in node.requests if r.method == method and r.path == path]


async def jobs(store: Store) -> list[tuple[str, str]]:
    """The pull tasks, as (backend id, model)."""
    return [(t.backend_id, t.model) for t in await store.list_pull_tasks()]


async def test_construction_refuses_missing_store_or_messenger(
    store: Store, bus: Messenger
) -> None:
    with pytest.raises(InvalidInput) as missing_store:
        State(None, bus)  # type: ignore[arg-type]
    assert missing_store.value.field == "store"
    with pytest.raises(InvalidInput) as missing_bus:
        State(store, None)  # type: ignore[arg-type]
    assert missing_bus.value.field == "messenger"


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("concurrency", 0),
        ("backend_timeout", 0.0),
        ("list_cache_ttl", -1.0),
    ],
)
async def test_construction_refuses_nonsense_options(
    store: Store, bus: Messenger, option: str, value: float
) -> None:
    with pytest.raises(InvalidInput) as refused:
        State(store, bus, **{option: value})  # type: ignore[arg-type]
    assert refused.value.field == option


async def test_states_serialize_to_the_go_packages_json(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3"])
    ok = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    odd = await store.create_backend(name="odd", base_url="http://127.0.0.1:1", type="llamafile")
    await declare_chat(store, "llama3")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        snapshot = state.get()
    good = json.loads(snapshot[ok.id].model_dump_json())
    # The Go package's keys, plus the two this project adds: when and how fast it was observed.
    assert set(good) == {"id", "name", "models", "pulledModels", "backend"} | {
        "observedAt",
        "latencySeconds",
    }
    assert (good["id"], good["name"], good["models"]) == (ok.id, "n1", ["llama3"])
    (pulled,) = good["pulledModels"]
    assert set(pulled) == {
        "name",
        "model",
        "modifiedAt",
        "size",
        "digest",
        "details",
        "contextLength",
        "canChat",
        "canEmbed",
        "canPrompt",
        "canStream",
    }
    assert set(pulled["details"]) == {
        "parentModel",
        "format",
        "family",
        "families",
        "parameterSize",
        "quantizationLevel",
    }
    assert (pulled["name"], pulled["contextLength"], pulled["canChat"]) == (
        "llama3:latest",
        4096,
        True,
    )
    assert pulled["digest"] == node.models["llama3:latest"].digest
    failed = json.loads(snapshot[odd.id].model_dump_json())
    assert failed["error"] == "Unsupported backend type: llamafile"
    assert failed["pulledModels"] == []


async def test_steady_state_compares_normalized_names(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3", "qwen2:0.5b"])
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3:latest", "registry.ollama.ai/library/Qwen2:0.5b")
    async with State(store, bus) as state:
        for _ in range(2):
            await state.run_backend_cycle()
        snapshot = state.get()
    assert await jobs(store) == []
    assert paths(node, "DELETE", "/api/delete") == []
    observed = snapshot[backend.id]
    assert observed.error == ""
    assert sorted(m.name for m in observed.pulled_models) == ["llama3:latest", "qwen2:0.5b"]
    assert all(m.context_length == 4096 and m.can_chat for m in observed.pulled_models)


async def test_missing_models_queue_one_task_each_once(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3"])
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3", "phi3:mini", "gemma2:2b")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        first = await store.list_pull_tasks()
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    assert await jobs(store) == [(backend.id, "phi3:mini"), (backend.id, "gemma2:2b")]
    # The second cycle found both tasks and left them exactly as they were.
    assert await store.list_pull_tasks() == first
    assert observed.error == ""
    assert [(d.model, d.status) for d in observed.downloads] == [
        ("phi3:mini", "queued"),
        ("gemma2:2b", "queued"),
    ]
    assert paths(node, "POST", "/api/pull") == []


async def test_no_queueing_while_a_pull_of_the_model_runs(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1")
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "phi3:mini")
    await store.add_pull_tasks([(backend.id, "phi3:mini")])
    claimed = await store.claim_pull_task(owner="other", stale_after=timedelta(minutes=5))
    assert claimed is not None
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    assert await store.list_pull_tasks() == [claimed]
    assert [(d.status, d.worker) for d in observed.downloads] == [("running", "other")]


async def test_undeclared_models_are_deleted_then_listed_again(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3", "junk:1b"])
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        (observed,) = state.get().values()
        assert paths(node, "DELETE", "/api/delete") == [{"model": "junk:1b"}]
        assert len(paths(node, "GET", "/api/tags")) == 2
        assert [m.name for m in observed.pulled_models] == ["llama3:latest"]
        await state.run_backend_cycle()
    # Nothing deleted the second time, so one listing only.
    assert len(paths(node, "GET", "/api/tags")) == 3
    assert "junk:1b" not in node.models


async def test_every_action_is_logged_with_the_backend_id(
    store: Store, bus: Messenger, emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    node = emu.add_ollama("n1", models=["junk:1b"])
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    deleted_before = metric("runtimestate_models_deleted_total")
    with caplog.at_level(logging.INFO, logger="runtimestate"):
        async with State(store, bus) as state:
            await state.run_backend_cycle()
    assert metric("runtimestate_models_deleted_total") == deleted_before + 1
    actions = {
        r.getMessage(): (getattr(r, "backend_id", None), getattr(r, "model", None))
        for r in caplog.records
    }
    assert actions["download queued"] == (backend.id, "llama3")
    assert actions["model deleted"] == (backend.id, "junk:1b")


async def test_deletion_can_be_turned_off_and_drift_is_reported(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3", "junk:1b"])
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    async with State(store, bus, delete_undeclared=False) as state:
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    assert paths(node, "DELETE", "/api/delete") == []
    assert observed.undeclared_models == ("junk:1b",)
    assert observed.error == ""
    assert "undeclaredModels" in observed.model_dump(mode="json")


async def test_failed_delete_is_logged_and_shown(
    store: Store, bus: Messenger, emu: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    node = emu.add_ollama("n1", models=["llama3", "junk:1b"])
    node.faults.fail(status=500, body=b'{"error":"disk on fire"}', path="/api/delete")
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    failures_before = metric("runtimestate_backend_failures_total", type="ollama")
    deleted_before = metric("runtimestate_models_deleted_total")
    with caplog.at_level(logging.INFO, logger="runtimestate"):
        async with State(store, bus) as state:
            await state.run_backend_cycle()
            observed = state.get()[backend.id]
    assert metric("runtimestate_backend_failures_total", type="ollama") == failures_before + 1
    assert metric("runtimestate_models_deleted_total") == deleted_before
    assert "delete junk:1b failed" in observed.error
    assert "HTTP 500" in observed.error
    assert "disk on fire" in observed.error
    assert [m.name for m in observed.pulled_models] == ["llama3:latest"]
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert any(getattr(r, "backend_id", None) == backend.id for r in failures)


async def test_a_delete_answered_404_is_not_counted_as_a_deletion(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    # Another replica (or the operator) deleted the model between this cycle's listing and its
    # delete: the node answers 404. Counted are the deletes the node carried out.
    node = emu.add_ollama("n1", models=["llama3", "junk:1b"])
    node.faults.fail(
        status=404, body=b'{"error":"model \'junk:1b\' not found"}', path="/api/delete", times=1
    )
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    deleted_before = metric("runtimestate_models_deleted_total")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        assert len(paths(node, "DELETE", "/api/delete")) == 1
        assert metric("runtimestate_models_deleted_total") == deleted_before
        assert state.get()[backend.id].error == ""
        await state.run_backend_cycle()
    assert len(paths(node, "DELETE", "/api/delete")) == 2
    assert "junk:1b" not in node.models
    assert metric("runtimestate_models_deleted_total") == deleted_before + 1


async def test_failed_queue_insert_is_logged_and_shown(
    store: Store,
    bus: Messenger,
    emu: Emulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    node = emu.add_ollama("n1")
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "phi3:mini")
    faulty = FaultyStore(store)
    faulty.fail("add_pull_tasks", StoreError("database is locked"))
    with caplog.at_level(logging.INFO, logger="runtimestate"):
        async with State(faulty, bus) as state:
            await state.run_backend_cycle()
            observed = state.get()[backend.id]
    assert observed.error == "queueing downloads failed: database is locked"
    assert any(
        getattr(r, "backend_id", None) == backend.id and r.levelno >= logging.WARNING
        for r in caplog.records
    )


async def test_undeclared_capabilities_come_from_show_once_per_digest(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1")
    node.add_model("nomic-embed-text", capabilities=("embedding",), context_length=8192)
    node.add_model("llama3", capabilities=("completion", "tools"), context_length=131072)
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await store.append_model(model="nomic-embed-text")
    await store.append_model(model="llama3", context_length=4096)
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    by_name = {m.name: m for m in observed.pulled_models}
    embed = by_name["nomic-embed-text:latest"]
    assert (embed.context_length, embed.can_embed, embed.can_chat) == (8192, True, False)
    chat = by_name["llama3:latest"]
    # The declared context wins; the undeclared flags come from "completion".
    assert (chat.context_length, chat.can_chat, chat.can_prompt, chat.can_stream) == (
        4096,
        True,
        True,
        True,
    )
    assert len(paths(node, "POST", "/api/show")) == 2


async def test_a_failed_show_keeps_the_inventory(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3"])
    node.faults.fail(status=500, body=b'{"error":"show broke"}', path="/api/show")
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await store.append_model(model="llama3")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        (observed,) = state.get().values()
    assert [m.name for m in observed.pulled_models] == ["llama3:latest"]
    assert observed.error.startswith("show llama3:latest: HTTP 500")
    assert "show broke" in observed.error


async def test_steady_cycles_still_see_every_change(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3"])
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        (first,) = state.get().values()
        await state.run_backend_cycle()
        (steady,) = state.get().values()
        declared = await store.get_model_by_name("llama3")
        await store.update_model(
            declared.id,
            model="llama3",
            context_length=2048,
            can_chat=False,
            can_embed=True,
            can_prompt=False,
            can_stream=False,
        )
        await state.run_backend_cycle()
        (updated,) = state.get().values()
        node.add_model("llama3", context_length=4096)
        await state.run_backend_cycle()
        (replaced,) = state.get().values()
    assert steady == first
    assert (updated.pulled_models[0].context_length, updated.pulled_models[0].can_embed) == (
        2048,
        True,
    )
    assert replaced.pulled_models[0].modified_at != updated.pulled_models[0].modified_at


async def test_backends_are_reconciled_concurrently(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    # Every listing is held at the emulator until all twenty are in flight at once: reconciled
    # one after another, the second listing would never be asked for.
    nodes = []
    for i in range(20):
        node = emu.add_ollama(f"n{i}", models=["llama3"])
        node.faults.hang(path="/api/tags")
        nodes.append(node)
        await store.create_backend(name=f"n{i}", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    # A clock nobody moves: no backend's deadline can pass while the listings are held.
    async with State(store, bus, clock=FakeClock()) as state:
        cycle = asyncio.create_task(state.run_backend_cycle())
        await eventually(lambda: emu.active == 20, what="twenty listings in flight at once")
        for node in nodes:
            node.faults.clear()
        await cycle
        assert not any(s.error for s in state.get().values())


async def test_concurrency_is_bounded(store: Store, bus: Messenger, emu: Emulator) -> None:
    nodes = []
    for i in range(6):
        node = emu.add_ollama(f"n{i}", models=["llama3"])
        node.faults.hang(path="/api/tags")
        nodes.append(node)
        await store.create_backend(name=f"n{i}", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3")
    released: list[OllamaNode] = []

    def held() -> OllamaNode | None:
        return next((n for n in nodes if n.active and n not in released), None)

    async with State(store, bus, concurrency=2, clock=FakeClock()) as state:
        cycle = asyncio.create_task(state.run_backend_cycle())
        # Release the held listings one at a time, as each arrives.
        for _ in nodes:
            node = await eventually(held, what="a held listing")
            released.append(node)
            node.faults.clear()
        await cycle
        assert not any(s.error for s in state.get().values())
    # Counted at the emulator: never more than two backends' requests at once, and two.
    assert emu.max_active == 2


async def test_a_driver_bug_escapes_and_leaves_no_backend_running(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    slow = emu.add_ollama("slow", models=["llama3"])
    slow.faults.hang()
    account = emu.add_openai("acct", api_key="sk-test-0123456789abcdef")
    faulty = FaultyStore(store)
    await faulty.create_backend(name="slow", base_url=slow.base_url, type="ollama")
    await faulty.create_backend(name="buggy", base_url=account.base_url, type="openai")
    # The cloud driver reads its key from the store while it observes; an exception no store
    # raises, there, is a bug inside a driver's run - not a backend's failure.
    faulty.fail("get_kv", KeyError("a bug"))
    async with State(faulty, bus, key_hosts=EMULATOR_KEY_HOSTS) as state:
        with pytest.raises(KeyError, match="a bug"):
            await state.run_backend_cycle()
        # Checked before the reconciler closes its HTTP session, which would end them anyway.
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("backend ")]
    assert faulty.calls["get_kv"] == 1
    # Ground truth at the emulator: the hung backend's request was closed, not left behind.
    await eventually(lambda: slow.active == 0, what="the hung listing closed")


async def test_a_hanging_backend_costs_the_cycle_its_timeout_only(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    clock = FakeClock()
    nodes, ids = [], []
    for i in range(5):
        node = emu.add_ollama(f"n{i}", models=["llama3"])
        if i == 0:
            node.faults.hang()
        nodes.append(node)
        ids.append(
            (await store.create_backend(name=f"n{i}", base_url=node.base_url, type="ollama")).id
        )
    hung, others = nodes[0], nodes[1:]
    await declare_chat(store, "llama3")
    async with State(store, bus, backend_timeout=0.5, clock=clock) as state:
        cycle = asyncio.create_task(state.run_backend_cycle())

        def only_the_hung_one_left() -> bool:
            # Each backend in flight waits for its deadline on the clock; the others are done.
            done = all(n.requests and not n.active for n in others)
            return done and hung.active == 1 and clock.sleepers == 1

        await eventually(only_the_hung_one_left, what="the other four reconciled")
        clock.advance(0.49)
        assert clock.sleepers == 1  # its deadline has not passed yet
        clock.advance(0.01)
        async with asyncio.timeout(30):  # a failure bound: the deadline has passed
            await cycle
        snapshot = state.get()
    assert snapshot[ids[0]].error == "timed out after 0.5 s"
    assert all(snapshot[i].error == "" for i in ids[1:])


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_every_failure_lands_in_error_with_its_cause(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    failing = emu.add_ollama("failing")
    failing.faults.fail(status=500, body=b'{"error":"out of memory while loading"}')
    malformed = emu.add_ollama("malformed")
    malformed.faults.malformed()
    oversized = emu.add_ollama("oversized")
    oversized.faults.oversized(size=1024 * 1024)
    urls = {
        "refused": f"http://127.0.0.1:{closed_port()}",
        "invalid": "http://exa mple:99999",
        "failing": failing.base_url,
        "malformed": malformed.base_url,
        "oversized": oversized.base_url,
    }
    for name, url in urls.items():
        await store.create_backend(name=name, base_url=url, type="ollama")
    await store.create_backend(name="odd", base_url="http://127.0.0.1:1", type="llamafile")
    http = HttpClient(max_body_bytes=64 * 1024)
    try:
        async with State(store, bus, http=http) as state:
            await state.run_backend_cycle()
            errors = {s.name: s.error for s in state.get().values()}
    finally:
        await http.aclose()
    assert "cannot connect" in errors["refused"]
    assert "invalid URL" in errors["invalid"]
    assert errors["failing"].startswith("HTTP 500 from ")
    assert "out of memory while loading" in errors["failing"]
    assert "malformed JSON" in errors["malformed"]
    assert "response too large" in errors["oversized"]
    assert errors["odd"] == "Unsupported backend type: llamafile"


async def test_vllm_reports_served_model_and_rejects_undeclared(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    good = emu.add_vllm("good", model="meta-llama/Llama-3.1-8B-Instruct", max_model_len=8192)
    wrong = emu.add_vllm("wrong", model="mistralai/Mistral-7B-v0.3")
    ok = await store.create_backend(name="good", base_url=good.base_url + "/v1", type="vllm")
    bad = await store.create_backend(name="wrong", base_url=wrong.base_url, type="vllm")
    await store.append_model(model="meta-llama/Llama-3.1-8B-Instruct")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        snapshot = state.get()
    served = snapshot[ok.id]
    assert served.error == ""
    (model,) = served.pulled_models
    assert (model.context_length, model.can_chat, model.can_stream) == (8192, True, True)
    assert [r.path for r in good.requests] == ["/v1/models"]
    assert snapshot[bad.id].error == "served model not declared: mistralai/Mistral-7B-v0.3"


async def test_vllm_with_an_api_key_says_so(store: Store, bus: Messenger, emu: Emulator) -> None:
    locked = emu.add_vllm("locked", model="m", api_key="vllm-secret-0123456789")
    backend = await store.create_backend(name="locked", base_url=locked.base_url, type="vllm")
    await store.append_model(model="m")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend.id]
    assert observed.error == (
        "the vLLM server requires an API key (--api-key): store it as the backend's credential"
        " (HTTP 401)"
    )
    assert observed.pulled_models == ()
    assert [r.headers.get("Authorization") for r in locked.requests] == [None]


async def test_vllm_is_listed_with_its_backend_credential(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    secret = "vllm-secret-0123456789"
    locked = emu.add_vllm("locked", model="m", api_key=secret)
    backend = await store.create_backend(name="locked", base_url=locked.base_url, type="vllm")
    await store.append_model(model="m")
    await store.set_kv(f"backend-credential:{backend.id}", {"APIKey": secret, "Type": "vllm"})
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        observed = state.get()[backend.id]
        assert observed.error == ""
        assert [m.model for m in observed.pulled_models] == ["m"]
        assert observed.api_key == secret
        await store.set_kv(
            f"backend-credential:{backend.id}", {"APIKey": "wrong-0123456789", "Type": "vllm"}
        )
        await state.run_backend_cycle()
        assert state.get()[backend.id].error == ("the backend credential was rejected (HTTP 401)")
    assert [r.headers.get("Authorization") for r in locked.requests] == [
        f"Bearer {secret}",
        "Bearer wrong-0123456789",
    ]


async def test_pools_aggregate_models_and_leave_unpooled_backends_alone(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    both = emu.add_ollama("both")
    lone = emu.add_ollama("lone", models=["stray:1b"])
    b_both = await store.create_backend(name="both", base_url=both.base_url, type="ollama")
    b_lone = await store.create_backend(name="lone", base_url=lone.base_url, type="ollama")
    chat = await store.create_pool(name="chat", purpose_type="chat")
    embed = await store.create_pool(name="embed", purpose_type="embed")
    await declare_chat(store, "llama3", "nomic-embed-text", "unused:7b")
    llama3 = await store.get_model_by_name("llama3")
    nomic = await store.get_model_by_name("nomic-embed-text")
    await store.assign_model_to_pool(pool_id=chat.id, model_id=llama3.id)
    await store.assign_model_to_pool(pool_id=embed.id, model_id=nomic.id)
    await store.assign_model_to_pool(pool_id=embed.id, model_id=llama3.id)
    await store.assign_backend_to_pool(pool_id=chat.id, backend_id=b_both.id)
    await store.assign_backend_to_pool(pool_id=embed.id, backend_id=b_both.id)
    async with State(store, bus, with_pools=True) as state:
        await state.run_backend_cycle()
        snapshot = state.get()
        listings = len(paths(both, "GET", "/api/tags"))
        await store.remove_backend_from_pool(pool_id=chat.id, backend_id=b_both.id)
        await state.run_backend_cycle()
        in_one_pool = state.get()
        await store.remove_backend_from_pool(pool_id=embed.id, backend_id=b_both.id)
        await state.run_backend_cycle()
        in_no_pool = state.get()
    assert set(snapshot) == {b_both.id}
    assert sorted(snapshot[b_both.id].models) == ["llama3", "nomic-embed-text"]
    # Processed once although in two pools.
    assert listings == 1
    assert lone.requests == []
    assert b_lone.id not in snapshot
    assert sorted(in_one_pool[b_both.id].models) == ["llama3", "nomic-embed-text"]
    assert in_no_pool == {}


async def test_stale_backends_leave_and_snapshots_never_change(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    first = emu.add_ollama("first", models=["llama3"])
    second = emu.add_ollama("second", models=["llama3"])
    b1 = await store.create_backend(name="first", base_url=first.base_url, type="ollama")
    b2 = await store.create_backend(name="second", base_url=second.base_url, type="ollama")
    await declare_chat(store, "llama3")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        before = state.get()
        before_json = {k: v.model_dump_json() for k, v in before.items()}
        await store.delete_backend(b2.id)
        second.faults.fail(status=500)
        first.add_model("phi3:mini")
        await state.run_backend_cycle()
        after = state.get()
    assert set(before) == {b1.id, b2.id}
    assert set(after) == {b1.id}
    assert {k: v.model_dump_json() for k, v in before.items()} == before_json
    assert isinstance(before[b1.id], LLMState)
    with pytest.raises(ValueError, match="frozen"):
        before[b1.id].error = "changed"  # type: ignore[misc]


async def test_plan_is_a_dry_run(store: Store, bus: Messenger, emu: Emulator) -> None:
    node = emu.add_ollama("n1", models=["llama3", "junk:1b"])
    backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    await declare_chat(store, "llama3", "phi3:mini")
    async with State(store, bus) as state:
        plans = await state.plan_backend_cycle()
        assert state.get() == {}
    plan = plans[backend.id]
    assert plan.to_json()["actions"] == [
        {"kind": "pull", "model": "phi3:mini"},
        {"kind": "delete", "model": "junk:1b"},
    ]
    assert plan.to_json()["backendName"] == "n1"
    json.dumps(plan.to_json())
    assert await jobs(store) == []
    assert paths(node, "DELETE", "/api/delete") == []
    assert "junk:1b" in node.models


async def test_every_declared_model_is_considered_beyond_one_page(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1")
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    names = [f"model{i:03d}:1b" for i in range(120)]
    await declare_chat(store, *names)
    async with State(store, bus) as state:
        plans = await state.plan_backend_cycle()
    (plan,) = plans.values()
    assert sorted(plan.state.models) == names
    # Every missing model is to be pulled, the oldest declared first.
    assert [a.model for a in plan.actions] == names


async def test_cycles_do_not_leave_tasks_behind(
    store: Store, bus: Messenger, emu: Emulator
) -> None:
    node = emu.add_ollama("n1", models=["llama3", "junk:1b"])
    await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
    async with State(store, bus) as state:
        await state.run_backend_cycle()
        await state.plan_backend_cycle()
    ours = [
        task
        for task in asyncio.all_tasks()
        if "/runtimestate/state" in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
        or "/runtimestate/backends" in task.get_coro().cr_code.co_filename  # type: ignore[union-attr]
    ]
    assert ours == []


async def _cycle_on(clock: FakeClock, state: State, step: float) -> None:
    """Run one backend cycle, moving the fake clock by ``step`` (the emulated latency) each
    time a request waits on it: then two sleep on the clock, the request and the backend's
    deadline in the cycle."""
    cycle = asyncio.create_task(state.run_backend_cycle())

    def advanced() -> bool:
        if clock.sleepers >= 2:
            clock.advance(step)
        return cycle.done()

    await eventually(advanced, what="the cycle done", every=0)
    await cycle


async def test_each_state_says_when_and_how_fast_it_was_observed(
    store: Store, bus: Messenger
) -> None:
    clock = FakeClock()
    async with Emulator(clock=clock) as emu:
        node = emu.add_ollama("n1", models=["llama3"])
        node.faults.latency = 2.5
        backend = await store.create_backend(name="n1", base_url=node.base_url, type="ollama")
        await declare_chat(store, "llama3")
        # Slower than the default deadline allows (two requests of 7 s): a longer one.
        async with State(store, bus, clock=clock, backend_timeout=60.0) as state:
            started = clock.now()
            await _cycle_on(clock, state, 2.5)
            first = state.get()[backend.id]
            # Ground truth at the emulator: every request of the cycle waited 2.5 s of the
            # clock before its answer; the observation took exactly that long.
            asked = len(node.requests)
            assert asked >= 1
            assert first.latency_seconds == pytest.approx(2.5 * asked)
            assert first.observed_at == started + timedelta(seconds=2.5 * asked)
            shown = json.loads(first.model_dump_json())
            assert shown["latencySeconds"] == pytest.approx(2.5 * asked)
            assert shown["observedAt"].startswith(started.date().isoformat())
            # A steady cycle, slower this time, keeps the state object (and the version):
            # the observation stamps move only with the state.
            version = state.version
            node.faults.latency = 7.0
            await _cycle_on(clock, state, 7.0)
            assert state.get()[backend.id] is first
            assert state.version == version
            # A change is stamped with its own observation.
            node.add_model("llama3", context_length=8192)
            before, asked_before = clock.now(), len(node.requests)
            await _cycle_on(clock, state, 7.0)
            changed = state.get()[backend.id]
            assert state.version > version
            asked = len(node.requests) - asked_before
            assert changed.latency_seconds == pytest.approx(7.0 * asked)
            assert changed.observed_at == before + timedelta(seconds=7.0 * asked)
