"""Browser sessions: the admin token exchanged once for a signed, expiring session cookie.

A browser cannot be trusted to keep the admin token (any script on the page could read it), so
the web dashboard asks for it once, on its login form, and answers with a cookie the page's
scripts cannot read (``HttpOnly``) and that no other site can make the browser send
(``SameSite=Strict``). The API accepts that cookie wherever it accepts the bearer token; a
request that changes something must also carry the session's CSRF token in a header
(:data:`CSRF_HEADER`), which the page reads from its own HTML - a forged form on another origin
can send neither.

The cookie is ``<expiry>.<session id>.<signature>``, signed with HMAC-SHA256 under a key derived
from the admin token. No session is stored: every replica that knows the token verifies a
cookie issued by any other, and rotating the token ends every session at once.

Logging out must end the session on every replica, not only the one that served the logout
(the cookie is valid everywhere). The logout revokes the session id in this process, records
it in the store (a key-value entry under :data:`REVOKED_PREFIX`, holding the session's expiry)
and announces it on :data:`REVOKED_SUBJECT`. Every replica runs :func:`follow_revocations`:
it applies an announcement at once, and reads the stored ones at start and every interval - so
a replica that was cut off from the bus, or started later, still refuses the cookie. A revoked
id is forgotten, in memory and in the store, once the session would have expired anyway, so
both stay small. The id alone is harmless: a cookie also needs the signature.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
from dataclasses import dataclass

from runtimestate.bus.base import Messenger
from runtimestate.clock import SYSTEM_CLOCK, Clock
from runtimestate.errors import BusError, NotFound, RuntimeStateError, StoreError
from runtimestate.store.base import Store

__all__ = [
    "COOKIE",
    "CSRF_HEADER",
    "REVOKED_PREFIX",
    "REVOKED_SUBJECT",
    "SESSION_SECONDS",
    "Session",
    "Sessions",
    "follow_revocations",
    "share_revocation",
]

logger = logging.getLogger(__name__)

COOKIE = "runtimestate_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600
REVOKED_PREFIX = "session-revoked/"
REVOKED_SUBJECT = "runtimestate.session.revoked"


@dataclass(frozen=True, slots=True)
class Session:
    """A verified session: its id, when it ends (epoch seconds) and its CSRF token."""

    id: str
    expires: int
    csrf: str


class Sessions:
    """Issues and verifies session cookies for one admin token."""

    def __init__(
        self, token: str, *, clock: Clock = SYSTEM_CLOCK, lifetime: int = SESSION_SECONDS
    ) -> None:
        self._key = hashlib.sha256(b"runtimestate session\x00" + token.encode()).digest()
        self._clock = clock
        self.lifetime = lifetime
        self._revoked: dict[str, int] = {}

    def _now(self) -> int:
        return int(self._clock.now().timestamp())

    def _sign(self, purpose: str, payload: str) -> str:
        message = f"{purpose}\x00{payload}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def issue(self) -> str:
        """A new session's cookie value."""
        expires = self._now() + self.lifetime
        session_id = secrets.token_hex(16)
        payload = f"{expires}.{session_id}"
        return f"{payload}.{self._sign('cookie', payload)}"

    def check(self, cookie: str | None) -> Session | None:
        """The session a cookie value stands for, or None if forged, expired or revoked."""
        if not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        expires_text, session_id, signature = parts
        expected = self._sign("cookie", f"{expires_text}.{session_id}")
        if not hmac.compare_digest(signature.encode(), expected.encode()):
            return None
        expires = int(expires_text)
        if expires <= self._now() or session_id in self._revoked:
            return None
        return Session(id=session_id, expires=expires, csrf=self._sign("csrf", session_id))

    def csrf_ok(self, session: Session, header: str | None) -> bool:
        """Whether ``header`` is the session's CSRF token (constant-time)."""
        return header is not None and hmac.compare_digest(header.encode(), session.csrf.encode())

    def revoke(self, session: Session) -> None:
        """End a session in this process before its expiry (logout)."""
        self.revoke_id(session.id, session.expires)

    def revoke_id(self, session_id: str, expires: int) -> bool:
        """End the session ``session_id`` (which expires at ``expires``) in this process;
        False when it has expired anyway (nothing to remember)."""
        now = self._now()
        self._revoked = {sid: end for sid, end in self._revoked.items() if end > now}
        if expires <= now:
            return False
        self._revoked[session_id] = expires
        return True


async def share_revocation(store: Store, messenger: Messenger, session: Session) -> None:
    """Make a logout hold on every replica: stored for those that read it later, announced
    for those listening now. Either one failing is logged and the other still tried; the
    logout itself (this replica, the browser's cookie) stands in any case."""
    try:
        await store.set_kv(REVOKED_PREFIX + session.id, session.expires)
    except StoreError as exc:
        logger.warning("logout not stored (replicas that miss the announcement allow it): %s", exc)
    notice = json.dumps({"id": session.id, "expires": session.expires}).encode()
    try:
        await messenger.publish(REVOKED_SUBJECT, notice)
    except BusError as exc:
        logger.warning("logout not announced (replicas see it at their next store read): %s", exc)


async def follow_revocations(
    sessions: Sessions,
    store: Store,
    messenger: Messenger,
    *,
    interval: float,
    clock: Clock = SYSTEM_CLOCK,
) -> None:
    """The routine that applies every replica's logouts to ``sessions``: announcements at
    once, the stored ones on (re)subscribing and every ``interval`` seconds (deleting those past
    their session's end). Runs until cancelled; a failing store or bus is logged and tried
    again, and either one alone keeps logouts applied."""

    async def load() -> None:
        try:
            await _load_revocations(sessions, store)
        except StoreError as exc:
            logger.warning("stored logouts unavailable: %s", exc)

    async def from_bus() -> None:
        while True:
            try:
                async with await messenger.stream(REVOKED_SUBJECT) as notices:
                    # Subscribed first, then read: a logout in between is in one or the other.
                    await load()
                    async for message in notices:
                        _apply_notice(sessions, message.data)
            except RuntimeStateError as exc:
                logger.warning("logout announcements unavailable: %s", exc)
                await load()
            await clock.sleep(interval)

    async def from_store() -> None:
        while True:
            await clock.sleep(interval)
            await load()

    async with asyncio.TaskGroup() as group:
        group.create_task(from_bus(), name="logout announcements")
        group.create_task(from_store(), name="stored logouts")


async def _load_revocations(sessions: Sessions, store: Store) -> None:
    for entry in await store.list_all_kv_prefix(REVOKED_PREFIX):
        session_id = entry.key.removeprefix(REVOKED_PREFIX)
        if isinstance(entry.value, int) and sessions.revoke_id(session_id, entry.value):
            continue
        # Past its session's end (or not an expiry at all): nothing left to refuse.
        with contextlib.suppress(NotFound):
            await store.delete_kv(entry.key)


def _apply_notice(sessions: Sessions, data: bytes) -> None:
    try:
        notice = json.loads(data)
        session_id, expires = notice["id"], notice["expires"]
    except (ValueError, TypeError, KeyError):
        session_id = expires = None
    if isinstance(session_id, str) and isinstance(expires, int):
        sessions.revoke_id(session_id, expires)
    else:
        logger.warning("malformed logout announcement ignored")
