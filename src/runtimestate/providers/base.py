"""What a provider is, and the shape every backend client shares.

A :class:`Provider` is one model of one backend type together with **every backend that serves
it**, so that a resolver policy can choose among backends instead of among copies of the same
model (the Go code made one provider per model per backend). Providers are frozen, hashable values
built from a snapshot; they hold no connection.

:class:`ModelClient` is the per-(provider, backend) client handed out by the resolver. The
per-kind clients only implement four small hooks; this base
class owns what must be identical across types and therefore lives in one place:

* the capability check, raised as :class:`~runtimestate.errors.Unsupported` before any request,
  and the argument checks (:class:`~runtimestate.errors.InvalidInput`), so that a caller's
  mistake is never sent - an SDK's own validation error would be counted against the backend;
* the health bookkeeping (in-flight count, latency, failures) around every call;
* an overall deadline per call, since the SDKs only time out per I/O phase;
* the translation of SDK exceptions into the project's error tree, chained with ``from``;
* the stream wrapper: an async generator whose ``aclose()`` (or cancellation) closes the SDK
  stream and with it the HTTP response. Its idle timeout turns a stalled stream into
  :class:`~runtimestate.errors.BackendUnreachable`, and its size bound (the pool's
  ``max_stream_chars``) turns a stream that never ends - a model looping on its output, which no
  idle timeout catches - into :class:`~runtimestate.errors.ProtocolError`.

Both deadlines (a call's and a stream's idle one) run on the :class:`~runtimestate.clock.Clock`
the client is handed, so a ``FakeClock`` drives them in tests.

A client is handed what it works with as values - its :class:`~.limits.ClientLimits`, the
:class:`~.health.Health` book, its clock, and an :class:`SdkSource` that builds or reuses its
SDK client (the :class:`~runtimestate.providers.pool.ClientPool` in practice) - so this module
knows nothing of the pool. The SDK client is fetched on the first call, so resolving a client
does no I/O and allocates almost nothing. The per-kind clients live with their kinds
(:mod:`runtimestate.kinds`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from runtimestate.clock import SYSTEM_CLOCK, Clock, timeout
from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    InvalidInput,
    ProtocolError,
    Unsupported,
    redact,
)
from runtimestate.providers.health import Health
from runtimestate.providers.limits import ClientLimits, ResponseTooLarge
from runtimestate.records import Capability

__all__ = [
    "BackendRef",
    "Capability",
    "ChatMessage",
    "ChatResult",
    "ModelClient",
    "Provider",
    "Sampling",
    "SdkSource",
    "Usage",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class BackendRef:
    """One backend serving a provider. The key is kept out of repr, equality and hashing."""

    id: str
    name: str
    base_url: str
    type: str
    api_key: str | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Provider:
    """One model of one backend type, with its capabilities and every backend serving it."""

    type: str
    model: str
    context_length: int
    capabilities: frozenset[Capability]
    backends: tuple[BackendRef, ...]

    @property
    def id(self) -> str:
        return f"{self.type}:{self.model}"

    @property
    def can_chat(self) -> bool:
        return Capability.CHAT in self.capabilities

    @property
    def can_prompt(self) -> bool:
        return Capability.PROMPT in self.capabilities

    @property
    def can_embed(self) -> bool:
        return Capability.EMBED in self.capabilities

    @property
    def can_stream(self) -> bool:
        return Capability.STREAM in self.capabilities

    def describe(self) -> str:
        """A one-line summary for error messages: never mentions a key."""
        caps = ",".join(sorted(self.capabilities)) or "none"
        return f"{self.id} (context {self.context_length}, {caps}, {len(self.backends)} backends)"


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatMessage:
    """One turn of a conversation: ``role`` (system, user, assistant) and its text."""

    role: str
    content: str

    def __post_init__(self) -> None:
        # Checked here, not left to the SDK: the Ollama SDK's own validation error would read as
        # a malformed *response* and count against the backend's health.
        if not isinstance(self.role, str) or not self.role:
            raise InvalidInput("a chat message's role must be a non-empty string", field="messages")
        if not isinstance(self.content, str):
            raise InvalidInput("a chat message's content must be a string", field="messages")

    @classmethod
    def coerce(cls, value: ChatMessage | Mapping[str, str]) -> ChatMessage:
        if isinstance(value, ChatMessage):
            return value
        if not isinstance(value, Mapping):
            raise InvalidInput(
                f"a chat message is a mapping with 'role' and 'content', not "
                f"{type(value).__name__}",
                field="messages",
            )
        try:
            return cls(role=value["role"], content=value["content"])
        except KeyError as exc:
            raise InvalidInput(
                "a chat message needs 'role' and 'content'", field="messages"
            ) from exc


@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    """The tokens a call consumed, as the backend counted them (0 where it did not say)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ChatResult:
    """A chat's answer: the assistant's message, the token usage and why it ended."""

    message: ChatMessage
    usage: Usage
    # Why the answer ended, in OpenAI's words ("stop", "length", ...); None when not reported.
    finish_reason: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Sampling:
    """The generation parameters a caller may set on a chat; None (or no stop) means the
    backend's default. Each client maps them to its protocol's names."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_tokens", "seed"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise InvalidInput(f"{name} must be an integer", field=name)
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidInput("max_tokens must be at least 1", field="max_tokens")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, int | float) or isinstance(value, bool)
            ):
                raise InvalidInput(f"{name} must be a number", field=name)
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise InvalidInput("stop is a sequence of strings", field="stop")

    def named(self, *, max_tokens: str, stop: str = "stop") -> dict[str, Any]:
        """The parameters that are set, under a protocol's names: each protocol has its own
        word for ``max_tokens`` (and Gemini for ``stop``); the others are the same everywhere."""
        values = {
            max_tokens: self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            stop: list(self.stop) or None,
        }
        return {name: value for name, value in values.items() if value is not None}


def _messages(messages: Sequence[ChatMessage | Mapping[str, str]]) -> list[ChatMessage]:
    if isinstance(messages, str | Mapping):
        raise InvalidInput("messages is a list of chat messages", field="messages")
    result = [ChatMessage.coerce(m) for m in messages]
    if not result:
        raise InvalidInput("at least one message is required", field="messages")
    return result


def _text(value: object, name: str) -> str:
    """``value`` if it is a string; a caller's mistake is :class:`InvalidInput`, never sent."""
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a string, not {type(value).__name__}", field=name)
    return value


