"""The vLLM driver: a vLLM server serves the model it was started with; report it.

vLLM cannot be told to load or drop a model over its API, so this driver never acts: it reads
``/v1/models`` (OpenAI shape plus ``max_model_len``, ``root`` and ``parent``) and reports what is
served. A served model that nobody declared is an **error** naming it - unlike a cloud account's
drift, a self-hosted server running the wrong model is a misconfiguration an operator must fix.
LoRA adapters (``parent`` set) are listed with their base model's context length.

Context length comes from the declared model, else from ``max_model_len``. A vLLM server serves
completions, so a model declared without capability flags is taken as chat, prompt and stream.

**No API key.** A server started with ``--api-key`` answers every ``/v1/*`` request with 401
``{"error":"Unauthorized"}``. The declaration has no place for a per-server key (the key-value
entries are per cloud provider, and the API, CLI and log masking know only those two), and a key
used here would also have to reach the inference clients, so this release does not send one: the
401 becomes a :class:`~runtimestate.errors.KeyRejected` whose message says the server wants a
key that runtimestate cannot send, instead of a bare "HTTP 401" - an operator sees at once to run
such servers without ``--api-key`` behind a private network, or to wait for per-backend keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from runtimestate.backends.base import (
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    register,
)
from runtimestate.backends.http import decode_json, join_url, status_error
from runtimestate.backends.names import cloud_key
from runtimestate.errors import KeyRejected, ProtocolError
from runtimestate.records import ListModelResponse

__all__ = ["KEY_REQUIRED", "ServedModel", "VllmDriver", "openai_models_url"]

KEY_REQUIRED = "the vLLM server requires an API key (--api-key), which runtimestate does not send"

_COMPLETION = Capabilities(can_chat=True, can_prompt=True, can_stream=True)


def openai_models_url(base_url: str) -> str:
    """``/v1/models`` under ``base_url``, without doubling a ``/v1`` it already ends in."""
    root = base_url.rstrip("/")
    if not root.endswith("/v1"):
        root += "/v1"
    return join_url(root, "/models")


@dataclass(frozen=True, kw_only=True, slots=True)
class ServedModel:
    id: str
    created: int
    max_model_len: int
    parent: str | None = None


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
                max_model_len=length if isinstance(length, int) else 0,
                parent=parent if isinstance(parent, str) else None,
            )
        )
    return tuple(served)


@register
class VllmDriver(Driver[tuple[ServedModel, ...]]):
    type_name = "vllm"

    async def observe(self, ctx: CycleContext, declared: Declared) -> tuple[ServedModel, ...]:
        url = openai_models_url(declared.backend.base_url)
        status, body = await ctx.http.send("GET", url)
        if status == 401:
            raise KeyRejected(f"{KEY_REQUIRED} (HTTP 401)", backend=url)
        if status >= 400:
            raise status_error(status, body, url=url)
        return parse_models(decode_json(body, url=url), url)

    def plan(self, declared: Declared, observed: tuple[ServedModel, ...]) -> BackendPlan:
        wanted = {cloud_key(m.model): m for m in declared.models}
        base_length = {s.id: s.max_model_len for s in observed if s.max_model_len}
        pulled: list[ListModelResponse] = []
        undeclared: list[str] = []
        for served in observed:
            model = wanted.get(cloud_key(served.id))
            if model is None:
                undeclared.append(served.id)
                continue
            length = served.max_model_len or base_length.get(served.parent or "", 0)
            caps = Capabilities.of(model)
            discovered = Capabilities(
                context_length=length,
                can_chat=_COMPLETION.can_chat,
                can_prompt=_COMPLETION.can_prompt,
                can_stream=_COMPLETION.can_stream,
            )
            pulled.append(
                caps.merged(discovered).apply(
                    ListModelResponse(
                        name=model.model,
                        model=served.id,
                        modified_at=datetime.fromtimestamp(served.created, UTC),
                    )
                )
            )
        error = ""
        if undeclared:
            error = "served model not declared: " + ", ".join(undeclared)
        state = declared.base_state().model_copy(
            update={"pulled_models": tuple(pulled), "error": error}
        )
        return BackendPlan(
            backend_id=declared.backend.id,
            backend_name=declared.backend.name,
            actions=(),
            state=state,
        )
