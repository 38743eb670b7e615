"""The dashboard's login, session cookie and CSRF check, through the real app (no browser).

The browser tests show the happy path in Chromium; these pin the refusals that a browser test
would only see indirectly: a forged or expired cookie, a change without the CSRF token, a login
posted from another site, a revoked session after logout.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import pytest

from runtimestate.api import ApiContext, create_app
from runtimestate.api.session import (
    COOKIE,
    CSRF_HEADER,
    REVOKED_PREFIX,
    REVOKED_SUBJECT,
    SESSION_SECONDS,
    Sessions,
    follow_revocations,
)
from runtimestate.bus.base import Messenger
from runtimestate.clock import FakeClock
from runtimestate.store.base import Store
from runtimestate.web import install_dashboard
from runtimestate.web.routes import OPTIONAL_ROUTES
from tests.fixtures.polling import eventually

TOKEN = "dashboard-test-token-0123456789"


@pytest.fixture
async def client(store: Store, bus: Messenger) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(ApiContext(store=store, messenger=bus, token=TOKEN))
    install_dashboard(app)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ui.test") as http:
        yield http


async def login(client: httpx.AsyncClient) -> tuple[str, str]:
    """Log in; the cookie value and the CSRF token the page shell carries."""
    answer = await client.post("/ui/login", data={"token": TOKEN})
    assert answer.status_code == 303, answer.text
    set_cookie = answer.headers["set-cookie"]
    assert "HttpOnly" in set_cookie
    assert "SameSite=strict" in set_cookie or "SameSite=Strict" in set_cookie
    cookie = answer.cookies[COOKIE]
    shell = await client.get("/ui")
    found = re.search(r'<meta name="csrf-token" content="([0-9a-f]+)">', shell.text)
    assert found, shell.text[:300]
    return cookie, found.group(1)


async def test_the_page_asks_for_the_token_until_logged_in(client: httpx.AsyncClient) -> None:
    page = await client.get("/ui")
    assert page.status_code == 200
    assert 'name="token"' in page.text
    assert "csrf-token" not in page.text
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    wrong = await client.post("/ui/login", data={"token": "nope"})
    assert wrong.status_code == 401
    assert "not the admin token" in wrong.text
    assert COOKIE not in wrong.cookies


async def test_the_cookie_reads_but_changes_need_the_csrf_token(
    client: httpx.AsyncClient,
) -> None:
    _, csrf = await login(client)
    assert (await client.get("/state/plan")).status_code in (200, 503)
    assert (await client.get("/backends")).status_code == 200
    body = {"name": "n1", "baseUrl": "http://10.0.0.1:11434", "type": "ollama"}
    refused = await client.post("/backends", json=body)
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "forbidden"
    assert CSRF_HEADER in refused.json()["error"]["message"]
    wrong = await client.post("/backends", json=body, headers={CSRF_HEADER: "0" * len(csrf)})
    assert wrong.status_code == 403
    made = await client.post("/backends", json=body, headers={CSRF_HEADER: csrf})
    assert made.status_code == 201, made.text


async def test_the_shell_names_every_optional_route_the_app_has(
    client: httpx.AsyncClient,
) -> None:
    # The page reads an optional route (the summary, the event stream, the cluster, retrying,
    # a backend's history, the providers' health) only when the shell names it.
    await login(client)
    shell = await client.get("/ui")
    found = re.search(r'<meta name="features" content="([^"]*)">', shell.text)
    assert found, shell.text[:300]
    assert set(found.group(1).split()) == set(OPTIONAL_ROUTES)


async def test_a_login_from_another_site_is_refused(client: httpx.AsyncClient) -> None:
    answer = await client.post(
        "/ui/login", data={"token": TOKEN}, headers={"Origin": "https://evil.example"}
    )
    assert answer.status_code == 403
    assert COOKIE not in answer.cookies


async def test_logout_ends_the_session_even_for_a_kept_cookie(client: httpx.AsyncClient) -> None:
    cookie, csrf = await login(client)
    refused = await client.post("/ui/logout", data={"csrf": "forged"})
    assert refused.status_code == 403
    assert (await client.get("/backends")).status_code == 200
    out = await client.post("/ui/logout", data={"csrf": csrf})
    assert out.status_code == 303
    client.cookies.clear()
    client.cookies.set(COOKIE, cookie)
    kept = await client.get("/backends")
    assert kept.status_code == 401
    assert "log in again" in kept.json()["error"]["message"]


def test_a_session_expires_and_a_forged_one_never_starts() -> None:
    clock = FakeClock()
    book = Sessions(TOKEN, clock=clock)
    cookie = book.issue()
    session = book.check(cookie)
    assert session is not None
    assert book.csrf_ok(session, session.csrf)
    expires, sid, signature = cookie.split(".")
    assert book.check(f"{int(expires) + 3600}.{sid}.{signature}") is None, "a longer expiry"
    assert book.check(f"{expires}.{sid}.{'0' * len(signature)}") is None
    assert Sessions("another token", clock=clock).check(cookie) is None
    clock.advance(SESSION_SECONDS - 1)
    assert book.check(cookie) is not None
    clock.advance(1)
    assert book.check(cookie) is None


class Replica:
    """One replica's API (the app and its session book) on the shared store and bus."""

    def __init__(self, store: Store, bus: Messenger) -> None:
        self.app = create_app(ApiContext(store=store, messenger=bus, token=TOKEN))
        install_dashboard(self.app)
        self.sessions: Sessions = self.app.state.sessions
        self.store, self.bus = store, bus

    def client(self) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://ui.test")

    @contextmanager
    def following(self) -> Iterator[asyncio.Task[None]]:
        """This replica's routine that applies the others' logouts, running."""
        task = asyncio.create_task(
            follow_revocations(self.sessions, self.store, self.bus, interval=3600)
        )
        try:
            yield task
        finally:
            task.cancel()


