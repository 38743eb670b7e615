"""Backend drivers, one module per backend type, registered by type name.

Importing this package imports every driver module, which registers it (see
:func:`~runtimestate.backends.base.register`); the state layer asks :func:`driver_types` for
them and never names a type itself.
"""

from runtimestate.backends import gemini, ollama, openai, vllm
from runtimestate.backends.base import (
    Action,
    ActionKind,
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    DriverOptions,
    driver_types,
    register,
)
from runtimestate.backends.http import HttpClient
from runtimestate.backends.names import cloud_key, ollama_key
from runtimestate.backends.ollama import open_pull

__all__ = [
    "Action",
    "ActionKind",
    "BackendPlan",
    "Capabilities",
    "CycleContext",
    "Declared",
    "Driver",
    "DriverOptions",
    "HttpClient",
    "cloud_key",
    "driver_types",
    "gemini",
    "ollama",
    "ollama_key",
    "open_pull",
    "openai",
    "register",
    "vllm",
]
