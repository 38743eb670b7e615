"""The Ollama kind's driver: keep a node's inventory equal to its declared models.

``observe`` lists ``/api/tags`` and, for declared models whose context length or capabilities
are not declared, asks ``/api/show`` - once per digest, since a digest names immutable content, so
a steady cycle costs one request per node. ``plan`` compares **normalized** names
(:func:`~runtimestate.backends.names.ollama_key`) and decides:

* every declared model that is missing is to be pulled; the cycle turns these into pull tasks,
  one per (node, model), which the database runs one at a time per node (see
  :mod:`runtimestate.downloads`), so one model that cannot be pulled never blocks the rest;
* models present but not declared are deleted (unless ``delete_undeclared`` is off, in which case
  they are reported as drift in ``undeclared_models``).

``act`` deletes, and lists again only if something was deleted; the cycle queues the pulls of
all nodes in one batch (see :mod:`runtimestate.state`). A failed delete is logged, counted and
shown in the state's ``error``; it never hides the inventory.

:func:`open_pull` is the NDJSON ``/api/pull`` stream the download cycle consumes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from runtimestate.backends.base import (
    COMPLETION,
    EMBEDDING,
    Action,
    ActionKind,
    BackendPlan,
    Capabilities,
    CycleContext,
    Declared,
    Driver,
    DriverOptions,
)
from runtimestate.backends.names import ollama_key
from runtimestate.backends.wire import decode_json, join_url, status_error
from runtimestate.errors import BackendError, ProtocolError, RuntimeStateError
from runtimestate.metrics import MODELS_DELETED
from runtimestate.records import ListModelResponse, LLMState

if TYPE_CHECKING:
    from runtimestate.backends.http import HttpClient

__all__ = ["OllamaDriver", "OllamaInventory", "holds", "open_pull", "parse_show"]

logger = logging.getLogger(__name__)

# Digests are content hashes, so cached /api/show answers never go stale; the bound only keeps a
# fleet that churns through many models from growing the cache forever.
_SHOW_CACHE_MAX = 10_000


@dataclass(frozen=True, kw_only=True, slots=True)
class OllamaInventory:
    """What ``observe`` found on one node."""

    models: tuple[ListModelResponse, ...]
    discovered: Mapping[str, Capabilities]
    problems: tuple[str, ...] = ()


def parse_show(body: Any) -> Capabilities:
    """Capabilities from an ``/api/show`` answer: ``completion`` means chat, prompt and stream;
    ``embedding`` means embed; the context length is ``<general.architecture>.context_length``."""
    if not isinstance(body, dict):
        raise ProtocolError("/api/show answer is not an object")
    capabilities = body.get("capabilities") or []
    model_info = body.get("model_info") or {}
    if not isinstance(capabilities, list) or not isinstance(model_info, dict):
        raise ProtocolError("/api/show answer has malformed capabilities or model_info")
    arch = model_info.get("general.architecture")
    context = model_info.get(f"{arch}.context_length", 0) if isinstance(arch, str) else 0
    flags = (COMPLETION if "completion" in capabilities else frozenset()) | (
        EMBEDDING if "embedding" in capabilities else frozenset()
    )
    return Capabilities(context_length=context if isinstance(context, int) else 0, flags=flags)


def _parse_tags(body: Any, url: str) -> tuple[ListModelResponse, ...]:
    if not isinstance(body, dict) or not isinstance(body.get("models", []), list):
        raise ProtocolError(f"/api/tags answer from {url} is not a model list", backend=url)
    models = []
    for raw in body.get("models") or []:
        if not isinstance(raw, dict):
            raise ProtocolError(f"/api/tags entry from {url} is not an object", backend=url)
        raw = {**raw}
        raw.setdefault("name", raw.get("model", ""))
        raw.setdefault("model", raw["name"])
        try:
            models.append(ListModelResponse.model_validate(raw))
        except ValidationError as exc:
            raise ProtocolError(f"/api/tags entry from {url} is malformed", backend=url) from exc
    return tuple(models)


def open_pull(
    http: HttpClient, base_url: str, model: str
) -> AbstractAsyncContextManager[AsyncIterator[dict[str, Any]]]:
    """The ``/api/pull`` progress stream of ``model`` on the node at ``base_url``."""
    return http.stream_lines(
        "POST",
        join_url(base_url, "/api/pull"),
        json_body={"model": model, "insecure": False, "stream": True},
    )


async def holds(http: HttpClient, base_url: str, model: str) -> bool:
    """Whether the node at ``base_url`` lists ``model`` (in any spelling Ollama accepts)."""
    tags_url = join_url(base_url, "/api/tags")
    listed = _parse_tags(await http.request_json("GET", tags_url), base_url)
    key = ollama_key(model)
    return any(ollama_key(m.name) == key for m in listed)


class OllamaDriver(Driver[OllamaInventory]):
    """The ``ollama`` kind's driver: plans the pulls of what is missing and deletes what nobody
    declared. It remembers ``/api/show`` answers per digest and a node's last ``/api/tags`` body
    with its plan, so that a steady cycle costs one request and no planning per node."""

    def __init__(self, options: DriverOptions) -> None:
        super().__init__(options)
        self._show_cache: dict[str, Capabilities] = {}
        # Steady state is the common case: a node answers /api/tags with the same bytes cycle
        # after cycle. Remembering the last body (per backend) and the last plan lets a steady
        # cycle skip parsing and planning - most of its CPU on a large fleet. The plan memo is
        # keyed on equal inputs, so ``plan`` stays a pure function.
        self._tags: dict[str, tuple[str, bytes, tuple[ListModelResponse, ...]]] = {}
        self._plans: dict[str, tuple[Declared, OllamaInventory, BackendPlan]] = {}

    def forget(self, backend_id: str) -> None:
        self._tags.pop(backend_id, None)
        self._plans.pop(backend_id, None)

    async def _list(self, ctx: CycleContext, declared: Declared) -> tuple[ListModelResponse, ...]:
        url = declared.backend.base_url
        tags_url = join_url(url, "/api/tags")
        body = await ctx.http.request_bytes("GET", tags_url)
        seen = self._tags.get(declared.backend.id)
        if seen is not None and seen[0] == url and seen[1] == body:
            return seen[2]
        listed = _parse_tags(decode_json(body, url=tags_url), url)
        self._tags[declared.backend.id] = (url, body, listed)
        return listed

    async def observe(self, ctx: CycleContext, declared: Declared) -> OllamaInventory:
        url = declared.backend.base_url
        listed = await self._list(ctx, declared)
        wanted = {ollama_key(m.model): Capabilities.of(m) for m in declared.models}
        to_show = {
            m.digest or m.name: m.name
            for m in listed
            if (caps := wanted.get(ollama_key(m.name))) is not None
            and not caps.complete
            and (m.digest or m.name) not in self._show_cache
        }
        problems: list[str] = []
        if to_show:
            results = await asyncio.gather(
                *(self._show(ctx, url, name) for name in to_show.values()),
                return_exceptions=True,
            )
            for cache_key, name, result in zip(to_show, to_show.values(), results, strict=True):
                if isinstance(result, Capabilities):
                    if len(self._show_cache) >= _SHOW_CACHE_MAX:
                        self._show_cache.clear()
                    self._show_cache[cache_key] = result
                elif isinstance(result, RuntimeStateError):
                    problems.append(f"show {name}: {result}")
                    logger.warning(
                        "model details unavailable",
                        extra={"backend_id": declared.backend.id, "model": name},
                    )
                else:
                    raise result
        discovered = {
            m.digest or m.name: self._show_cache[m.digest or m.name]
            for m in listed
            if (m.digest or m.name) in self._show_cache
        }
        return OllamaInventory(
            models=listed,
            discovered=discovered,
            problems=tuple(problems),
        )

    async def _show(self, ctx: CycleContext, url: str, name: str) -> Capabilities:
        body = await ctx.http.request_json(
            "POST", join_url(url, "/api/show"), json_body={"model": name}
        )
        return parse_show(body)

    def plan(self, declared: Declared, observed: OllamaInventory) -> BackendPlan:
        memo = self._plans.get(declared.backend.id)
        if memo is not None and memo[1] == observed and memo[0] == declared:
            return memo[2]
        plan = self._plan(declared, observed)
        self._plans[declared.backend.id] = (declared, observed, plan)
        return plan

    def _plan(self, declared: Declared, observed: OllamaInventory) -> BackendPlan:
        wanted = {ollama_key(m.model): m for m in declared.models}
        present = {ollama_key(m.name) for m in observed.models}
        actions: list[Action] = []
        actions.extend(
            Action(kind=ActionKind.PULL, model=m.model)
            for m in declared.models
            if ollama_key(m.model) not in present
        )
        pulled: list[ListModelResponse] = []
        drift: list[str] = []
        for listed in observed.models:
            model = wanted.get(ollama_key(listed.name))
            if model is not None:
                discovered = observed.discovered.get(listed.digest or listed.name)
                pulled.append(Capabilities.of(model).merged(discovered).apply(listed))
            elif self.options.delete_undeclared:
                actions.append(Action(kind=ActionKind.DELETE, model=listed.name))
            else:
                pulled.append(listed)
                drift.append(listed.name)
        state = declared.base_state().model_copy(
            update={
                "pulled_models": tuple(pulled),
                "undeclared_models": tuple(drift),
                "error": "; ".join(observed.problems),
            }
        )
        return BackendPlan(
            backend_id=declared.backend.id,
            backend_name=declared.backend.name,
            actions=tuple(actions),
            state=state,
        )

    async def act(self, ctx: CycleContext, declared: Declared, plan: BackendPlan) -> LLMState:
        backend = declared.backend
        failures: list[str] = []
        deleted = deleted_elsewhere = 0
        for action in plan.actions:
            if action.kind is not ActionKind.DELETE:
                continue
            log_extra = {"backend_id": backend.id, "model": action.model}
            try:
                await ctx.check_fence()
                url = join_url(backend.base_url, "/api/delete")
                status, body = await ctx.http.send("DELETE", url, json_body={"model": action.model})
                if status >= 400 and status != 404:
                    raise status_error(status, body, url=url)
            except RuntimeStateError as exc:
                failures.append(f"delete {action.model} failed: {exc}")
                logger.warning("delete %s failed: %s", action.model, exc, extra=log_extra)
                continue
            if status == 404:
                # Gone already (another replica's delete, or the operator's): not a deletion
                # of ours, so not counted; the listing below still runs.
                deleted_elsewhere += 1
                continue
            deleted += 1
            MODELS_DELETED.inc()
            logger.info("model deleted", extra=log_extra)
        state = plan.state
        if deleted or deleted_elsewhere:
            try:
                state = self.plan(declared, await self.observe(ctx, declared)).state
            except BackendError as exc:
                failures.append(f"listing after delete failed: {exc}")
        if failures:
            error = "; ".join(filter(None, (state.error, *failures)))
            state = state.model_copy(update={"error": error})
        return state
