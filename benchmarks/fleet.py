"""Fleet scale: reading the state (``/state``, ``/state/summary``, the event stream) and applying
a fleet file of 10,000 backends on SQLite and PostgreSQL.

The state routes are measured in process, through the app's ASGI interface (no socket), over a
synthetic snapshot of N backends x M models - the work of the server alone, which is what a
cached body changes; the old way (serialize the snapshot on every request) is timed in the same
run for comparison. The event stream's delivery delay is measured over a real socket: from the
moment a backend's state changes to the moment a client has read its event.

Applying goes through ``POST /fleet/apply`` with the YAML file as the body, on a fresh SQLite
file and (when PostgreSQL binaries are installed) a fresh PostgreSQL database; then the same file
again, which must write nothing.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi.responses import JSONResponse

from runtimestate.api import ApiContext, create_app
from runtimestate.bus import open_bus
from runtimestate.records import BackendInfo, ListModelResponse, LLMState, ModelDetails
from runtimestate.store import open_store

__all__ = ["run"]

TOKEN = "bench-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SIZES = ((1_000, 10), (10_000, 20))
APPLY_BACKENDS = 10_000
APPLY_MODELS = 50


class ServerTime:
    """ASGI middleware that records how long the app took to produce each whole response -
    server time, without the client's reading and decompressing."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.last = 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        started = time.perf_counter()
        await self.app(scope, receive, send)
        self.last = time.perf_counter() - started


class Snapshot:
    """A StateView over a fixed snapshot; ``change(i)`` alters one backend like a cycle would."""

    def __init__(self, backends: int, models: int) -> None:
        now = datetime(2026, 1, 1, tzinfo=UTC)
        names = tuple(f"bench-model-{i}:7b" for i in range(models))
        pulled = tuple(
            ListModelResponse(
                name=name,
                model=name,
                modified_at=now,
                size=4_000_000_000 + i,
                digest=f"sha256:{i:064x}",
                details=ModelDetails(format="gguf", family="llama", parameter_size="7B"),
                context_length=8192,
                can_chat=True,
            )
            for i, name in enumerate(names)
        )
        self.states: dict[str, LLMState] = {}
        for i in range(backends):
            backend_id = f"backend-{i:06d}"
            info = BackendInfo(
                id=backend_id,
                name=f"node-{i:06d}",
                base_url=f"http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:11434",
                type="ollama",
                created_at=now,
                updated_at=now,
            )
            error = "connection refused" if i % 50 == 0 else ""
            self.states[backend_id] = LLMState(
                id=backend_id,
                name=info.name,
                models=names,
                pulled_models=() if error else pulled,
                backend=info,
                error=error,
            )
        self._version = 1

    @property
    def version(self) -> int:
        return self._version

    def get(self) -> Mapping[str, LLMState]:
        return self.states

    def change(self, index: int) -> None:
        backend_id = f"backend-{index:06d}"
        state = self.states[backend_id]
        flipped = "" if state.error else f"timed out ({self._version})"
        self.states = {**self.states, backend_id: state.model_copy(update={"error": flipped})}
        self._version += 1

    async def run_backend_cycle(self) -> None:
        return None

    async def plan_backend_cycle(self) -> dict[str, Any]:
        return {}


@dataclass
class Timings:
    samples: list[float]

    def p(self, q: float) -> float:
        ordered = sorted(self.samples)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _time(n: int, call: Callable[[], Awaitable[Any]], timer: ServerTime) -> Timings:
    samples = []
    for _ in range(n):
        await call()
        samples.append(timer.last)
    return Timings(samples)


