"""Browser sessions: the admin token exchanged once for a signed, expiring session cookie.

A browser cannot be trusted to keep the admin token (any script on the page could read it), so
the web dashboard asks for it once, on its login form, and answers with a cookie the page's
scripts cannot read (``HttpOnly``) and that no other site can make the browser send
(``SameSite=Strict``). The API accepts that cookie wherever it accepts the bearer token; a
request that changes something must also carry the session's CSRF token in a header
(:data:`CSRF_HEADER`), which the page reads from its own HTML - a forged form on another origin
can send neither.

The cookie is ``<expiry>.<session id>.<signature>``, signed with HMAC-SHA256 under a key derived
from the admin token. Nothing is stored: every replica that knows the token verifies a cookie
issued by any other, and rotating the token ends every session at once. Logging out revokes the
session id in this process (it also expires the cookie in the browser); a revoked id is
forgotten when it would have expired anyway, so the set stays small.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from runtimestate.clock import SYSTEM_CLOCK, Clock

__all__ = ["COOKIE", "CSRF_HEADER", "SESSION_SECONDS", "Session", "Sessions"]

COOKIE = "runtimestate_session"
CSRF_HEADER = "X-CSRF-Token"
SESSION_SECONDS = 12 * 3600


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
        now = self._now()
        self._revoked = {sid: end for sid, end in self._revoked.items() if end > now}
        self._revoked[session.id] = session.expires
