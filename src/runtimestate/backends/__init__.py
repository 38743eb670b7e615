"""The driver framework: the driver contract, the HTTP boundary, what cloud drivers share.

The drivers themselves - one per backend kind - live with their kinds in
:mod:`runtimestate.kinds`. This package imports nothing heavy at import time: the aiohttp
session (:class:`HttpClient`) is imported on first use (PEP 562), because the CLI reads the
kinds registry, whose drivers import from here, on every command.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtimestate.backends.base import (
    COMPLETION,
    EMBEDDING,
    Action,
    ActionKind,
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    DriverOptions,
    backend_credential,
)
from runtimestate.backends.names import cloud_key, ollama_key

if TYPE_CHECKING:
    from runtimestate.backends.http import HttpClient

__all__ = [
    "COMPLETION",
    "EMBEDDING",
    "Action",
    "ActionKind",
    "BackendPlan",
    "Capabilities",
    "CycleContext",
    "Declared",
    "Driver",
    "DriverOptions",
    "HttpClient",
    "backend_credential",
    "cloud_key",
    "ollama_key",
]


def __getattr__(name: str) -> Any:
    if name == "HttpClient":
        value = importlib.import_module("runtimestate.backends.http").HttpClient
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