async def _read_bench(backends: int, models: int) -> list[str]:
    source = Snapshot(backends, models)
    bus = await open_bus(None)
    store = await open_store("sqlite:///:memory:")
    ctx = ApiContext(store=store, messenger=bus, token=TOKEN, state=source, poll_interval=0.05)
    app = create_app(ctx)
    timer = ServerTime(app)
    rows: list[str] = []
    n = 200 if backends <= 1_000 else 40
    try:
        transport = httpx.ASGITransport(app=timer)
        async with httpx.AsyncClient(transport=transport, base_url="http://a", headers=AUTH) as c:
            plain = {"Accept-Encoding": "identity"}
            first = await c.get("/state", headers=plain)
            cold = timer.last * 1000
            etag = first.headers["etag"]
            full = await _time(n, lambda: c.get("/state", headers=plain), timer)
            zipped_first = await c.get("/state", headers={"Accept-Encoding": "gzip"})
            zipped = await _time(
                n, lambda: c.get("/state", headers={"Accept-Encoding": "gzip"}), timer
            )
            cached = await _time(n, lambda: c.get("/state", headers={"If-None-Match": etag}), timer)
            summary = await _time(n, lambda: c.get("/state/summary", headers=plain), timer)
            by_status = await _time(
                n, lambda: c.get("/state", params={"status": "error"}, headers=plain), timer
            )
            by_name = await _time(
                n, lambda: c.get("/state", params={"backend": "node-000777"}, headers=plain), timer
            )
            raw = zipped_first.headers.get("content-length", "?")

            def old_way() -> JSONResponse:
                ordered = sorted(source.get().values(), key=lambda e: (e.name, e.id))
                return JSONResponse([e.model_dump(mode="json") for e in ordered])

            old = Timings([])
            for _ in range(3 if backends > 1_000 else 10):
                t0 = time.perf_counter()
                old_way()
                old.samples.append(time.perf_counter() - t0)
            source.change(3)
            await c.get("/state/summary")
            rebuild = timer.last * 1000
        delay = await _sse_delay(app, source, ctx)
    finally:
        ctx.closing.set()
        await bus.close()
        await store.close()
    label = f"{backends:,} x {models}"
    rows.append(
        f"| {label} | `GET /state` (cached bytes) | {full.p(0.5):.2f} | {full.p(0.99):.2f} |"
    )
    rows.append(f"| {label} | `GET /state`, gzip | {zipped.p(0.5):.2f} | {zipped.p(0.99):.2f} |")
    rows.append(
        f"| {label} | `GET /state` + `If-None-Match` (304) | {cached.p(0.5):.3f} | "
        f"{cached.p(0.99):.3f} |"
    )
    rows.append(
        f"| {label} | `GET /state/summary` | {summary.p(0.5):.3f} | {summary.p(0.99):.3f} |"
    )
    rows.append(
        f"| {label} | `GET /state?status=error` | {by_status.p(0.5):.2f} | "
        f"{by_status.p(0.99):.2f} |"
    )
    rows.append(
        f"| {label} | `GET /state?backend=<name>` | {by_name.p(0.5):.3f} | {by_name.p(0.99):.3f} |"
    )
    rows.append(
        f"| {label} | old way: serialize per request | {old.p(0.5):.1f} | {old.p(0.99):.1f} |"
    )
    rows.append(f"| {label} | first request (serialize all) | {cold:.1f} | |")
    rows.append(f"| {label} | after one backend changed (re-index) | {rebuild:.1f} | |")
    rows.append(
        f"| {label} | SSE delivery delay (poll 50 ms) | {delay.p(0.5):.1f} | {delay.p(0.99):.1f} |"
    )
    size = f"| {label} | bytes: {len(first.content):,} identity, {raw} gzip | | |"
    rows.append(size)
    return rows


