"""The served OpenAPI schema, checked by schemathesis: for generated requests to every operation,
no 500 and every response (status, content type, headers, body) conforms to the schema.

The app runs on a real uvicorn socket in a thread with its own event loop, because schemathesis
calls synchronously: the store, bus and reconciler are opened inside that loop and closed there.
Examples are bounded (``MAX_EXAMPLES`` per operation, fewer for invalid requests) and
derandomized, with no example database, so that a run is repeatable. ``GET /queue/inProgress``
and ``GET /state/events`` are excluded: an SSE stream never ends; their 401s are covered in
``test_api_state.py`` and ``test_api_state_cache.py``.

The stateful run follows the schema's links (a 201 names the created entity for its read, update
and delete) over a store of its own, emptied before every example so that a failing sequence
fails again when hypothesis replays it.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from runtimestate.api import ApiContext, create_app
from runtimestate.bus import open_bus
from runtimestate.state import State
from runtimestate.store import open_store
from runtimestate.testing import Emulator
from tests.fixtures.polling import eventually
from tests.fixtures.postgres import TEST_MASTER_KEY

TOKEN = "schema-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = 25
NEGATIVE_EXAMPLES = 10


class ThreadedApi:
    """The app with a real store, bus and reconciler, served from a thread of its own."""

    def __init__(self, database: Path) -> None:
        self._database = database
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server: uvicorn.Server | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="schema-api", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        store = await open_store(f"sqlite:///{self._database}", master_keys=(TEST_MASTER_KEY,))
        bus = await open_bus(None)
        state = State(store, bus, backend_timeout=2.0)
        emulator = Emulator(latency=0.0)
        await emulator.__aenter__()
        node = emulator.add_ollama("node-1", models=["llama3.2:1b", "tinyllama"])
        await store.create_backend(name="node-1", base_url=node.base_url, type="ollama")
        await store.append_model(model="llama3.2:1b", context_length=8192, can_chat=True)
        try:
            ctx = ApiContext(store=store, messenger=bus, token=TOKEN, state=state, version="1.0")
            config = uvicorn.Config(create_app(ctx), log_config=None, lifespan="off")
            self._server = uvicorn.Server(config)
            serving = asyncio.create_task(self._server.serve(sockets=[self._sock]))
            server = self._server
            await eventually(
                lambda: server.started or serving.done(), what="the API server started"
            )
            self._ready.set()
            await serving
        finally:
            await state.aclose()
            await emulator.__aexit__(None, None, None)
            await bus.close()
            await store.close()

    def __enter__(self) -> ThreadedApi:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedApi]:
    with ThreadedApi(tmp_path_factory.mktemp("schema") / "store.db") as served:
        yield served


def operations(api: ThreadedApi) -> list[tuple[Any, bool]]:
    """Every operation, and whether it is a paged listing (it takes a ``cursor``)."""
    raw = httpx.get(f"{api.url}/openapi.json", headers=AUTH).json()
    loaded = (
        schemathesis.openapi.from_dict(raw)
        .exclude(path="/queue/inProgress")
        .exclude(path="/state/events")
        # This in-thread app runs no cluster membership (the service always does), so /cluster
        # answers its documented 503 here; tests/test_cluster.py and the replica harness cover it.
        .exclude(path="/cluster")
        # Likewise a backend's history of errors, kept in the shared snapshot that only the
        # service runs; tests/test_api_backend_history.py covers it.
        .exclude(path="/state/{backend}/errors")
    )
    found = []
    for result in loaded.get_all_operations():
        if isinstance(result, Err):
            raise result.err()
        operation = result.ok()
        spec = raw["paths"][operation.path][operation.method.lower()]
        paged = any(p["name"] == "cursor" for p in spec.get("parameters", []))
        found.append((operation, paged))
    # The state routes first, while the only backend is the emulated node: once generated
    # backends with made-up host names exist, every cycle waits on their name lookups.
    found.sort(key=lambda item: not item[0].path.startswith("/state"))
    return found


def run_examples(
    operation: Any,
    *,
    url: str,
    excluded: list[Any] | None = None,
    mode: GenerationMode = GenerationMode.POSITIVE,
    checks: list[Any] | None = None,
    examples: int = MAX_EXAMPLES,
) -> None:
    """Run ``MAX_EXAMPLES`` generated requests to ``operation`` and check every response."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def conforms(case: Any) -> None:
        response = case.call_and_validate(
            base_url=url, headers=AUTH, checks=checks, excluded_checks=excluded
        )
        assert response.status_code < 500, response.text

    conforms()


