"""Model-name normalization, so that declared and observed names compare as their backends do.

The Go package compared raw strings, and Ollama lists ``llama3`` as ``llama3:latest``: every cycle
pulled the "missing" ``llama3`` and deleted the "undeclared" ``llama3:latest``, forever. Ollama
names are ``[host/][namespace/]model[:tag]`` with host ``registry.ollama.ai``, namespace
``library`` and tag ``latest`` by default, and Ollama compares every part case-insensitively
(``EqualFold`` in ``types/model/name.go``). :func:`ollama_key` reproduces that; the cloud and
vLLM drivers compare case-insensitively and ignore Gemini's ``models/`` resource prefix.
"""

from __future__ import annotations

import functools

__all__ = ["cloud_key", "ollama_key"]

_DEFAULT_HOST = "registry.ollama.ai/"
_DEFAULT_NAMESPACE = "library/"
_DEFAULT_TAG = "latest"


# A cycle compares the same few names on every backend: 1,000 nodes x 10 models is 10,000
# calls for ten distinct names.
@functools.lru_cache(maxsize=65536)
def ollama_key(name: str) -> str:
    """The comparison key of an Ollama model name: ``llama3``, ``Llama3:latest`` and
    ``registry.ollama.ai/library/llama3:latest`` all map to ``llama3:latest``."""
    key = name.strip().casefold()
    key, _, _digest = key.partition("@")
    # A colon before the last slash belongs to a host's port, not to a tag.
    last_part = key.rsplit("/", 1)[-1]
    if ":" not in last_part:
        key = f"{key}:{_DEFAULT_TAG}"
    if key.startswith(_DEFAULT_HOST):
        key = key[len(_DEFAULT_HOST) :]
    if key.startswith(_DEFAULT_NAMESPACE):
        key = key[len(_DEFAULT_NAMESPACE) :]
    return key


@functools.lru_cache(maxsize=65536)
def cloud_key(name: str) -> str:
    """The comparison key of an OpenAI, Gemini or vLLM model id."""
    key = name.strip().casefold()
    if key.startswith("models/"):
        key = key[len("models/") :]
    return key
