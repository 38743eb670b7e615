"""The demo fleet behind ``runtimestate serve --demo``: something to watch without any real backend.

A newcomer should see, within a minute of one command, every part of the system move: models
queued and pulled with progress bars, an undeclared model deleted, and the state settling to
green. :class:`DemoFleet` starts an in-process :class:`runtimestate.testing.Emulator` with a few
emulated Ollama nodes and, through the service's startup hook, declares them and a handful of
models in the store.

Shape of the fleet, each piece chosen to show one behaviour:

* three nodes, so that downloads on different backends run side by side;
* pulls that take several seconds (:data:`PULL_SECONDS`), so that progress is visible;
* one node that already holds a declared model (nothing to do there) and one that holds a model
  nobody declared (the reconciler deletes it).

Declaring is idempotent: on a restart the existing backends and models are reused. The emulator
listens on a fresh port each time, so a reused backend whose URL changed is updated to the new
one rather than declared twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import TracebackType

from runtimestate.errors import NotFound
from runtimestate.store.base import Store
from runtimestate.testing import Emulator

__all__ = ["DEMO_MODELS", "DEMO_NODES", "PULL_SECONDS", "DemoFleet", "DemoModel"]

logger = logging.getLogger(__name__)

PULL_SECONDS = 5.0


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoModel:
    model: str
    context_length: int
    can_chat: bool = False
    can_embed: bool = False
    can_prompt: bool = False
    can_stream: bool = False


DEMO_MODELS = (
    DemoModel(
        model="llama3.2:1b", context_length=131072, can_chat=True, can_prompt=True, can_stream=True
    ),
    DemoModel(
        model="qwen2.5:0.5b", context_length=32768, can_chat=True, can_prompt=True, can_stream=True
    ),
    DemoModel(model="nomic-embed-text:latest", context_length=8192, can_embed=True),
)
DEMO_NODES = ("demo-ollama-1", "demo-ollama-2", "demo-ollama-3")
# What each node holds when the demo starts: node 2 already has a declared model, node 3 a model
# nobody declared, which the first cycle deletes.
_PREINSTALLED = {"demo-ollama-2": ("llama3.2:1b",), "demo-ollama-3": ("tinyllama:latest",)}


class DemoFleet:
    """Emulated Ollama nodes plus the declarations that make the service manage them."""

    def __init__(self, *, pull_seconds: float = PULL_SECONDS, latency: float = 0.0) -> None:
        self._pull_seconds = pull_seconds
        self._emulator = Emulator(latency=latency)
        self._base_urls: dict[str, str] = {}

    @property
    def url(self) -> str:
        """Where the emulator listens (each node lives under its own path prefix)."""
        return self._emulator.url

    @property
    def base_urls(self) -> dict[str, str]:
        """Node name -> the base URL declared for it."""
        return dict(self._base_urls)

    async def __aenter__(self) -> DemoFleet:
        await self._emulator.__aenter__()
        for name in DEMO_NODES:
            node = self._emulator.add_ollama(name, models=list(_PREINSTALLED.get(name, ())))
            node.pull_seconds = self._pull_seconds
            self._base_urls[name] = node.base_url
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._emulator.__aexit__(exc_type, exc, tb)

    async def declare(self, store: Store) -> None:
        """Declare the demo nodes and models, reusing whatever an earlier run declared."""
        for name, base_url in self._base_urls.items():
            try:
                backend = await store.get_backend_by_name(name)
            except NotFound:
                await store.create_backend(name=name, base_url=base_url, type="ollama")
                logger.info("demo: declared backend %s at %s", name, base_url)
                continue
            if backend.base_url != base_url:
                await store.update_backend(
                    backend.id, name=name, base_url=base_url, type=backend.type
                )
                logger.info("demo: backend %s moved to %s", name, base_url)
        for spec in DEMO_MODELS:
            try:
                await store.get_model_by_name(spec.model)
            except NotFound:
                await store.append_model(
                    model=spec.model,
                    context_length=spec.context_length,
                    can_chat=spec.can_chat,
                    can_embed=spec.can_embed,
                    can_prompt=spec.can_prompt,
                    can_stream=spec.can_stream,
                )
                logger.info("demo: declared model %s", spec.model)
