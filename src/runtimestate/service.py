"""``runtimestate serve``: build everything from :class:`Settings`, run it, stop it cleanly.

This is the one place where the concrete objects are built and wired (built in one place from
settings and handed down): the store from ``database_url``, the bus from ``nats_url``, the
reconciler ``State`` on both, one backend-cycle :class:`Runner`, ``K`` download-worker runners,
this replica's :class:`~runtimestate.cluster.Cluster` membership with the shared snapshot, the
gateway (in front of the FastAPI app, on the same port) and its refresh routines, on uvicorn.
Nothing below reads settings.

Roles. Every replica - also the only one, on SQLite - claims the leader lease; the backend-cycle
runner of a follower does nothing, the leader's runs the cycle with its term's fence, writes the
changed backends to the shared snapshot and notifies the others. Every replica runs download
workers, the gateway and the API, and serves ``GET /state`` (and routes gateway requests) from
its copy of the shared snapshot; a follower's ``POST /state/sync`` asks the leader over the bus.
Runners whose breaker opened on a store outage probe the store every second and resume as soon
as it answers.

Supervision. Every routine is a named task; the service waits for the first of: a stop request
(SIGINT/SIGTERM, or :meth:`Service.stop`), or any routine ending. A runner never ends on its own
(it survives failing cycles under its breaker), so a routine that ends has crashed: the crash is
logged with its traceback, everything is stopped, and :class:`RoutineCrashed` is raised, which
the CLI turns into a non-zero exit. Nothing fails silently.

Shutdown, in order: the HTTP server stops accepting and the SSE streams end (``closing``); the
runners are cancelled, which cancels a running pull - its job was popped, and the next start
queues it again because the backend cycle re-detects every missing model; then the reconciler,
the bus and the store are closed, last, after everything that could write to them has stopped.

uvicorn's own signal handling is switched off (:class:`_Server`): it would re-raise the signal
after its shutdown and kill the process before our routines and store were closed. The socket
is bound here, before uvicorn starts, so that a busy port is a clear error rather than uvicorn's
``sys.exit`` inside a task, and so that port 0 (tests) reveals the real port.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from contextlib import AsyncExitStack
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Any

import uvicorn
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from runtimestate import kinds
from runtimestate.api import ApiContext, create_app
from runtimestate.api.errors import ApiError
from runtimestate.api.limits import Limits
from runtimestate.api.session import Sessions, follow_revocations
from runtimestate.backends.http import HttpClient
from runtimestate.bus import Messenger, open_bus
from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.cluster import SYNC_SUBJECT, Cluster, SnapshotCache, SnapshotPublisher
from runtimestate.downloads import MODEL_DOWNLOAD, TASKS_NOTICE, Backoff, PullWorker
from runtimestate.errors import BusError, NotFound, RemoteError, RuntimeStateError
from runtimestate.files import private_dir, private_file, tighten
from runtimestate.gateway import Gateway, GatewayConfig
from runtimestate.gateway.app import ASGIApp
from runtimestate.logging import configure_logging, register_secret
from runtimestate.masterkey import MasterKeyError, load_master_keys
from runtimestate.records import LLMState, ProviderConfig
from runtimestate.runner import BreakerState, CircuitBreaker, Runner, while_true
from runtimestate.settings import Settings, load_or_create_token, token_path
from runtimestate.state import State
from runtimestate.store import Store, open_store
from runtimestate.store.secrets import SecretsUnreadable
from runtimestate.urls import UrlPolicy
from runtimestate.web import install_dashboard

__all__ = [
    "OnStartup",
    "RoutineCrashed",
    "Service",
    "event_loop_factory",
    "serve",
    "tune_collector",
]

logger = logging.getLogger(__name__)

OnStartup = Callable[[Store], Awaitable[None]]
SHUTDOWN_GRACE = 5


class RoutineCrashed(RuntimeStateError):
    """A routine of the service stopped unexpectedly; the service has been shut down."""


def _version() -> str:
    try:
        return package_version("runtimestate")
    except PackageNotFoundError:
        return "0+unknown"


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers (:func:`serve` owns SIGINT/SIGTERM), and with an
    event for "accepting connections" instead of a flag to poll."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            self.ready.set()


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise RuntimeStateError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise RuntimeStateError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.set_inheritable(True)
    return sock


async def _register_provider_keys(store: Store) -> None:
    """Mask the stored cloud keys in every log line from the start (keys set later through the
    API are registered there)."""
    for key in (kind.provider_key for kind in kinds.cloud_kinds()):
        try:
            config = ProviderConfig.from_storage((await store.get_kv(key)).value)
        except NotFound:
            continue
        except ValueError:
            # Unreadable: the reconciler reports it on the backend; nothing to mask from here.
            continue
        register_secret(config.api_key.get_secret_value())


def _announce_token(token: str, path: Path) -> None:
    """Say where the generated token is; show the token itself only to a person at a terminal.

    On stderr, never through logging: stdout and the logs of a service are collected and kept,
    and a token there is a token anyone with the log store can use.
    """
    if sys.stderr.isatty():
        message = f"runtimestate: generated an API token (saved to {path}):\n  {token}"
    else:
        message = f"runtimestate: generated an API token; read it from {path} (mode 0600)"
    print(message, file=sys.stderr, flush=True)


def _sqlite_file(database_url: str) -> Path | None:
    try:
        url = make_url(database_url)
    except ArgumentError:
        return None
    if not url.drivername.startswith("sqlite") or url.database in {None, "", ":memory:"}:
        return None
    return Path(str(url.database))


async def _open_sealed_store(settings: Settings, clock: Clock) -> Store:
    """The store, its files owner-only and its secrets sealed with the master key."""
    private_dir(settings.data_dir)
    database = _sqlite_file(settings.database_url)
    if database is not None:
        private_dir(database.parent)
        private_file(database)
        for suffix in ("-wal", "-shm"):
            tighten(database.with_name(database.name + suffix))
    from_env = settings.master_key.get_secret_value() if settings.master_key else None
    keys, source = load_master_keys(settings.data_dir, from_env)
    for key in keys:
        register_secret(key)
    try:
        return await open_store(settings.database_url, clock=clock, master_keys=keys)
    except SecretsUnreadable as exc:
        raise MasterKeyError(
            f"{exc}. The master key in use came from {source}; the service will not start "
            "with a key that cannot open the stored secrets."
        ) from exc


class Service:
    """The whole service for one ``Settings``; :meth:`run` until :meth:`stop` or a crash.

    ``store``, when given, is used instead of opening ``settings.database_url`` - a
    :class:`~runtimestate.store.MemoryStore` in a test, say, possibly wrapped to fail on demand;
    the caller opened it and closes it."""

    def __init__(
        self,
        settings: Settings,
        *,
        on_startup: OnStartup | None = None,
        clock: Clock = SYSTEM_CLOCK,
        store: Store | None = None,
    ) -> None:
        self.settings = settings
        self._on_startup = on_startup
        self._clock = clock
        self._store = store
        self._stop = asyncio.Event()
        self._started = asyncio.Event()
        self.url: str | None = None
        self.runners: list[Runner] = []
        self.url_policy = UrlPolicy()
        self._workers: list[Runner] = []
        self._messenger: Messenger | None = None
        self.cluster: Cluster | None = None
        self.snapshot: SnapshotCache | None = None
        self.sessions: Sessions | None = None
        self._started_at = clock.monotonic()

    def stop(self) -> None:
        """Ask :meth:`run` to shut down (safe to call from a signal handler, twice)."""
        self._stop.set()

    async def wait_started(self) -> str:
        """Wait until the API accepts connections; its base URL."""
        await self._started.wait()
        assert self.url is not None
        return self.url

    async def run(self) -> None:
        settings = self.settings
        token, generated = load_or_create_token(settings)
        register_secret(token)
        if generated:
            _announce_token(token, token_path(settings.data_dir))
        async with AsyncExitStack() as stack:
            store = self._store
            if store is None:
                store = await _open_sealed_store(settings, self._clock)
                stack.push_async_callback(store.close)
            messenger = await open_bus(settings.nats_url, name="runtimestate")
            stack.push_async_callback(messenger.close)
            if self._on_startup is not None:
                await self._on_startup(store)
            await _register_provider_keys(store)
            self.url_policy = UrlPolicy(
                allowed=settings.backend_networks_allow, denied=settings.backend_networks_deny
            )
            # Room for every backend in flight plus every worker's pull.
            http = HttpClient(max_connections=settings.concurrency + 64, url_policy=self.url_policy)
            stack.push_async_callback(http.aclose)
            instance = settings.instance_id or _default_instance(settings.database_url)
            state = State(
                store,
                messenger,
                with_pools=settings.pools,
                concurrency=settings.concurrency,
                backend_timeout=settings.backend_timeout,
                delete_undeclared=settings.delete_undeclared,
                clock=self._clock,
                worker_id=instance,
                key_hosts=settings.cloud_key_hosts,
                http=http,
                worker=self._worker(store, messenger, http),
            )
            stack.push_async_callback(state.aclose)
            self.cluster = Cluster(
                store,
                messenger,
                instance=instance,
                ttl=settings.leader_ttl,
                info={"version": _version(), "host": socket.gethostname(), "pid": os.getpid()},
                clock=self._clock,
            )
            self.snapshot = SnapshotCache(store, clock=self._clock)
            gateway = Gateway(
                snapshot=_GatewaySnapshot(state, self.cluster, self.snapshot),
                store=store,
                messenger=messenger,
                config=GatewayConfig(
                    policy=settings.gateway_policy,
                    max_body_bytes=settings.gateway_max_body_bytes,
                    request_timeout=settings.gateway_request_timeout,
                    stream_idle_timeout=settings.gateway_stream_idle_timeout,
                    backend_concurrency=settings.gateway_backend_concurrency,
                    pending_retry_after=max(1, round(settings.cycle_interval)),
                ),
                clock=self._clock,
                url_policy=self.url_policy,
            )
            await gateway.start()
            stack.push_async_callback(gateway.aclose)
            sync = self._build_runners(state, store, messenger, gateway)
            self._messenger = messenger
            closing = asyncio.Event()
            app = create_app(
                ApiContext(
                    store=store,
                    messenger=messenger,
                    token=token,
                    state=state,
                    sync=sync,
                    snapshot=self.snapshot,
                    cluster=_ClusterStatus(self),
                    routing=gateway.health,
                    version=_version(),
                    closing=closing,
                    keys_changed=gateway.keys.reload,
                    url_policy=self.url_policy,
                    limits=Limits(max_body=settings.max_body_bytes),
                )
            )
            install_dashboard(app)
            self.sessions = app.state.sessions
            await self._supervise(gateway.asgi(app), closing)

    def _worker(self, store: Store, messenger: Messenger, http: HttpClient) -> PullWorker:
        settings = self.settings
        open_pull = kinds.pull_stream()
        if open_pull is None:
            raise RuntimeStateError("no backend kind pulls models")
        check = kinds.pull_check()
        return PullWorker(
            store,
            messenger,
            functools.partial(open_pull, http),
            worker_id=f"{socket.gethostname()}:{os.getpid()}",
            holds=None if check is None else functools.partial(check, http),
            clock=self._clock,
            header_timeout=settings.pull_header_timeout,
            stall_timeout=settings.stall_timeout,
            total_timeout=settings.pull_timeout,
            heartbeat_timeout=settings.heartbeat_timeout,
            backoff=Backoff(
                initial=settings.pull_backoff_initial, maximum=settings.pull_backoff_max
            ),
        )

    async def _wait_stop(self) -> None:
        await self._stop.wait()

    def _breaker(self) -> CircuitBreaker:
        return CircuitBreaker(
            failure_threshold=self.settings.breaker_failures,
            reset_timeout=self.settings.breaker_reset,
        )

    def _build_runners(
        self, state: State, store: Store, messenger: Messenger, gateway: Gateway
    ) -> Callable[[], Awaitable[None]]:
        """Create the runners; return what ``POST /state/sync`` calls: the serialized backend
        cycle on the leader, a request to the leader on a follower."""
        assert self.cluster is not None
        assert self.snapshot is not None
        cluster, snapshot = self.cluster, self.snapshot
        publisher = SnapshotPublisher(store, messenger)
        lock = asyncio.Lock()
        workers = [
            Runner(
                f"download-{index + 1}",
                state.run_download_cycle,
                interval=self.settings.cycle_interval,
                breaker=self._breaker(),
                rerun_when=while_true,
                clock=self._clock,
                probe=store.ping,
            )
            for index in range(self.settings.download_workers)
        ]

        async def backend_cycle() -> int:
            # One cycle at a time, scheduled or on demand, and only while this replica leads;
            # every write of it carries the term's fence. Afterwards the workers look at the
            # queue at once instead of at their next interval, since the cycle may have queued.
            async with lock:
                fence = cluster.fence()
                if fence is None:
                    return snapshot.version
                await state.run_backend_cycle(fence=fence)
                version = await publisher.publish(state.get(), fence)
                cluster.cycle_completed(state.last_cycle_seconds)
                if version != snapshot.version:
                    await snapshot.refresh()
                snapshot.confirm(state.last_cycle_seconds)
            for worker in workers:
                worker.trigger()
            return version

        backend = Runner(
            "backend-cycle",
            backend_cycle,
            interval=self.settings.cycle_interval,
            breaker=self._breaker(),
            clock=self._clock,
            probe=store.ping,
        )
        refresh = Runner(
            "gateway-refresh",
            gateway.refresh,
            interval=self.settings.gateway_refresh_interval,
            breaker=self._breaker(),
            clock=self._clock,
        )
        downloads = Runner(
            "gateway-downloads",
            functools.partial(gateway.follow_downloads, MODEL_DOWNLOAD),
            interval=self.settings.cycle_interval,
            breaker=self._breaker(),
            clock=self._clock,
        )
        cluster.serve_sync(backend_cycle)
        cluster.on_became_leader(backend.trigger)
        self.runners = [backend, *workers, refresh, downloads]
        self._workers = workers
        sync_timeout = self.settings.sync_timeout

        async def sync() -> None:
            if cluster.is_leader:
                await backend_cycle()
                return
            try:
                reply = await messenger.request(SYNC_SUBJECT, b"{}", timeout=sync_timeout)
            except (BusError, RemoteError) as exc:
                # NoResponders and RequestTimeout are BusErrors: no leader, or not in time.
                raise ApiError(
                    503, "unavailable", f"no leader ran a cycle within {sync_timeout:g} s: {exc}"
                ) from exc
            version = int(json.loads(reply)["version"])
            if not await snapshot.wait_for(version, timeout=sync_timeout):
                raise ApiError(503, "unavailable", "the leader's snapshot could not be read")

        return sync

    def routines(self) -> dict[str, Callable[[], Coroutine[Any, Any, None]]]:
        """Every long-running routine of this replica, by name."""
        assert self.cluster is not None
        assert self.snapshot is not None
        routines: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
            runner.name: runner.run for runner in self.runners
        }
        snapshot, messenger = self.snapshot, self.cluster.messenger
        interval = self.settings.cycle_interval
        routines["cluster"] = self.cluster.run
        routines["snapshot"] = lambda: snapshot.follow(messenger, interval=interval)
        if self.sessions is not None:
            sessions, store, clock = self.sessions, self.cluster.store, self._clock
            routines["sessions"] = lambda: follow_revocations(
                sessions, store, messenger, interval=interval, clock=clock
            )
        return routines

    def problems(self) -> list[str]:
        """Why this replica is degraded: open breakers, a snapshot older than three cycles."""
        reasons = [
            f"routine {runner.name}: circuit breaker open"
            for runner in self.runners
            if runner.breaker_state is BreakerState.OPEN
        ]
        if self.snapshot is not None and self.cluster is not None:
            # Three cycle intervals, plus the time one cycle may take (backend_timeout), plus
            # one renewal period: the pace at which the leader reports its last cycle to the
            # others through the lease row.
            bound = (
                3 * self.settings.cycle_interval
                + self.settings.backend_timeout
                + self.cluster.renew_every
            )
            age = self.snapshot.age()
            waited = self._clock.monotonic() - self._started_at
            if (age if age is not None else waited) > bound:
                shown = "no cycle yet" if age is None else f"{age:.0f} s old"
                reasons.append(f"snapshot stale: {shown} (bound {bound:g} s)")
        return reasons

    async def _wake_workers(self) -> None:
        """Trigger the download workers whenever any process queues pull tasks (the bus
        notice), so that they need not wait for their next poll. A lost subscription is opened
        again; the workers' own polling covers the gap."""
        assert self._messenger is not None
        while True:
            try:
                async with await self._messenger.stream(TASKS_NOTICE) as notices:
                    async for _ in notices:
                        for worker in self._workers:
                            worker.trigger()
            except RuntimeStateError as exc:
                logger.warning("download notices unavailable: %s", exc)
            await self._clock.sleep(self.settings.cycle_interval)

    async def _supervise(self, app: ASGIApp, closing: asyncio.Event) -> None:
        settings = self.settings
        sock = _bind(settings.host, settings.port)
        host, port = sock.getsockname()[:2]
        self.url_policy.serving_at(host, port)
        display = f"[{host}]" if ":" in host else host
        self.url = f"http://{display}:{port}"
        config = uvicorn.Config(
            app,
            # httptools (C) rather than h11, named so that a missing build fails at start instead
            # of falling back. No access log: a line per request, formatted and passed through
            # the redaction filter, would sit on the gateway's hot path; the gateway counts its
            # requests in its Prometheus series instead.
            http="httptools",
            access_log=False,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=SHUTDOWN_GRACE,
            server_header=False,
        )
        server = _Server(config)
        if self.cluster is not None:
            self.cluster.info["url"] = self.url
            # Know the role before the first request: a sync right after start goes to the
            # right place, and a lone replica leads from its first cycle.
            await self.cluster.round()
        # A snapshot is stale only once the routines have had their bound to make one.
        self._started_at = self._clock.monotonic()
        tasks = {
            asyncio.create_task(routine(), name=name): name
            for name, routine in self.routines().items()
        }
        if self._workers:
            wake = asyncio.create_task(self._wake_workers(), name="download-notices")
            tasks[wake] = "download-notices"
        http = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        tasks[http] = "http"
        stop = asyncio.create_task(self._wait_stop(), name="stop")
        crashed: tuple[str, BaseException | None] | None = None
        try:
            with sock:
                ready = asyncio.create_task(server.ready.wait(), name="http-ready")
                await asyncio.wait((ready, http), return_when=asyncio.FIRST_COMPLETED)
                ready.cancel()
                if server.ready.is_set():
                    self._started.set()
                    logger.info("runtimestate %s serving on %s", _version(), self.url)
                done, _ = await asyncio.wait((*tasks, stop), return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if task is not stop:
                        crashed = (tasks[task], _outcome(task))
                        break
                logger.info("runtimestate shutting down")
                closing.set()
                server.should_exit = True
                await asyncio.wait((http,), timeout=SHUTDOWN_GRACE * 2)
                if not http.done():
                    server.force_exit = True
        finally:
            stop.cancel()
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, stop, return_exceptions=True)
            for task, result in zip(tasks, results, strict=False):
                if isinstance(result, Exception) and crashed is None:
                    crashed = (tasks[task], result)
        if crashed is not None:
            name, error = crashed
            if error is not None:
                logger.error("routine %s crashed", name, exc_info=error)
            raise RoutineCrashed(f"routine {name} stopped unexpectedly: {error!r}") from error
        logger.info("runtimestate stopped")


