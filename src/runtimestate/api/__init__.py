"""The HTTP API (FastAPI): the Go package's routes over the store, the reconciler and the queue.

Build it with :func:`create_app` from an :class:`ApiContext`; :mod:`runtimestate.service` does
that from settings and runs it on uvicorn.
"""

from runtimestate.api.app import create_app
from runtimestate.api.deps import ApiContext, StateView

__all__ = ["ApiContext", "StateView", "create_app"]
