"""runtimestate: keeps a fleet of LLM backends in line with what its operator declared.

The public API is exactly ``__all__``: the Go package's names, the store, bus, resolver and
client-pool entry points, and every exception of :mod:`runtimestate.errors`, so that an
application needs one import (a test checks that every exported name exists and is documented).

Heavy names are imported lazily (PEP 562): ``State`` pulls in the drivers' HTTP stack and
``local_provider_adapter`` the ollama, openai and google-genai SDKs, about a second of imports
that the CLI - which only talks HTTP to the service - should not pay on every command. Type
checkers see ordinary imports.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtimestate.errors import (
    AllCoolingDown,
    BackendError,
    BackendTimeout,
    BackendUnreachable,
    BadRequest,
    BusError,
    Conflict,
    Fenced,
    InvalidInput,
    KeyRejected,
    NoProvider,
    NoResponders,
    NotFound,
    ProtocolError,
    RateLimited,
    RemoteError,
    RequestTimeout,
    RuntimeStateError,
    ServerError,
    StoreError,
    Unsupported,
)
from runtimestate.records import (
    PROVIDER_KEY_PREFIX,
    ListModelResponse,
    LLMState,
    ModelDetails,
    ProviderConfig,
)

if TYPE_CHECKING:
    from runtimestate.backends import BackendPlan
    from runtimestate.bus import Messenger, open_bus
    from runtimestate.kinds import BackendType
    from runtimestate.kinds.gemini import GEMINI_KEY
    from runtimestate.kinds.openai import OPENAI_KEY
    from runtimestate.providers import (
        ClientPool,
        Provider,
        ProviderFromRuntimeState,
        local_provider_adapter,
    )
    from runtimestate.resolver import Resolver, ResolveRequest
    from runtimestate.state import State
    from runtimestate.store import Store, open_store

__version__ = "0.1.0"

__all__ = [
    "GEMINI_KEY",
    "OPENAI_KEY",
    "PROVIDER_KEY_PREFIX",
    "AllCoolingDown",
    "BackendError",
    "BackendPlan",
    "BackendTimeout",
    "BackendType",
    "BackendUnreachable",
    "BadRequest",
    "BusError",
    "ClientPool",
    "Conflict",
    "Fenced",
    "InvalidInput",
    "KeyRejected",
    "LLMState",
    "ListModelResponse",
    "Messenger",
    "ModelDetails",
    "NoProvider",
    "NoResponders",
    "NotFound",
    "ProtocolError",
    "Provider",
    "ProviderConfig",
    "ProviderFromRuntimeState",
    "RateLimited",
    "RemoteError",
    "RequestTimeout",
    "ResolveRequest",
    "Resolver",
    "RuntimeStateError",
    "ServerError",
    "State",
    "Store",
    "StoreError",
    "Unsupported",
    "__version__",
    "local_provider_adapter",
    "open_bus",
    "open_store",
]

_LAZY = {
    "BackendPlan": "runtimestate.backends",
    "BackendType": "runtimestate.kinds",
    "GEMINI_KEY": "runtimestate.kinds.gemini",
    "OPENAI_KEY": "runtimestate.kinds.openai",
    "Messenger": "runtimestate.bus",
    "open_bus": "runtimestate.bus",
    "ClientPool": "runtimestate.providers",
    "Provider": "runtimestate.providers",
    "ProviderFromRuntimeState": "runtimestate.providers",
    "local_provider_adapter": "runtimestate.providers",
    "ResolveRequest": "runtimestate.resolver",
    "Resolver": "runtimestate.resolver",
    "State": "runtimestate.state",
    "Store": "runtimestate.store",
    "open_store": "runtimestate.store",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtimestate' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