class _GatewaySnapshot:
    """What the gateway routes from: the leader's own reconciler snapshot (whose cloud states
    carry their keys privately), the shared snapshot on a follower (whose reconciler observed
    nothing; cloud states read back from the store carry no key, so a follower's gateway
    routes to self-hosted backends only)."""

    def __init__(self, state: State, cluster: Cluster, shared: SnapshotCache) -> None:
        self._state = state
        self._cluster = cluster
        self._shared = shared

    def current(self) -> Mapping[str, LLMState]:
        if self._cluster.is_leader:
            return self._state.current()
        return self._shared.current()


def _default_instance(database_url: str) -> str:
    """A replica's default name: new at every start on a shared database, so that a restarted
    process is a new member; the host's name on SQLite, where one process owns the file, so
    that a restart after a crash leads at once instead of waiting out its own old lease."""
    if database_url.startswith("sqlite"):
        return socket.gethostname()
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class _ClusterStatus:
    """What the API shows of this replica's membership (``/health``, ``/cluster``)."""

    def __init__(self, service: Service) -> None:
        self._service = service

    def describe(self) -> dict[str, object]:
        cluster = self._service.cluster
        return {} if cluster is None else cluster.describe()

    async def replicas(self) -> list[dict[str, object]]:
        cluster = self._service.cluster
        if cluster is None:
            return []
        # A replica that missed three renewals is presumed gone (killed, or cut off).
        alive_within = 3 * cluster.renew_every
        return [
            {
                "instance": replica.instance,
                "role": replica.info.get("role"),
                "term": replica.info.get("term"),
                "url": replica.info.get("url"),
                "version": replica.info.get("version"),
                "cycle_seconds": replica.info.get("cycleSeconds"),
                "heartbeat_age": replica.age,
                "heartbeat_at": replica.heartbeat_at,
                "alive": replica.age <= alive_within,
            }
            for replica in await cluster.store.list_replicas()
        ]

    def problems(self) -> list[str]:
        return self._service.problems()


