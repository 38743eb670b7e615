"""Run an :class:`~runtimestate.testing.Emulator` on its own event loop in a background thread.

Benchmarks and synchronous callers (a demo script, a REPL) want the emulator out of their own
event loop, so a hang or a thousand slow backends never compete with the code being measured for
the same loop. The emulator's state is not thread-safe, so changes to it (adding backends,
arming faults) go through :meth:`EmulatorThread.call`, which runs a function on the emulator's
loop and returns its result.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from runtimestate.testing.server import Emulator

__all__ = ["EmulatorThread"]

_T = TypeVar("_T")


class EmulatorThread:
    """``with EmulatorThread(latency=0.05) as emu_thread:``; ``emu_thread.url`` is the root."""

    def __init__(self, **emulator_options: Any) -> None:
        self._options = emulator_options
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="runtimestate-emulator", daemon=True)
        self._emulator: Emulator | None = None

    @property
    def emulator(self) -> Emulator:
        if self._emulator is None:
            raise RuntimeError("the emulator thread is not started")
        return self._emulator

    @property
    def url(self) -> str:
        return self.emulator.url

    def start(self) -> None:
        self._thread.start()
        started: Future[Emulator] = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        self._emulator = started.result(timeout=30)

    def stop(self) -> None:
        if self._emulator is not None:
            asyncio.run_coroutine_threadsafe(self._emulator.aclose(), self._loop).result(timeout=30)
            self._emulator = None
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._loop.close()

    def call(self, function: Callable[[Emulator], _T]) -> _T:
        """Run ``function(emulator)`` on the emulator's loop and return what it returns."""
        emulator = self.emulator

        async def run() -> _T:
            return function(emulator)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=30)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _start(self) -> Emulator:
        emulator = Emulator(**self._options)
        await emulator.start()
        return emulator

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
