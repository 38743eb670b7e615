"""The Ollama kind: nodes whose models are pulled and deleted to match the declaration.

The driver (:mod:`.driver`) lists, pulls and deletes over Ollama's own API; the model client
(:mod:`.client`, loaded on first use) calls models through the official ``ollama`` SDK. Ollama
takes no key, and its API lives at the declared base URL itself.
"""

from __future__ import annotations

from runtimestate.kinds.base import ClassRef, Kind
from runtimestate.kinds.ollama.driver import OllamaDriver, holds, open_pull

__all__ = ["KIND"]

KIND = Kind(
    name="ollama",
    title="Ollama",
    driver=OllamaDriver,
    client=ClassRef("runtimestate.kinds.ollama.client:OllamaClient"),
    pull=open_pull,
    holds=holds,
    can_delete=True,
)
