"""The vLLM kind: a vLLM server serves the model it was started with; report it.

vLLM cannot be told to load or drop a model over its API, so this driver never acts: it reads
``/v1/models`` (see :mod:`runtimestate.kinds.openai_api`) and reports what is served. A served
model that nobody declared is an **error** naming it - unlike a cloud account's drift, a
self-hosted server running the wrong model is a misconfiguration an operator must fix. LoRA
adapters (``parent`` set) are listed with their base model's context length.

Context length comes from the declared model, else from ``max_model_len``. A vLLM server serves
completions, so a model declared without capability flags is taken as chat, prompt and stream.

**Key.** A server started with ``--api-key`` answers every ``/v1/*`` request with 401. Its key
is the backend's own credential (the key-value entry ``backend-credential:<backend id>``), sent
as ``Authorization: Bearer`` by the driver and by the model client. A 401 without a credential
says that one is needed; with one, that it was refused.
"""

from __future__ import annotations

from datetime import UTC, datetime

from runtimestate.backends.base import (
    COMPLETION,
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    backend_credential,
)
from runtimestate.backends.names import cloud_key
from runtimestate.backends.wire import decode_json, status_error
from runtimestate.errors import KeyRejected
from runtimestate.kinds.base import ClassRef, KeySource, Kind
from runtimestate.kinds.openai_api import ServerListing, models_url, openai_root, parse_models
from runtimestate.records import ListModelResponse

__all__ = ["KEY_REQUIRED", "KIND", "VllmDriver"]

KEY_REQUIRED = (
    "the vLLM server requires an API key (--api-key): store it as the backend's credential"
)


class VllmDriver(Driver[ServerListing]):
    """The ``vllm`` kind's driver: reports what the server serves and never acts; a served model
    nobody declared is the backend's error."""

    async def observe(self, ctx: CycleContext, declared: Declared) -> ServerListing:
        backend = declared.backend
        api_key = await backend_credential(ctx, KIND.credential_key(backend.id))
        url = models_url(backend.base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        secrets = (api_key,) if api_key else ()
        status, body = await ctx.http.send("GET", url, headers=headers, secrets=secrets)
        if status == 401:
            if api_key:
                raise KeyRejected("the backend credential was rejected (HTTP 401)", backend=url)
            raise KeyRejected(f"{KEY_REQUIRED} (HTTP 401)", backend=url)
        if status >= 400:
            raise status_error(status, body, url=url, secrets=secrets)
        return ServerListing(
            models=parse_models(decode_json(body, url=url, secrets=secrets), url), api_key=api_key
        )

    def plan(self, declared: Declared, observed: ServerListing) -> BackendPlan:
        wanted = {cloud_key(m.model): m for m in declared.models}
        base_length = {s.id: s.max_model_len for s in observed.models if s.max_model_len}
        pulled: list[ListModelResponse] = []
        undeclared: list[str] = []
        for served in observed.models:
            model = wanted.get(cloud_key(served.id))
            if model is None:
                undeclared.append(served.id)
                continue
            length = served.max_model_len or base_length.get(served.parent or "") or 0
            caps = Capabilities.of(model)
            discovered = Capabilities(context_length=length, flags=COMPLETION)
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
            state=state.with_api_key(observed.api_key),
        )


KIND = Kind(
    name="vllm",
    title="vLLM",
    driver=VllmDriver,
    client=ClassRef("runtimestate.kinds.openai_client:OpenAIClient"),
    api_root=openai_root,
    key_source=KeySource.BACKEND_CREDENTIAL,
)