def _optional_text(value: object, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _in_chain(exc: BaseException, kind: type[ResponseTooLarge]) -> ResponseTooLarge | None:
    """``exc`` or the first of its causes (or contexts) that is a ``kind``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class SdkSource(Protocol):
    """Builds SDK clients and shares them: one per (client class, backend URL, key)."""

    def sdk_client(self, backend: BackendRef, factory: type[ModelClient]) -> Any:
        """The SDK client for ``backend``, built with ``factory.create_sdk`` on first use."""
        ...


class ModelClient(ABC):
    """Chat, prompt, embed and stream against one backend for one provider."""

    # The SDK exceptions this client translates; anything else is a bug and propagates.
    translated: ClassVar[tuple[type[BaseException], ...]] = ()

    def __init__(
        self,
        *,
        provider: Provider,
        backend: BackendRef,
        limits: ClientLimits,
        health: Health,
        sdks: SdkSource,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.provider = provider
        self.backend = backend
        self._limits = limits
        self._health = health
        self._sdks = sdks
        self._clock = clock

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.provider.model!r}, backend={self.backend.id!r})"

    # -- public API -------------------------------------------------------------------------

    async def chat(
        self,
        messages: Sequence[ChatMessage | Mapping[str, str]],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] = (),
        seed: int | None = None,
    ) -> ChatResult:
        """Send a conversation; return the assistant's message, the token usage and why the
        answer ended. The keyword arguments are passed to the backend when given."""
        self._require(Capability.CHAT)
        msgs = _messages(messages)
        sampling = Sampling(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            seed=seed,
        )
        async with self._call():
            return await self._chat(msgs, sampling)

    async def prompt(self, prompt: str, *, system: str | None = None) -> str:
        """Complete a single prompt (with optional system text); return the generated text."""
        self._require(Capability.PROMPT)
        text, system = _text(prompt, "prompt"), _optional_text(system, "system")
        async with self._call():
            return await self._prompt(text, system)

    async def embed(self, texts: str | Sequence[str]) -> list[list[float]]:
        """Embed one text or a batch; always return one vector per text."""
        self._require(Capability.EMBED)
        if isinstance(texts, str):
            batch = [texts]
        elif isinstance(texts, Sequence):
            batch = [_text(t, "texts") for t in texts]
        else:
            raise InvalidInput("texts is a string or a sequence of strings", field="texts")
        if not batch:
            raise InvalidInput("nothing to embed", field="texts")
        async with self._call():
            return await self._embed(batch)

    async def stream(
        self,
        messages: Sequence[ChatMessage | Mapping[str, str]] | None = None,
        *,
        prompt: str | None = None,
        system: str | None = None,
    ) -> AsyncGenerator[str, None]:
        """Yield text chunks of a chat (``messages``) or a completion (``prompt``).

        Closing the iterator (``aclose()``, leaving ``async with aclosing(...)``, or cancelling
        the task that reads it) closes the SDK stream and its HTTP response.
        """
        self._require(Capability.STREAM)
        if (messages is None) == (prompt is None):
            raise InvalidInput("stream takes either messages or a prompt", field="messages")
        msgs = None if messages is None else _messages(messages)
        prompt, system = _optional_text(prompt, "prompt"), _optional_text(system, "system")
        idle = self._limits.stream_idle_timeout
        budget = self._limits.max_stream_chars
        async with self._health.track(self.backend.id) as call:
            try:
                async with aclosing(self._stream(msgs, prompt, system)) as chunks:
                    while True:
                        try:
                            async with timeout(self._clock, idle):
                                chunk = await anext(chunks)
                        except StopAsyncIteration:
                            return
                        except TimeoutError as exc:
                            raise BackendUnreachable(
                                f"{self._where()}: stream stalled for {idle:g}s",
                                backend=self.backend.base_url,
                            ) from exc
                        if chunk:
                            call.answered()
                            budget -= len(chunk)
                            if budget < 0:
                                # Raised inside ``aclosing``: the SDK stream and its HTTP
                                # response are closed before the error reaches the caller.
                                limit = self._limits.max_stream_chars
                                raise ProtocolError(
                                    f"{self._where()}: stream exceeded {limit} characters",
                                    backend=self.backend.base_url,
                                )
                            yield chunk
            except self._caught() as exc:
                raise self._error(exc) from exc

    # -- helpers -----------------------------------------------------------------------------

    @asynccontextmanager
    async def _call(self) -> AsyncIterator[None]:
        """Track one request, bound it by the pool's timeout, translate what the SDK raises.

        The SDKs' own timeouts are per phase (connect, each read), so a server that drips bytes
        never trips them; a deadline on this client's clock bounds the whole call.
        """
        limit = self._limits.timeout
        async with self._health.track(self.backend.id):
            try:
                async with timeout(self._clock, limit):
                    yield
            except TimeoutError as exc:
                raise BackendUnreachable(
                    f"{self._where()}: no answer within {limit:g}s",
                    backend=self.backend.base_url,
                ) from exc
            except self._caught() as exc:
                raise self._error(exc) from exc

    def _caught(self) -> tuple[type[BaseException], ...]:
        """What a call translates: the SDK's exceptions and the body bound's."""
        return (ResponseTooLarge, *self.translated)

    def _require(self, capability: Capability) -> None:
        if capability not in self.provider.capabilities:
            raise Unsupported(
                f"model {self.provider.model!r} on {self.provider.type} cannot {capability}"
            )

    def _where(self) -> str:
        return f"{self.backend.type} backend {self.backend.name!r} ({self.backend.base_url})"

    def _error(self, exc: BaseException) -> BackendError:
        """Translate ``exc`` with the subclass's rules; redact the key from its text."""
        cls: type[BackendError]
        too_large = _in_chain(exc, ResponseTooLarge)
        if too_large is not None:  # raw from httpx, or wrapped by an SDK
            cls, detail = ProtocolError, f"{too_large}"
        else:
            cls, detail = self._classify(exc)
        text = redact(f"{self._where()}: {detail}", self.backend.api_key)
        return cls(text, backend=self.backend.base_url)

    def _sdk(self) -> Any:
        return self._sdks.sdk_client(self.backend, type(self))

    @classmethod
    @abstractmethod
    def create_sdk(cls, backend: BackendRef, *, timeout: float, max_body_bytes: int) -> Any:
        """Build the SDK client for ``backend``; called once per pool key, no I/O. Its HTTP
        transport must be :func:`~runtimestate.providers.limits.bounded_transport`."""

    @staticmethod
    @abstractmethod
    async def close_sdk(sdk: Any) -> None:
        """Close an SDK client built by :meth:`create_sdk`."""

    @abstractmethod
    def _classify(self, exc: BaseException) -> tuple[type[BackendError], str]:
        """The project error class for an SDK exception and a short detail text."""

    @abstractmethod
    async def _chat(self, messages: list[ChatMessage], sampling: Sampling) -> ChatResult: ...

    @abstractmethod
    async def _prompt(self, prompt: str, system: str | None) -> str: ...

    @abstractmethod
    async def _embed(self, texts: list[str]) -> list[list[float]]: ...

    @abstractmethod
    def _stream(
        self, messages: list[ChatMessage] | None, prompt: str | None, system: str | None
    ) -> AsyncGenerator[str, None]: ...
