"""The demo fleet behind ``runtimestate serve --demo``: something to watch without any real backend.

A newcomer should see every part of the system move, for long enough to open a second terminal
with ``runtimestate watch`` or the dashboard and still catch it: models queued and pulled with
progress bars for a couple of minutes, an undeclared model deleted, and the failure paths an
operator will meet - a node that is down and a model that one node cannot pull.
:class:`DemoFleet` starts an in-process :class:`runtimestate.testing.Emulator` with a few emulated
Ollama nodes and, through the service's startup hook, declares them and a handful of models in
the store.

Shape of the fleet, each piece chosen to show one behaviour:

* three nodes, so that downloads on different backends run side by side;
* pulls that take most of a minute each (:data:`PULL_SECONDS`), one at a time per node, so the
  busiest node is still pulling two minutes after the start;
* one node that already holds a declared model (nothing to do there) and one that holds a model
  nobody declared (the reconciler deletes it);
* one node that is down (:data:`DOWN_NODE`, declared at a loopback port nothing listens on), and
  one declared model (:data:`REFUSED_MODEL`) that the registry of one node refuses, so its pull
  fails and is retried later.

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

__all__ = [
    "DEMO_MODELS",
    "DEMO_NODES",
    "DOWN_NODE",
    "DOWN_URL",
    "PULL_SECONDS",
    "REFUSED_MODEL",
    "REFUSING_NODE",
    "DemoFleet",
    "DemoModel",
]

logger = logging.getLogger(__name__)

PULL_SECONDS = 40.0


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoModel:
    """A model the demo declares, with the fields ``POST /models`` takes."""

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
# Nothing listens on the discard port of the loopback address: every observation is refused.
DOWN_NODE = "demo-ollama-down"
DOWN_URL = "http://127.0.0.1:9"
# The model that REFUSING_NODE's registry does not have: its pull fails there, every time.
REFUSED_MODEL = "nomic-embed-text:latest"
REFUSING_NODE = "demo-ollama-3"
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
            if name == REFUSING_NODE:
                node.pullable = {spec.model for spec in DEMO_MODELS if spec.model != REFUSED_MODEL}
            self._base_urls[name] = node.base_url
        self._base_urls[DOWN_NODE] = DOWN_URL
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