async def _sse_delay(app: Any, source: Snapshot, ctx: ApiContext) -> Timings:
    """From ``source.change()`` to the client having read that backend's event."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(3000):
        if server.started:
            break
        await asyncio.sleep(0.01)
    samples: list[float] = []
    try:
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=60) as c,
            c.stream("GET", "/state/events") as response,
        ):
            lines = response.aiter_lines()
            async for line in lines:  # the snapshot and the first summary
                if line.startswith("event: summary"):
                    break
            for round_ in range(20):
                source.change(10 + round_)
                changed = time.perf_counter()
                async for line in lines:
                    if line.startswith("event: backend"):
                        samples.append(time.perf_counter() - changed)
                        break
    finally:
        ctx.closing.set()
        server.should_exit = True
        await task
    return Timings(samples)


def _fleet_yaml() -> str:
    lines = ["version: 1", "backends:"]
    for i in range(APPLY_BACKENDS):
        lines += [
            f"  - name: node-{i:05d}",
            f"    baseUrl: http://10.{i // 65536}.{i // 256 % 256}.{i % 256}:11434",
            "    type: ollama",
        ]
    lines.append("models:")
    for i in range(APPLY_MODELS):
        lines += [f"  - model: bench-model-{i}:7b", "    contextLength: 8192", "    canChat: true"]
    lines += ["pools:", "  - name: all", "    purposeType: chat", "    models:"]
    lines += [f"      - bench-model-{i}:7b" for i in range(APPLY_MODELS)]
    return "\n".join(lines) + "\n"


async def _apply_bench(url: str, text: str) -> tuple[float, float, dict[str, Any]]:
    store = await open_store(url)
    bus = await open_bus(None)
    try:
        app = create_app(ApiContext(store=store, messenger=bus, token=TOKEN))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://a", headers=AUTH, timeout=600
        ) as c:
            started = time.perf_counter()
            first = await c.post("/fleet/apply", content=text.encode())
            took = time.perf_counter() - started
            assert first.status_code == 200, first.text
            started = time.perf_counter()
            again = await c.post("/fleet/apply", content=text.encode())
            again_took = time.perf_counter() - started
            assert again.json()["applied"] is False
            return took, again_took, again.json()["counts"]
    finally:
        await bus.close()
        await store.close()


async def _apply_rows() -> list[str]:
    text = _fleet_yaml()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        took, again, counts = await _apply_bench(f"sqlite:///{Path(tmp) / 'fleet.db'}", text)
    rows.append(
        f"| SQLite | {took:.2f} | {again:.2f} | {counts['unchanged']:,} unchanged, "
        f"{counts['added']} added |"
    )
    try:
        from tests.fixtures.postgres import _find_bin_dir, fresh_database, postgres_server

        with postgres_server(_find_bin_dir()) as admin:
            async with fresh_database(admin) as url:
                took, again, counts = await _apply_bench(url, text)
        rows.append(
            f"| PostgreSQL | {took:.2f} | {again:.2f} | {counts['unchanged']:,} unchanged, "
            f"{counts['added']} added |"
        )
    except BaseException as exc:  # pytest's skip is a BaseException
        rows.append(f"| PostgreSQL | not measured: {type(exc).__name__}: {exc} | | |")
    return rows


async def _main() -> str:
    read_rows: list[str] = []
    for backends, models in SIZES:
        read_rows += await _read_bench(backends, models)
    apply_rows = await _apply_rows()
    size = len(_fleet_yaml().encode())
    return "\n".join(
        [
            "## Fleet scale: reading the state, applying a fleet file (`benchmarks/fleet.py`)",
            "",
            "Server time in process (ASGI, no socket) over a synthetic snapshot in which one "
            "backend in 50 has an error; milliseconds.",
            "",
            "| snapshot | request | p50 ms | p99 ms |",
            "|---|---|---|---|",
            *read_rows,
            "",
            f"`POST /fleet/apply` of {APPLY_BACKENDS:,} backends, {APPLY_MODELS} models and one "
            f"pool of them, as YAML ({size:,} bytes), into an empty store; then the same file "
            "again (no writes). Seconds, through the app in process.",
            "",
            "| engine | apply s | re-apply s | re-apply result |",
            "|---|---|---|---|",
            *apply_rows,
            "",
        ]
    )


def run() -> str:
    return asyncio.run(_main())
