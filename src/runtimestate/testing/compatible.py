"""An emulated self-hosted OpenAI-compatible server (llama.cpp's server, LM Studio, LocalAI).

It speaks the same OpenAI protocol as the emulated vLLM server (:mod:`.openai`), with the
behaviours in which such servers differ from vLLM and which the reconciler must survive:

- the listing is plain OpenAI: ``id``, ``object``, ``created``, ``owned_by`` - no
  ``max_model_len``, so the context length of a model is not known from it;
- several models at once, and an optional key (``Authorization: Bearer``, 401 otherwise);
- ``n_ctx``: when set, ``GET /props`` answers as llama.cpp's server does, with the context size
  in ``default_generation_settings.n_ctx``; otherwise ``/props`` is 404, as on servers that
  have no such route;
- ``listing_waits_for_generation``: like llama.cpp's server with a single slot, ``/v1/models``
  is answered only once no generation is running. :meth:`CompatibleServer.hold_generations`
  keeps every chat or completion request running until :meth:`release_generations`, so a test
  can hold the server busy for exactly as long as it needs, and
  :attr:`CompatibleServer.listings_waiting` counts the listings that had to wait (ground truth
  at the server, not a guess from timing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from runtimestate.clock import Clock
from runtimestate.errors import mask_secret
from runtimestate.testing.base import EmuRequest, Reply, StreamReply, json_bytes
from runtimestate.testing.openai import _OpenAICompatible

__all__ = ["CompatibleServer"]

_GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})


class CompatibleServer(_OpenAICompatible):
    """A self-hosted OpenAI-compatible server serving ``models`` (a mutable list)."""

    kind = "compatible"

    def __init__(
        self,
        *,
        name: str,
        root: Callable[[], str],
        clock: Clock,
        models: Iterable[str] = (),
        api_key: str | None = None,
        listing_waits_for_generation: bool = False,
        n_ctx: int | None = None,
    ) -> None:
        super().__init__(name=name, root=root, clock=clock)
        self.n_ctx = n_ctx
        self.route("GET", "/props", self._props)
        self.models: list[str] = list(models)
        self.api_key = api_key
        self.listing_waits_for_generation = listing_waits_for_generation
        self.listings_waiting = 0
        self.generations_running = 0
        self._released = asyncio.Event()
        self._released.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._busy = asyncio.Event()

    def __repr__(self) -> str:
        masked = mask_secret(self.api_key) if self.api_key else None
        return f"CompatibleServer(name={self.name!r}, models={self.models!r}, api_key={masked!r})"

    def hold_generations(self) -> None:
        """Keep every generation request that arrives running until :meth:`release_generations`."""
        self._released.clear()

    def release_generations(self) -> None:
        self._released.set()

    async def generating(self) -> None:
        """Return once a generation is running (a sync point for tests, not a sleep)."""
        await self._busy.wait()

    def model_entries(self) -> list[dict[str, Any]]:
        return [
            {"id": model, "object": "model", "created": self._created(model), "owned_by": "user"}
            for model in self.models
        ]

    def serves(self, model: str) -> bool:
        return model in self.models

    def unauthorized(self, request: EmuRequest) -> Reply | None:
        if self.api_key is None:
            return None
        if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            return self._error_object(401, "Invalid API Key", kind="authentication_error")
        return None

    async def _props(self, request: EmuRequest) -> Reply:
        if self.n_ctx is None:
            return self.route_not_found(request)
        settings = {"n_ctx": self.n_ctx, "temperature": 0.8, "top_p": 0.95}
        return Reply(
            body=json_bytes(
                {
                    "default_generation_settings": settings,
                    "total_slots": 1,
                    "model_path": f"/models/{self.models[0] if self.models else 'none'}.gguf",
                }
            )
        )

    def model_not_found(self, model: str) -> Reply:
        return self._error_object(404, f"model '{model}' not found", kind="not_found_error")

    async def respond(self, request: EmuRequest) -> Reply | StreamReply:
        if request.path in _GENERATION_PATHS and self.unauthorized(request) is None:
            self.generations_running += 1
            self._idle.clear()
            self._busy.set()
            try:
                await self._released.wait()
                return await super().respond(request)
            finally:
                self.generations_running -= 1
                if self.generations_running == 0:
                    self._idle.set()
                    self._busy.clear()
        if (
            request.path == f"{self.api_prefix}/models"
            and self.listing_waits_for_generation
            and not self._idle.is_set()
        ):
            self.listings_waiting += 1
            await self._idle.wait()
        return await super().respond(request)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "models": list(self.models)}
