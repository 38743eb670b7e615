"""The operator's dashboard: a web page served by ``runtimestate serve`` at ``/ui``.

The page is plain HTML, CSS and JavaScript shipped inside the package (``web/static``): no build
step, no framework, nothing fetched from the network at run time. Plain JavaScript was chosen
over a small library such as htmx because the page's data already exists as the JSON API: the
script reads ``/state``, ``/queue``, ``/state/plan``, a backend's ``/state/{backend}/errors``
and the providers' routes (``/providers/health`` for cooldowns), follows
``/queue/inProgress`` over Server-Sent Events, and sends the same requests a script would, so an
action's validation error is shown in the API's own words and the dashboard can never disagree
with the API. A server-rendered HTML fragment per page would have been a second rendering of the
same data to keep in step.

The Python side (:mod:`runtimestate.web.routes`) is small: the login form that exchanges the admin
token for a session cookie (:mod:`runtimestate.api.session`), logout, the page shell that carries
the session's CSRF token, and the static files.
"""

from runtimestate.web.routes import install_dashboard

__all__ = ["install_dashboard"]
