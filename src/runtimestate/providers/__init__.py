"""Model providers and their clients: the consumer side of the observed state.

``local_provider_adapter(snapshot)`` turns a snapshot into :class:`Provider` values (one per
backend type and model, listing every backend that serves it); a :class:`ClientPool` hands out
:class:`ModelClient` objects (chat, prompt, embed, stream) backed by the official SDKs, and keeps
the :class:`Health` book the resolver reads. The client of each backend kind lives with its
kind (:mod:`runtimestate.kinds`): ``base``, ``limits`` and ``health`` sit below the kinds,
``pool`` and ``adapter`` - which look kinds up - above them. Choosing a provider is the
resolver's job, one layer up.
"""

from runtimestate.providers.adapter import (
    ProviderFromRuntimeState,
    build_providers,
    local_provider_adapter,
)
from runtimestate.providers.base import (
    BackendRef,
    Capability,
    ChatMessage,
    ChatResult,
    ModelClient,
    Provider,
    Sampling,
    SdkSource,
    Usage,
)
from runtimestate.providers.health import Health, HealthConfig
from runtimestate.providers.limits import ClientLimits
from runtimestate.providers.pool import ClientPool

__all__ = [
    "BackendRef",
    "Capability",
    "ChatMessage",
    "ChatResult",
    "ClientLimits",
    "ClientPool",
    "Health",
    "HealthConfig",
    "ModelClient",
    "Provider",
    "ProviderFromRuntimeState",
    "Sampling",
    "SdkSource",
    "Usage",
    "build_providers",
    "local_provider_adapter",
]