async def _accepted(client: httpx.AsyncClient, cookie: str) -> bool:
    client.cookies.clear()
    client.cookies.set(COOKIE, cookie)
    return (await client.get("/backends")).status_code == 200


async def _listening(replica: Replica, store: Store) -> None:
    """Wait until ``replica``'s routine listens: it reads the store right after subscribing,
    so a logout stored for the occasion shows it has."""
    async with replica.client() as http:
        cookie, _ = await login(http)
    probe = replica.sessions.check(cookie)
    assert probe is not None
    await store.set_kv(REVOKED_PREFIX + probe.id, probe.expires)
    await eventually(lambda: replica.sessions.check(cookie) is None, what="the routine listening")


async def test_a_logout_on_one_replica_ends_the_session_on_the_others(
    store: Store, bus: Messenger
) -> None:
    a, b = Replica(store, bus), Replica(store, bus)
    async with a.client() as on_a, b.client() as on_b:
        cookie, csrf = await login(on_a)
        assert await _accepted(on_b, cookie), "a cookie of one replica is good on all"
        with b.following():
            await _listening(b, store)
            # From here on, b reads the store again only in an hour: the announcement it is.
            out = await on_a.post("/ui/logout", data={"csrf": csrf})
            assert out.status_code == 303
            await eventually(lambda: b.sessions.check(cookie) is None, what="b revoked it")
        assert not await _accepted(on_b, cookie)


async def test_a_replica_that_missed_the_announcement_reads_the_logout_from_the_store(
    store: Store, bus: Messenger
) -> None:
    a, late = Replica(store, bus), Replica(store, bus)
    async with a.client() as on_a, late.client() as on_late:
        cookie, csrf = await login(on_a)
        assert (await on_a.post("/ui/logout", data={"csrf": csrf})).status_code == 303
        # Nobody listened: the replica started (or came back to the bus) after the logout.
        assert await _accepted(on_late, cookie)
        with late.following():
            await eventually(lambda: late.sessions.check(cookie) is None, what="read from store")
        assert not await _accepted(on_late, cookie)


async def test_stored_logouts_past_their_session_are_deleted_and_bad_notices_ignored(
    store: Store, bus: Messenger
) -> None:
    clock = FakeClock()
    book = Sessions(TOKEN, clock=clock)
    live_cookie, other_cookie = book.issue(), book.issue()
    live, other = book.check(live_cookie), book.check(other_cookie)
    assert live is not None
    assert other is not None
    now = int(clock.now().timestamp())
    await store.set_kv(REVOKED_PREFIX + "old", now - 1)
    await store.set_kv(REVOKED_PREFIX + "junk", "not an expiry")
    await store.set_kv(REVOKED_PREFIX + live.id, live.expires)
    task = asyncio.create_task(follow_revocations(book, store, bus, interval=3600, clock=clock))
    try:
        await eventually(lambda: book.check(live_cookie) is None, what="the stored logout")
        kept = [e.key for e in await store.list_all_kv_prefix(REVOKED_PREFIX)]
        assert kept == [REVOKED_PREFIX + live.id]
        await bus.publish(REVOKED_SUBJECT, b"{not json")
        await bus.publish(REVOKED_SUBJECT, json.dumps({"id": 7, "expires": "x"}).encode())
        notice = {"id": other.id, "expires": other.expires}
        await bus.publish(REVOKED_SUBJECT, json.dumps(notice).encode())
        await eventually(lambda: book.check(other_cookie) is None, what="the good notice")
        assert not task.done(), "bad notices do not end the routine"
    finally:
        task.cancel()
