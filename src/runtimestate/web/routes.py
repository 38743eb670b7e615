"""The dashboard's routes: login, logout, the page shell and its static files.

``GET /ui`` answers the login form without a valid session and the page shell with one. The
shell is the only HTML generated here; it carries the session's CSRF token in a ``<meta>`` tag,
which the page's script sends back in the ``X-CSRF-Token`` header of every request that changes
something. The login and logout forms are plain HTML form posts (they work without script) and
refuse a request whose ``Origin`` is another site, so no other page can log a browser in or out.

Every answer forbids framing and inline script (a ``Content-Security-Policy`` that allows only
this origin), so the page cannot be clickjacked and an injected ``<script>`` would not run.
"""

from __future__ import annotations

import html
import secrets
from urllib.parse import parse_qs, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from runtimestate.api.deps import context, sessions
from runtimestate.api.session import COOKIE, share_revocation

__all__ = ["PREFIX", "install_dashboard"]

PREFIX = "/ui"
MAX_FORM_BYTES = 4096
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

_PAGES = (
    ("overview", "Overview"),
    ("backends", "Backends"),
    ("matrix", "Models"),
    ("downloads", "Downloads"),
    ("plan", "Plan"),
    ("providers", "Providers"),
    ("actions", "Actions"),
)


def _head(title: str) -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title>"
        '<link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="{PREFIX}/static/app.css">'
    )


def _login_page(error: str | None = None) -> str:
    alert = (
        f'<p class="error" role="alert" id="login-error">{html.escape(error)}</p>' if error else ""
    )
    return (
        _head("runtimestate - log in") + '</head><body class="login"><main id="main">'
        "<h1>runtimestate</h1>"
        f'<form method="post" action="{PREFIX}/login" class="card">'
        '<label for="token">Admin token</label>'
        '<input id="token" name="token" type="password" autocomplete="current-password" '
        "required autofocus>"
        f"{alert}"
        '<button type="submit">Log in</button>'
        '<p class="hint">The token is printed by <code>runtimestate serve</code> on its first '
        "start and kept in the file <code>token</code> of its data directory.</p>"
        "</form></main></body></html>"
    )


# Routes other parts of the service may add; the page reads them only when the app has them, so
# it never asks for what would be a 404 (a console error in the browser).
OPTIONAL_ROUTES = {
    "summary": "/state/summary",
    "events": "/state/events",
    "cluster": "/cluster",
    "retry": "/queue/retry",
    "errors": "/state/{backend}/errors",
    "health": "/providers/health",
}


def _features(app: FastAPI) -> str:
    # The app's schema lists every route of its included routers (which ``app.routes`` wraps
    # in objects without a path); FastAPI builds it once and keeps it.
    paths = set(app.openapi().get("paths", {}))
    return " ".join(name for name, path in OPTIONAL_ROUTES.items() if path in paths)


def _shell(csrf: str, features: str) -> str:
    links = "".join(
        f'<li><a href="#/{slug}" data-page="{slug}">{label}</a></li>' for slug, label in _PAGES
    )
    token = html.escape(csrf)
    return (
        _head("runtimestate")
        + f'<meta name="csrf-token" content="{token}">'
        + f'<meta name="features" content="{html.escape(features)}">'
        + f'<script src="{PREFIX}/static/app.js" defer></script></head><body>'
        '<a class="skip" href="#main">Skip to content</a>'
        '<header><p class="brand">runtimestate</p>'
        f'<nav aria-label="Pages"><ul>{links}</ul></nav>'
        '<p id="live" role="status" aria-live="polite" data-state="connecting">connecting</p>'
        '<button type="button" id="theme" aria-pressed="false">Dark</button>'
        f'<form method="post" action="{PREFIX}/logout">'
        f'<input type="hidden" name="csrf" value="{token}">'
        '<button type="submit">Log out</button></form></header>'
        '<main id="main" tabindex="-1"><p>Loading...</p></main>'
        "<noscript><p>The dashboard needs JavaScript; the CLI "
        "(<code>runtimestate state</code>) shows the same data.</p></noscript>"
        "</body></html>"
    )


def _html(body: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(body, status_code=status, headers=SECURITY_HEADERS)


def _same_origin(request: Request) -> bool:
    """Whether a form post comes from this site (browsers send ``Origin`` on every POST)."""
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = request.headers.get("host", "")
    return urlsplit(origin).netloc == host


async def _form(request: Request) -> dict[str, str]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        return {}
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in fields.items() if values}


def install_dashboard(app: FastAPI) -> None:
    """Add the dashboard's routes and static files to an app built by ``create_app``."""
    app.mount(
        f"{PREFIX}/static",
        StaticFiles(packages=[("runtimestate.web", "static")]),
        name="ui-static",
    )

    @app.get(PREFIX, include_in_schema=False)
    async def page(request: Request) -> Response:
        session = sessions(request).check(request.cookies.get(COOKIE))
        if session is None:
            return _html(_login_page())
        return _html(_shell(session.csrf, _features(app)))

    @app.post(f"{PREFIX}/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        if not _same_origin(request):
            return _html(_login_page("This form was sent from another site."), 403)
        token = (await _form(request)).get("token", "")
        expected = context(request).token
        if not secrets.compare_digest(token.encode(), expected.encode()):
            return _html(_login_page("That is not the admin token."), 401)
        book = sessions(request)
        answer = RedirectResponse(PREFIX, status_code=303, headers=SECURITY_HEADERS)
        answer.set_cookie(
            COOKIE,
            book.issue(),
            max_age=book.lifetime,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return answer

    @app.post(f"{PREFIX}/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        book = sessions(request)
        session = book.check(request.cookies.get(COOKIE))
        form = await _form(request)
        if session is not None:
            if not _same_origin(request) or not book.csrf_ok(session, form.get("csrf")):
                return _html(_login_page("Log out from the dashboard's own button."), 403)
            book.revoke(session)
            ctx = context(request)
            await share_revocation(ctx.store, ctx.messenger, session)
        answer = RedirectResponse(PREFIX, status_code=303, headers=SECURITY_HEADERS)
        answer.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return answer
