"""The gateway: the fleet served as one OpenAI- and Ollama-compatible endpoint.

:class:`Gateway` routes every request through the resolver to a backend that really holds the
model (see :mod:`.routing`), relays the answer as bytes (:mod:`.upstream`), translates the Ollama
API for backends that speak only OpenAI's (:mod:`.translate`), and checks gateway API keys
(:mod:`.keys`), which are separate from the admin token. The service mounts it in front of the
admin API on the same port.
"""

from runtimestate.gateway.app import Gateway, GatewayConfig, SnapshotSource
from runtimestate.gateway.keys import GatewayKey, KeyBook, add_key, list_keys, remove_key

__all__ = [
    "Gateway",
    "GatewayConfig",
    "GatewayKey",
    "KeyBook",
    "SnapshotSource",
    "add_key",
    "list_keys",
    "remove_key",
]
