"""What every emulated backend shares: the request and reply values, the route table, and the
deterministic "model" behind the inference endpoints.

A backend is plain Python state (an inventory, keys) plus a table of handlers keyed by
``(method, path)``. Handlers take an :class:`EmuRequest` and return a :class:`Reply` (one body)
or a :class:`StreamReply` (an async generator of complete NDJSON lines or SSE events). Keeping the
stream as separate chunks is what lets the dispatcher in :mod:`.server` apply stream faults
(break, error, stall) uniformly after N chunks, and drive the generator one chunk at a time so a
pull that is broken off never reaches the step that adds the model.

Inference is deterministic so tests can assert on it: the answer is derived from the last user
text (:func:`answer_words`), token counts are word counts, and an embedding is a unit vector
expanded from a SHA-256 of the text (:func:`embed_text`).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from runtimestate.clock import Clock
from runtimestate.testing.faults import Faults, RecordedRequest

__all__ = [
    "BodyError",
    "EmuRequest",
    "EmulatedBackend",
    "Handler",
    "Reply",
    "StreamReply",
    "answer_words",
    "count_tokens",
    "embed_text",
    "json_bytes",
    "stable_int",
]


class BodyError(ValueError):
    """The request body is not the JSON object the endpoint expects."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EmuRequest:
    """A request as a handler sees it: ``path`` relative to the backend's base URL, the body as
    bytes, headers case-insensitive."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes

    def json_object(self) -> dict[str, Any]:
        """The body parsed as a JSON object; :class:`BodyError` says why it is not one."""
        if not self.body.strip():
            raise BodyError("missing request body")
        try:
            value = json.loads(self.body)
        except ValueError as exc:
            raise BodyError(f"invalid JSON body: {exc}") from exc
        if not isinstance(value, dict):
            raise BodyError("request body must be a JSON object")
        return value

    def recorded(self) -> RecordedRequest:
        try:
            parsed: Any = json.loads(self.body) if self.body.strip() else None
        except ValueError:
            parsed = None
        return RecordedRequest(
            method=self.method,
            path=self.path,
            query=dict(self.query),
            json=parsed,
            headers=dict(self.headers),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Reply:
    """A handler's answer in one body, JSON unless ``content_type`` says otherwise."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json; charset=utf-8"


@dataclass(frozen=True, kw_only=True, slots=True)
class StreamReply:
    """A handler's streamed answer: ``chunks`` yields complete NDJSON lines or SSE events, which the
    server sends one at a time so that stream faults can strike between them."""

    chunks: AsyncGenerator[bytes, None]
    content_type: str
    status: int = 200


Handler = Callable[[EmuRequest], Awaitable[Reply | StreamReply]]


def json_bytes(value: Any) -> bytes:
    """``value`` as compact JSON, the bytes an emulated server answers with."""
    return json.dumps(value, separators=(",", ":")).encode()


def stable_int(*parts: str) -> int:
    """A 64-bit integer that depends only on ``parts`` (Python's ``hash`` is salted per run)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big")


def count_tokens(text: str) -> int:
    """The emulators' token count: the words of ``text``, split on whitespace."""
    return len(text.split())


def answer_words(
    model: str, prompt: str, *, max_tokens: int | None = None
) -> tuple[list[str], bool]:
    """The answer's tokens (each with its separating space) and whether ``max_tokens`` cut it."""
    words = prompt.split()
    echo = " ".join(words[:24]) if words else "nothing"
    text = f"{model} says: you wrote {echo}"
    tokens = text.split(" ")
    pieces = [token if i == 0 else " " + token for i, token in enumerate(tokens)]
    if max_tokens is not None and 0 <= max_tokens < len(pieces):
        return pieces[:max_tokens], True
    return pieces, False


def embed_text(text: str, dimensions: int) -> list[float]:
    """A unit vector of ``dimensions`` floats determined by ``text``."""
    raw = bytearray()
    counter = 0
    seed = text.encode()
    while len(raw) < dimensions * 4:
        raw += hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    ints = struct.unpack(f">{dimensions}I", bytes(raw[: dimensions * 4]))
    values = [i / 0xFFFFFFFF * 2.0 - 1.0 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 8) for v in values]


class EmulatedBackend(ABC):
    """One virtual backend served under ``/<kind>/<name>`` by the shared emulator server."""

    kind: ClassVar[str]
    # A path segment that belongs to the base URL (OpenAI's "/v1"): requests, routes and fault
    # paths are relative to the base URL, so the dispatcher strips it.
    mount: ClassVar[str] = ""

    def __init__(self, *, name: str, root: Callable[[], str], clock: Clock) -> None:
        self.name = name
        self.faults = Faults()
        self.requests: list[RecordedRequest] = []
        # Streamed answers whose client went away before their end (a cancelled pull): counted
        # here, outside the code under test, so a test can see that a cancel really closed one.
        self.streams_abandoned = 0
        # Requests being answered right now (the dispatcher counts them, also streams), and the
        # most there ever were at once: how a test shows concurrency by count, not by time.
        self.active = 0
        self.max_active = 0
        self._root = root
        self._clock = clock
        self._routes: dict[tuple[str, str], Handler] = {}

    @property
    def base_url(self) -> str:
        return f"{self._root()}/{self.kind}/{self.name}{self.mount}"

    def route(self, method: str, path: str, handler: Handler) -> None:
        self._routes[(method, path)] = handler

    async def respond(self, request: EmuRequest) -> Reply | StreamReply:
        handler = self._routes.get((request.method, request.path))
        if handler is None and request.method == "HEAD":
            handler = self._routes.get(("GET", request.path))
        if handler is None:
            handler = self.match(request)
        if handler is None:
            return self.route_not_found(request)
        return await handler(request)

    def route_not_found(self, request: EmuRequest) -> Reply:
        return self.error(404, f"no route for {request.method} {request.path}")

    def match(self, request: EmuRequest) -> Handler | None:
        """Routes with parameters in the path (a model id); the fixed table is tried first."""
        return None

    def describe(self) -> dict[str, Any]:
        """This backend's entry in ``GET /_emulator/backends``."""
        return {
            "kind": self.kind,
            "name": self.name,
            "base_url": self.base_url,
            "streams_abandoned": self.streams_abandoned,
            "active": self.active,
            "max_active": self.max_active,
        }

    @abstractmethod
    def error(self, status: int, message: str) -> Reply:
        """An error answer in this backend's own shape."""

    @abstractmethod
    def stream_error_chunk(self, message: str) -> bytes:
        """The chunk this backend sends when a stream fails after it began."""

    @abstractmethod
    def oversized_prefix(self) -> bytes:
        """How an oversized answer begins: like the listing this backend serves."""