# One test runs every operation in turn (about 40 x 25 requests): the suite's 60 s per test is
# for one unit, and a loaded 2-core machine needs more for all of them.
@pytest.mark.timeout(300)
def test_every_operation_conforms(api: ThreadedApi) -> None:
    # schemathesis's pytest loader does not run on this pytest, so each operation gets its own
    # hypothesis test here, run in turn; a failure names the operation and the example.
    checked = []
    for operation, paged in operations(api):
        # A cursor is opaque: any string fits its schema, but only one the store issued is
        # accepted; the others are a documented 400, which this check would call a rejection.
        # A fleet file's pools name their members, which no JSON Schema can tie to the
        # backends declared next to them (or already in the store): a valid-looking file may
        # be refused with its documented 422.
        refusable = paged or operation.path == "/fleet/apply"
        excluded = [positive_data_acceptance] if refusable else []
        run_examples(operation, url=api.url, excluded=excluded)
        checked.append(operation.label)
    # The 54 operations of the API (the gateway keys' three, the named secrets' three, the
    # queue's retry, /cluster, /providers/health and /state/{backend}/errors included) but the
    # two SSE streams, /cluster and /state/{backend}/errors.
    assert len(checked) == 50


@pytest.mark.timeout(300)
def test_invalid_requests_never_cause_a_server_error(api: ThreadedApi) -> None:
    checked = 0
    for operation, _ in operations(api):
        if operation.path.startswith("/state"):
            # No parameters or body to make invalid, and each call reconciles every backend
            # the positive run declared with made-up host names.
            continue
        try:
            run_examples(
                operation,
                url=api.url,
                mode=GenerationMode.NEGATIVE,
                checks=[not_a_server_error],
                examples=NEGATIVE_EXAMPLES,
            )
        except Unsatisfiable:
            # Nothing in this operation can be made invalid (no body, only free-text paths).
            continue
        checked += 1
    assert checked >= 20


def test_schema_documents_auth_errors_and_paging(api: ThreadedApi) -> None:
    raw = httpx.get(f"{api.url}/openapi.json", headers=AUTH).json()
    backends = raw["paths"]["/backends"]
    assert {"200", "401", "422", "503"} <= set(backends["get"]["responses"])
    assert {"201", "409"} <= set(backends["post"]["responses"])
    assert "X-Next-Cursor" in backends["get"]["responses"]["200"]["headers"]
    params = {p["name"] for p in backends["get"]["parameters"]}
    assert params == {"cursor", "limit"}
    error = raw["components"]["schemas"]["ErrorResponse"]
    assert error["required"] == ["error"]
    assert "HTTPBearer" in json.dumps(raw["components"]["securitySchemes"])


# ---- stateful --------------------------------------------------------------------------------
# The declaration routes, whose 201s link to reading, updating and deleting what they created
# (the listings are left to the stateless run: here they would only spend steps).
STATEFUL_PATHS = r"^/(backends|models|pools)(/\{[^}]+\})?$"
COLLECTIONS = r"^/(backends|models|pools)$"
# Entities the API declares, in an order in which each can be deleted, with the field that
# names one in its DELETE (a model is deleted by its name, as in the Go API).
WIPE = (("/pools", "id"), ("/backends", "id"), ("/models", "model"))


def wipe(url: str) -> None:
    """Delete every declared pool, backend and model through the API."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        for path, key in WIPE:
            # Each example declares a few entities: one page holds them all.
            for item in client.get(path, params={"limit": 1000}).json():
                name = quote(str(item[key]), safe="")
                assert client.delete(f"{path}/{name}").status_code == 204
            assert client.get(path).json() == [], f"{path} still lists entities after the wipe"


@pytest.fixture
def fresh_api(tmp_path: Path) -> Iterator[ThreadedApi]:
    with ThreadedApi(tmp_path / "stateful.db") as served:
        yield served


@pytest.mark.timeout(300)
def test_create_read_update_delete_sequences_conform(fresh_api: ThreadedApi) -> None:
    """Sequences that follow the schema's links - create, then read, update or delete what was
    created, and act on it again after its deletion - get only documented answers and never a
    500 (schemathesis's stateful checks include reading a deleted entity, which must be 404)."""
    raw = httpx.get(f"{fresh_api.url}/openapi.json", headers=AUTH).json()
    schema = (
        schemathesis.openapi.from_dict(raw)
        .include(path_regex=STATEFUL_PATHS)
        .exclude(method="GET", path_regex=COLLECTIONS)
    )
    url = fresh_api.url
    calls: list[str] = []

    class Workflow(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            # Each example starts from an empty declaration, so that one that fails fails
            # again when hypothesis replays it (a shared, growing store would make it flaky).
            wipe(url)

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": url, "headers": AUTH}

        def after_call(self, response: Any, case: Any) -> None:
            calls.append(f"{case.method} {case.operation.path} {response.status_code}")

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            assert response.status_code < 500, response.text
            paged = any(p.name == "cursor" for p in case.operation.query)
            # The token goes with every call (get_call_kwargs), so a case generated to lack
            # it is not the invalid request it was meant to be: its 200 is not an acceptance
            # of invalid data. Invalid bodies are the stateless negative run's subject.
            excluded = [negative_data_rejection]
            if paged:
                excluded.append(positive_data_acceptance)
            case.validate_response(response, excluded_checks=excluded)

    Workflow.run(
        settings=settings(
            max_examples=30,
            stateful_step_count=6,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    # The links were followed: something was created, then read or acted on by its id.
    assert any(" 201" in call for call in calls), calls
    assert any("{" in call and (call.endswith(" 200") or call.endswith(" 204")) for call in calls)