def _outcome(task: asyncio.Task[None]) -> BaseException | None:
    """The exception a finished task ended with (None: it returned, which is also a crash)."""
    if task.cancelled():
        return asyncio.CancelledError()
    return task.exception()


def tune_collector(threshold: int) -> None:
    """Fit Python's garbage collector to a long-running service with a large live heap.

    A cycle over a large fleet allocates a few hundred objects per backend, and at Python's
    default (a young collection every 700 allocations) many of them are still in flight at each
    young collection, get promoted, and soon trigger a full collection - which walks every live
    object: the snapshot, the drivers' memos, the stores' rows. Measured on 10,000 backends, the
    collector took more than half of a steady cycle's CPU. A young generation of ``threshold``
    allocations lets the in-flight objects die young; what the imports made is collected once
    and frozen (moved out of every later collection - it lives as long as the process anyway).
    ``0`` leaves the collector as Python configured it.
    """
    if threshold == 0:
        return
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(threshold, middle, old)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (the service's: faster sockets and timers);
    None, asyncio's default, otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def serve(settings: Settings, *, on_startup: OnStartup | None = None) -> None:
    """Run the service until SIGINT/SIGTERM; raise :class:`RoutineCrashed` if a routine dies.

    ``on_startup(store)`` runs once the store is open and before any routine starts (the demo
    declares its fleet there). The process's garbage collector is tuned first
    (:func:`tune_collector`).
    """
    configure_logging(format=settings.log_format, level=settings.log_level)
    tune_collector(settings.gc_threshold)
    service = Service(settings, on_startup=on_startup)
    loop = asyncio.get_running_loop()
    handled = (signal.SIGINT, signal.SIGTERM)
    for sig in handled:
        loop.add_signal_handler(sig, service.stop)
    try:
        await service.run()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
