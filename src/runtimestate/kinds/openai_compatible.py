"""The OpenAI-compatible kind: a self-hosted server that speaks the OpenAI protocol.

llama.cpp's server, LM Studio, LocalAI, TGI and the like: one ``GET <root>/v1/models`` per
cycle (the shared ``/v1`` rule of :mod:`runtimestate.kinds.openai_api`), with the backend's own
optional key (``backend-credential:<backend id>``) as ``Authorization: Bearer``. Unlike the
``openai`` kind there is no 24 h listing cache: a self-hosted server can die or be restarted with
other models at any time, and a listing that is cached cannot tell - so every cycle asks it.
Models can be neither pulled nor deleted over the protocol.

* Served models nobody declared are drift (``undeclared_models``), not an error: such servers
  often serve a directory of models at once.
* The context length is the declared one, else the listing's ``max_model_len`` when the server
  reports it, else the context size llama.cpp's server reports in ``GET /props``
  (``default_generation_settings.n_ctx``; asked only while a declared model's length is unknown,
  and remembered until the listing changes). Otherwise it is unknown: it shows as 0 in the JSON
  of the Go runtimestate package, and the state carries a warning naming the models - never a
  silent 0, which would exclude the backend from every request with a minimum context unnoticed.
* A model declared without capability flags is taken as chat, prompt and stream (an embedding
  model when its id says ``embedding``), as for the ``openai`` kind.
"""

from __future__ import annotations

import json

from runtimestate.backends.base import (
    COMPLETION,
    EMBEDDING,
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    DriverOptions,
    backend_credential,
)
from runtimestate.backends.names import cloud_key
from runtimestate.backends.wire import decode_json, join_url, status_error
from runtimestate.errors import BackendError, KeyRejected
from runtimestate.kinds.base import ClassRef, KeySource, Kind
from runtimestate.kinds.openai_api import (
    ServedModel,
    ServerListing,
    models_url,
    openai_root,
    parse_models,
)
from runtimestate.records import ListModelResponse

__all__ = ["KIND", "OpenAICompatibleDriver"]


class OpenAICompatibleDriver(Driver[ServerListing]):
    """The ``openai-compatible`` kind's driver: lists ``/v1/models`` on every cycle and asks
    llama.cpp's ``/props`` for a context length neither declared nor listed; never pulls or
    deletes."""

    def __init__(self, options: DriverOptions) -> None:
        super().__init__(options)
        # Per backend: the listed ids and base URL /props was asked for, and its answer.
        self._props: dict[str, tuple[tuple[str, ...], str, int | None]] = {}

    def forget(self, backend_id: str) -> None:
        self._props.pop(backend_id, None)

    async def _reported_context(
        self,
        ctx: CycleContext,
        declared: Declared,
        served: tuple[ServedModel, ...],
        api_key: str | None,
    ) -> int | None:
        """llama.cpp's context size from ``/props``, when a declared model needs it."""
        wanted = {cloud_key(m.model): m for m in declared.models if not m.context_length}
        if not any(s.max_model_len is None and cloud_key(s.id) in wanted for s in served):
            return None
        backend = declared.backend
        ids = tuple(s.id for s in served)
        seen = self._props.get(backend.id)
        if seen is not None and seen[0] == ids and seen[1] == backend.base_url:
            return seen[2]
        url = join_url(openai_root(backend.base_url).removesuffix("/v1"), "/props")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        length: int | None = None
        try:
            status, body = await ctx.http.send(
                "GET", url, headers=headers, secrets=(api_key,) if api_key else ()
            )
            if status == 200:
                props = json.loads(body)
                settings = (
                    props.get("default_generation_settings") if isinstance(props, dict) else None
                )
                n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
                if isinstance(n_ctx, int) and not isinstance(n_ctx, bool) and n_ctx > 0:
                    length = n_ctx
        except (BackendError, ValueError):
            # Not every server has /props; a missing or odd answer leaves the length unknown.
            length = None
        self._props[backend.id] = (ids, backend.base_url, length)
        return length

    async def observe(self, ctx: CycleContext, declared: Declared) -> ServerListing:
        backend = declared.backend
        api_key = await backend_credential(ctx, KIND.credential_key(backend.id))
        url = models_url(backend.base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        secrets = (api_key,) if api_key else ()
        status, body = await ctx.http.send("GET", url, headers=headers, secrets=secrets)
        if status in (401, 403):
            detail = "was rejected" if api_key else "is required and none is stored"
            raise KeyRejected(f"the backend credential {detail} (HTTP {status})", backend=url)
        if status >= 400:
            raise status_error(status, body, url=url, secrets=secrets)
        served = parse_models(decode_json(body, url=url, secrets=secrets), url)
        reported = await self._reported_context(ctx, declared, served, api_key)
        return ServerListing(models=served, api_key=api_key, context_length=reported)

    def plan(self, declared: Declared, observed: ServerListing) -> BackendPlan:
        wanted = {cloud_key(m.model): m for m in declared.models}
        pulled: list[ListModelResponse] = []
        drift: list[str] = []
        unknown: list[str] = []
        for served in observed.models:
            model = wanted.get(cloud_key(served.id))
            if model is None:
                drift.append(served.id)
                continue
            discovered = Capabilities(
                context_length=served.max_model_len or observed.context_length or 0,
                flags=EMBEDDING if "embedding" in served.id else COMPLETION,
            )
            caps = Capabilities.of(model).merged(discovered)
            if not caps.context_length:
                unknown.append(model.model)
            pulled.append(caps.apply(ListModelResponse(name=model.model, model=served.id)))
        warnings: tuple[str, ...] = ()
        if unknown:
            warnings = (
                "context length unknown (not declared, not reported by the server): "
                + ", ".join(unknown),
            )
        state = declared.base_state().model_copy(
            update={
                "pulled_models": tuple(pulled),
                "undeclared_models": tuple(drift),
                "warnings": warnings,
            }
        )
        return BackendPlan(
            backend_id=declared.backend.id,
            backend_name=declared.backend.name,
            actions=(),
            state=state.with_api_key(observed.api_key),
        )


KIND = Kind(
    name="openai-compatible",
    title="OpenAI-compatible server",
    driver=OpenAICompatibleDriver,
    client=ClassRef("runtimestate.kinds.openai_client:OpenAIClient"),
    api_root=openai_root,
    key_source=KeySource.BACKEND_CREDENTIAL,
)
