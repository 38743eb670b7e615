"""The OpenAI wire protocol as the vLLM, OpenAI and OpenAI-compatible kinds share it.

Written once here: where the API lives under a declared base URL (``/v1`` appended unless the
URL already ends in it - operators declare both ``http://node:8000`` and
``https://api.openai.com/v1``), and how a ``/v1/models`` listing is read. The listing is
``{"object":"list","data":[...]}``; vLLM adds ``max_model_len`` (the context length),
``root`` and ``parent`` (set on LoRA adapters); other servers add nothing, so a missing
``max_model_len`` is ``None`` - unknown - never 0.

The SDK client of the protocol is :mod:`runtimestate.kinds.openai_client` (imported only when a
model is called: the SDK is slow to import).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from runtimestate.backends.wire import join_url
from runtimestate.errors import ProtocolError

__all__ = ["ServedModel", "ServerListing", "models_url", "openai_root", "parse_models"]


def openai_root(base_url: str) -> str:
    """The API root: the declared URL with ``/v1`` appended unless it already ends in it."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def models_url(base_url: str) -> str:
    """``/v1/models`` under ``base_url``."""
    return join_url(openai_root(base_url), "/models")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedModel:
    """One entry of a ``/v1/models`` listing. ``created`` is Unix seconds (0 when absent);
    ``max_model_len`` is the context length where the server reports it (vLLM), else ``None``;
    ``parent`` is the base model of a LoRA adapter."""

    id: str
    created: int
    max_model_len: int | None = None
    parent: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerListing:
    """What a self-hosted server's driver observed: its models and the key it listed them with
    (the backend's credential; kept out of repr)."""

    models: tuple[ServedModel, ...]
    api_key: str | None = field(default=None, repr=False)
    context_length: int | None = None
    """A context length the server reports for all its models outside the listing."""


def parse_models(body: Any, url: str) -> tuple[ServedModel, ...]:
    """The entries of an OpenAI-style ``{"object":"list","data":[...]}``."""
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise ProtocolError(f"model list from {url} has no data array", backend=url)
    served = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            raise ProtocolError(f"model entry from {url} has no id", backend=url)
        created = item.get("created")
        length = item.get("max_model_len")
        parent = item.get("parent")
        served.append(
            ServedModel(
                id=item["id"],
                created=created if isinstance(created, int) else 0,
                max_model_len=length if isinstance(length, int) and length > 0 else None,
                parent=parent if isinstance(parent, str) else None,
            )
        )
    return tuple(served)
