"""Several replicas of the service on one store and one bus: who leads, and one shared snapshot.

Every replica runs the API and the download workers; exactly one - the **leader** - runs
backend cycles. Three pieces, each usable on its own and wired together by the service:

* :class:`Cluster` - this replica's membership. Every ``ttl / 3`` it claims the leader lease
  (:meth:`runtimestate.store.Store.claim_leadership`: database time, a term that increases on
  every change of leader) and renews its heartbeat in the replica registry. It believes itself
  leader only until ``ttl`` after the start of its last successful claim, measured on its own
  monotonic clock, so a leader cut off from the store stops cycling before anyone can take
  over; and every write a cycle makes carries :meth:`Cluster.fence`, which the store checks in
  the write's own transaction, so even a leader that is paused past its lease cannot write late.
  On SQLite (one process) the one instance becomes leader through the same path. The leader
  also forgets, at most once a minute, the registry entries of replicas silent for
  ``forget_after`` (default an hour): processes killed without leaving, which would otherwise
  be listed forever (each start of a replica is a new instance). While leader
  it answers sync requests on :data:`SYNC_SUBJECT` (request/reply), so a follower's ``POST
  /state/sync`` runs the cycle where cycles run.
* :class:`SnapshotPublisher` - on the leader, after each cycle: writes to the store only the
  backends whose observed state changed (a steady cycle writes nothing), fenced by the term,
  and publishes a notice on :data:`SNAPSHOT_NOTICE`. On a new term it first reloads what is
  stored, since another leader may have written in between. Each stored entry also carries the
  backend's **error history** (:data:`ERROR_HISTORY` key): its last :data:`ERROR_HISTORY_SIZE`
  changes of ``error``, newest first, each ``{"at", "error"}`` (``""``: it recovered). It lives
  in the shared snapshot because a change of error is a change of state - written anyway, so a
  steady cycle still writes nothing - and so every replica serves the same history, and a new
  leader continues the one its predecessor kept. ``GET /state`` leaves it out (it serializes
  :class:`~runtimestate.records.LLMState`, which has no such field).
* :class:`SnapshotCache` - on every replica: the in-memory copy that ``GET /state`` serves,
  refreshed on each notice and at least every cycle interval (one version read when nothing
  changed). Its :meth:`~SnapshotCache.age` is the time since the leader last completed a cycle
  that confirmed it - from the lease row, where the leader reports its last cycle at every
  renewal - so a replica cut off from the store, or a fleet without a working leader, serves
  an honestly ageing snapshot and ``/health`` says so. :attr:`~SnapshotCache.version` is the
  stored version counter: equal versions are equal content on every replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime, timedelta
from enum import StrEnum

from runtimestate.bus.base import Message, Messenger, Subscription
from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import BusError, InvalidInput, RuntimeStateError, StoreError
from runtimestate.records import LLMState
from runtimestate.store.base import Store
from runtimestate.store.records import Fence, Leadership

__all__ = [
    "ERROR_HISTORY",
    "ERROR_HISTORY_SIZE",
    "FORGET_AFTER",
    "LEADER_ROLE",
    "SNAPSHOT_NOTICE",
    "SYNC_SUBJECT",
    "Cluster",
    "Role",
    "SnapshotCache",
    "SnapshotPublisher",
]

logger = logging.getLogger(__name__)

# Seconds without a heartbeat after which the leader drops a replica from the registry; and the
# least time between two such prunes (a DELETE each, on the leader only).
FORGET_AFTER = 3600.0
PRUNE_EVERY = 60.0

LEADER_ROLE = "backend-cycle"
SNAPSHOT_NOTICE = "runtimestate.cluster.snapshot"
SYNC_SUBJECT = "runtimestate.cluster.sync"
ERROR_HISTORY = "errorHistory"
# Enough to see a flapping backend's pattern; a stored entry stays a few kilobytes at most.
ERROR_HISTORY_SIZE = 20


class Role(StrEnum):
    """A replica's part in the cluster (:attr:`Cluster.role`): the leader runs the backend cycles,
    followers serve the snapshot it shares."""

    LEADER = "leader"
    FOLLOWER = "follower"


SyncHandler = Callable[[], Awaitable[int]]


class Cluster:
    """This replica's view of the cluster; :meth:`run` keeps it current until cancelled."""

    def __init__(
        self,
        store: Store,
        messenger: Messenger,
        *,
        instance: str,
        ttl: float = 10.0,
        info: Mapping[str, object] | None = None,
        clock: Clock = SYSTEM_CLOCK,
        forget_after: float = FORGET_AFTER,
    ) -> None:
        if not isinstance(instance, str) or not instance.strip():
            raise InvalidInput("instance must be a non-empty string", field="instance")
        if not ttl > 0:
            raise InvalidInput("ttl must be positive", field="ttl")
        if not forget_after > ttl:
            raise InvalidInput("forget_after must be longer than the ttl", field="forget_after")
        self.store = store
        self.messenger = messenger
        self.instance = instance
        self.ttl = ttl
        self.info = dict(info or {})
        self._clock = clock
        self._lease: Leadership | None = None
        self._leader_until = float("-inf")
        self._last_cycle: float | None = None
        self._cycle_seconds: float | None = None
        self._on_sync: SyncHandler | None = None
        self._serving: Subscription | None = None
        self._became_leader: list[Callable[[], None]] = []
        self.forget_after = forget_after
        self._pruned_at = float("-inf")
        self.claims = 0
        self.failed_claims = 0

    @property
    def renew_every(self) -> float:
        return self.ttl / 3

    # ---- what the rest of the service asks -------------------------------------------------
    @property
    def is_leader(self) -> bool:
        return (
            self._lease is not None
            and self._lease.holder == self.instance
            and self._clock.monotonic() < self._leader_until
        )

    @property
    def role(self) -> Role:
        return Role.LEADER if self.is_leader else Role.FOLLOWER

    @property
    def term(self) -> int | None:
        return None if self._lease is None else self._lease.term

    @property
    def leader(self) -> str | None:
        """The leader as last seen (``None`` when nobody holds a live lease)."""
        if self._lease is None or not self._lease.live:
            return None
        if self._lease.holder == self.instance and not self.is_leader:
            return None
        return self._lease.holder

    def fence(self) -> Fence | None:
        """What this replica's cycle writes carry while it leads; ``None`` when it does not."""
        if not self.is_leader or self._lease is None:
            return None
        return self._lease.fence()

    def on_became_leader(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` each time this replica takes the lease (e.g. run a cycle now)."""
        self._became_leader.append(callback)

    def serve_sync(self, handler: SyncHandler) -> None:
        """While leader, answer :data:`SYNC_SUBJECT` with ``handler`` (runs a cycle, returns
        the snapshot version it produced)."""
        self._on_sync = handler

    def cycle_completed(self, seconds: float | None = None) -> None:
        """The leader finished a backend cycle (that took ``seconds``): reported with the next
        renewal - when in the lease, how long in this replica's registry entry."""
        self._last_cycle = self._clock.monotonic()
        if seconds is not None:
            self._cycle_seconds = round(seconds, 6)

    def describe(self) -> dict[str, object]:
        return {
            "instance": self.instance,
            "role": self.role.value,
            "term": self.term,
            "leader": self.leader,
        }

    # ---- the routine -----------------------------------------------------------------------
    async def run(self) -> None:
        """Claim and heartbeat every ``ttl / 3`` until cancelled; resign on the way out."""
        try:
            while True:
                await self.round()
                await self._clock.sleep(self.renew_every)
        finally:
            await asyncio.shield(self._leave())

    async def round(self) -> None:
        """One claim and one heartbeat. A store that fails is logged, never raised: the
        replica simply stops believing it leads once ``ttl`` has passed without a claim."""
        started = self._clock.monotonic()
        was_leader = self.is_leader
        cycle_age = None if self._last_cycle is None else max(0.0, started - self._last_cycle)
        try:
            lease = await self.store.claim_leadership(
                LEADER_ROLE,
                holder=self.instance,
                ttl=timedelta(seconds=self.ttl),
                cycle_age=cycle_age,
            )
        except StoreError as exc:
            self.failed_claims += 1
            logger.warning("cluster: cannot claim the leader lease: %s", exc)
        else:
            self.claims += 1
            previous = self._lease
            self._lease = lease
            if lease.holder == self.instance:
                self._leader_until = started + self.ttl
                if previous is None or previous.term != lease.term:
                    logger.info("cluster: %s leads, term %d", self.instance, lease.term)
            elif previous is None or previous.holder != lease.holder:
                logger.info("cluster: %s leads, term %d", lease.holder or "nobody", lease.term)
        await self._serve_while_leader()
        if self.is_leader and not was_leader:
            for callback in self._became_leader:
                callback()
        try:
            await self.store.heartbeat_replica(self.instance, info=self._heartbeat_info())
        except StoreError as exc:
            logger.warning("cluster: cannot renew this replica's heartbeat: %s", exc)
        if self.is_leader and started - self._pruned_at >= PRUNE_EVERY:
            await self._prune(started)

    async def _prune(self, now: float) -> None:
        try:
            gone = await self.store.prune_replicas(silent_for=timedelta(seconds=self.forget_after))
        except StoreError as exc:
            logger.warning("cluster: cannot prune the replica registry: %s", exc)
            return
        self._pruned_at = now
        for instance in gone:
            logger.info(
                "cluster: forgot replica %s, silent for over %.0f s", instance, self.forget_after
            )

    def _heartbeat_info(self) -> dict[str, object]:
        info = {**self.info, "role": self.role.value, "term": self.term}
        if self._cycle_seconds is not None:
            info["cycleSeconds"] = self._cycle_seconds
        return info

    async def _serve_while_leader(self) -> None:
        if self.is_leader and self._serving is None and self._on_sync is not None:
            try:
                self._serving = await self.messenger.serve(SYNC_SUBJECT, self._answer_sync)
            except BusError as exc:
                logger.warning("cluster: cannot serve sync requests: %s", exc)
        elif not self.is_leader and self._serving is not None:
            serving, self._serving = self._serving, None
            try:
                await serving.unsubscribe()
            except BusError as exc:
                logger.warning("cluster: cannot stop serving sync requests: %s", exc)

    async def _answer_sync(self, _request: bytes) -> bytes:
        if not self.is_leader or self._on_sync is None:
            raise RuntimeStateError(f"{self.instance} is no longer the leader")
        version = await self._on_sync()
        return json.dumps({"version": version, "leader": self.instance}).encode()

    async def _leave(self) -> None:
        """Clean shutdown: stop serving, hand the lease over at once, leave the registry."""
        if self._serving is not None:
            serving, self._serving = self._serving, None
            try:
                await serving.unsubscribe()
            except BusError as exc:
                logger.debug("cluster: unsubscribe on shutdown failed: %s", exc)
        try:
            if self._lease is not None and self._lease.holder == self.instance:
                await self.store.resign_leadership(LEADER_ROLE, holder=self.instance)
            await self.store.remove_replica(self.instance)
        except StoreError as exc:
            logger.warning("cluster: could not resign cleanly: %s", exc)
        self._leader_until = float("-inf")


class SnapshotPublisher:
    """The leader's side of the shared snapshot (see the module docstring)."""

    def __init__(self, store: Store, messenger: Messenger) -> None:
        self._store = store
        self._messenger = messenger
        # What is stored per backend: the state's document, and apart from it the history.
        self._written: dict[str, dict[str, object]] | None = None
        self._history: dict[str, list[dict[str, str]]] = {}
        self._term: int | None = None
        # The document of each state last published, by the state object: the reconciler keeps
        # the same object for a backend whose state did not change, so a steady cycle dumps
        # nothing (dumping every state every cycle was most of a steady publication's time).
        self._documents: dict[str, tuple[LLMState, dict[str, object]]] = {}
        self.version = 0
        self.writes = 0

    async def publish(self, states: Mapping[str, LLMState], fence: Fence) -> int:
        """Write what changed since the last write under ``fence``; the snapshot version."""
        if self._written is None or self._term != fence.term:
            stored = await self._store.read_snapshot()
            self._written, self._history = {}, {}
            for entry in stored.entries:
                document = dict(entry.state)
                self._history[entry.backend_id] = _history_of(document.pop(ERROR_HISTORY, None))
                self._written[entry.backend_id] = document
            self._term = fence.term
            self.version = stored.version
        documents = {key: self._document(key, state) for key, state in states.items()}
        self._documents = {key: (states[key], documents[key]) for key in documents}
        written = self._written
        changed = {
            key: document
            for key, document in documents.items()
            if written.get(key) is not document and written.get(key) != document
        }
        removed = sorted(self._written.keys() - documents.keys())
        if not changed and not removed:
            return self.version
        history = {key: self._next_history(key, document) for key, document in changed.items()}
        try:
            self.version = await self._store.write_snapshot(
                fence=fence,
                changed={
                    key: {**document, ERROR_HISTORY: history[key]} if history[key] else document
                    for key, document in changed.items()
                },
                removed=removed,
            )
        except BaseException:
            # Unknown what landed: read it back before the next comparison.
            self._written = None
            raise
        self.writes += 1
        self._written = documents
        for key in removed:
            self._history.pop(key, None)
        self._history.update(history)
        try:
            await self._messenger.publish(
                SNAPSHOT_NOTICE, json.dumps({"version": self.version}).encode()
            )
        except BusError as exc:
            # Followers still refresh every cycle interval.
            logger.warning("cluster: snapshot notice not sent: %s", exc)
        return self.version

    def _document(self, key: str, state: LLMState) -> dict[str, object]:
        known = self._documents.get(key)
        if known is not None and known[0] is state:
            return known[1]
        document: dict[str, object] = state.model_dump(mode="json")
        return document

    def _next_history(self, key: str, document: Mapping[str, object]) -> list[dict[str, str]]:
        """The backend's error history with this document's change of ``error``, if any."""
        assert self._written is not None
        history = self._history.get(key, [])
        before = self._written.get(key)
        error = str(document.get("error") or "")
        if error == str((before or {}).get("error") or "") or (before is None and not error):
            return history
        change = {"at": str(document.get("observedAt") or ""), "error": error}
        return [change, *history][:ERROR_HISTORY_SIZE]


def _history_of(value: object) -> list[dict[str, str]]:
    """A stored error history, as far as it is readable (a hand-edited row loses what is not)."""
    if not isinstance(value, list):
        return []
    return [
        {"at": str(item.get("at") or ""), "error": str(item.get("error") or "")}
        for item in value[:ERROR_HISTORY_SIZE]
        if isinstance(item, dict)
    ]


class SnapshotCache:
    """Every replica's copy of the shared snapshot (see the module docstring)."""

    def __init__(self, store: Store, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._store = store
        self._clock = clock
        self._states: dict[str, LLMState] = {}
        self._documents: dict[str, dict[str, object]] = {}
        self._observed: dict[str, datetime] = {}
        self.version = 0
        self._confirmed: float | None = None
        # When the leader last completed a cycle (database time), as its lease last said; how
        # long it took only on the leader itself (the others read it in the registry).
        self.last_cycle_at: datetime | None = None
        self.last_cycle_seconds: float | None = None
        self.loads = 0

    def get(self) -> dict[str, LLMState]:
        return dict(self._states)

    def current(self) -> Mapping[str, LLMState]:
        """The copy itself, not a copy of it: the same object until the next load replaces it
        whole, so a reader deriving something from it (the gateway's routing table) can tell
        by identity when to rebuild. Never mutate it."""
        return self._states

    def observed_at(self, backend_id: str) -> datetime | None:
        return self._observed.get(backend_id)

    def error_history(self, backend_id: str) -> list[dict[str, str]] | None:
        """The backend's last changes of ``error``, newest first (``None``: not in the
        snapshot)."""
        document = self._documents.get(backend_id)
        return None if document is None else _history_of(document.get(ERROR_HISTORY))

    def age(self) -> float | None:
        """Seconds since the leader last completed a cycle this copy reflects (``None``
        before any leader ever completed one)."""
        if self._confirmed is None:
            return None
        return max(0.0, self._clock.monotonic() - self._confirmed)

    async def refresh(self) -> None:
        """Read the lease (for the leader's last cycle) and the version; the entries only when
        the version moved. Raises ``StoreError`` when the store cannot be read."""
        read_at = self._clock.monotonic()
        lease = await self._store.get_leadership(LEADER_ROLE)
        if lease is not None and lease.cycle_at is not None:
            self.last_cycle_at = lease.cycle_at
            confirmed = read_at - max(0.0, (lease.now - lease.cycle_at).total_seconds())
            if self._confirmed is None or confirmed > self._confirmed:
                self._confirmed = confirmed
        if await self._store.snapshot_version() != self.version or not self.loads:
            await self._load()

    def confirm(self, seconds: float | None = None) -> None:
        """The leader itself just completed a cycle (that took ``seconds``): its copy is as
        fresh as can be."""
        self._confirmed = self._clock.monotonic()
        if seconds is not None:
            self.last_cycle_seconds = seconds

    async def _load(self) -> None:
        stored = await self._store.read_snapshot()
        states: dict[str, LLMState] = {}
        observed: dict[str, datetime] = {}
        documents: dict[str, dict[str, object]] = {}
        for entry in stored.entries:
            key = entry.backend_id
            if self._documents.get(key) == entry.state and key in self._states:
                # Unchanged: the same (frozen) object, so that serializers caching per state
                # object redo only the backends that changed.
                states[key] = self._states[key]
            else:
                try:
                    states[key] = LLMState.model_validate(entry.state)
                except ValueError:
                    logger.exception("cluster: stored state of %s unreadable", key)
                    continue
            documents[key] = entry.state
            observed[key] = entry.observed_at
        self._states = states
        self._documents = documents
        self._observed = observed
        self.version = stored.version
        self.loads += 1

    async def wait_for(self, version: int, *, timeout: float) -> bool:
        """Refresh until this copy is at ``version`` or newer; False if not within
        ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while self.version < version:
                    await self.refresh()
                    if self.version >= version:
                        break
                    await asyncio.sleep(0.05)
        except TimeoutError:
            return False
        return True

    async def follow(self, messenger: Messenger, *, interval: float) -> None:
        """Refresh on every notice and at least every ``interval`` seconds, until cancelled.
        A bus or store that fails is logged and tried again at the next turn."""
        notices: Subscription | None = None
        messages: AsyncIterator[Message] | None = None
        pending: asyncio.Future[Message | None] | None = None
        try:
            while True:
                if notices is None:
                    try:
                        notices = await messenger.stream(SNAPSHOT_NOTICE, max_pending=1)
                        messages = aiter(notices)
                    except BusError as exc:
                        logger.warning("cluster: no snapshot notices for now: %s", exc)
                try:
                    await self.refresh()
                except StoreError as exc:
                    logger.warning("cluster: snapshot not refreshed: %s", exc)
                if messages is not None and pending is None:
                    pending = asyncio.ensure_future(anext(messages, None))
                sleeper = asyncio.ensure_future(self._clock.sleep(interval))
                try:
                    waiting = (sleeper,) if pending is None else (sleeper, pending)
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    sleeper.cancel()
                    await asyncio.gather(sleeper, return_exceptions=True)
                if pending is not None and pending.done():
                    if pending.result() is None:
                        notices = messages = None  # the subscription ended: subscribe again
                    pending = None
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            if notices is not None:
                await asyncio.shield(notices.unsubscribe())
