"""Chat, prompt, embed and stream over the OpenAI protocol through ``openai.AsyncOpenAI``.

The client of every kind that speaks the protocol - OpenAI itself, vLLM, any OpenAI-compatible
server - since they differ only in the key (a self-hosted server often runs without one, but the
SDK insists on a key, so a placeholder is sent) and in error bodies; what an error status means
is :func:`runtimestate.status.status_error_class`, as for the drivers. Retries are off
(``max_retries=0``): retrying, cooling down and choosing another backend is the resolver's job,
and SDK retries would hide failures from its health book.

``prompt`` is sent as a chat (system + user message): the legacy ``/v1/completions`` endpoint is
gone from OpenAI's current models and optional in vLLM, while chat is served by both.

The SDK is lenient with bad bodies: a 200 that is not JSON comes back as a plain string and a
JSON body of the wrong shape as a half-built model, so results are checked here and a wrong
shape is a :class:`~runtimestate.errors.ProtocolError` - an embedding that is not one flat
numeric vector per input (a server with pooling off answers a matrix per token), vectors of
different lengths, a stream that ends without a ``finish_reason`` (the SDK stops as quietly at a
closed connection as at ``[DONE]``).

Servers other than the reference ones close idle keep-alive connections without notice, so the
next request on such a pooled connection fails before a byte of its answer; that case (and only
that one: nothing was answered, so nothing can be repeated twice) is sent once more, at once.
A connection error names its real cause - refused, closed without an answer, broken mid-answer,
timed out - with the backend's URL, not the SDK's generic "Connection error.".
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import httpx2
import openai
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from runtimestate.errors import BackendError, BackendUnreachable, ProtocolError, ServerError
from runtimestate.kinds.openai_api import openai_root
from runtimestate.providers.base import (
    BackendRef,
    ChatMessage,
    ChatResult,
    ModelClient,
    Sampling,
    Usage,
)
from runtimestate.providers.limits import bounded_transport
from runtimestate.status import status_error_class

__all__ = ["OpenAIClient"]

# The SDK refuses to start without a key; keyless vLLM servers ignore whatever is sent.
_PLACEHOLDER_KEY = "no-key"

_T = TypeVar("_T")
_DEFAULTS = Sampling()

# What the HTTP layer's exceptions mean, most specific first (the SDK wraps them all in one
# APIConnectionError whose text is "Connection error.").
_CAUSES: tuple[tuple[type[BaseException], str], ...] = (
    (httpx2.ConnectTimeout, "connect timed out"),
    (httpx2.ConnectError, "connection refused or unreachable"),
    (httpx2.RemoteProtocolError, "the server closed the connection"),
    (httpx2.ReadTimeout, "read timed out"),
    (httpx2.ReadError, "the connection broke while reading"),
    (httpx2.WriteError, "the connection broke while sending"),
)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not s for s in seen):
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _stale(exc: openai.APIConnectionError) -> bool:
    """The server closed the (pooled) connection before sending any byte of an answer."""
    return any(
        isinstance(e, httpx2.RemoteProtocolError) and "without sending" in str(e)
        for e in _chain(exc)
    )


def _cause(exc: BaseException) -> str:
    for inner in _chain(exc):
        for kind, meaning in _CAUSES:
            if isinstance(inner, kind):
                detail = str(inner) or type(inner).__name__
                return f"{meaning} ({type(inner).__name__}: {detail})"
    return f"{type(exc).__name__}: {exc}"


def _is_vector(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value
    )


def _wire(messages: list[ChatMessage]) -> list[ChatCompletionMessageParam]:
    wire: list[Any] = [{"role": m.role, "content": m.content} for m in messages]
    return wire


class OpenAIClient(ModelClient):
    """The model client of every kind that speaks the OpenAI protocol (``openai``, ``vllm``,
    ``openai-compatible``), on ``openai.AsyncOpenAI`` without its retries."""

    translated = (openai.OpenAIError, json.JSONDecodeError)

    @classmethod
    def create_sdk(cls, backend: BackendRef, *, timeout: float, max_body_bytes: int) -> Any:
        # The SDK's default HTTP client (its timeouts, pool limits), on a bounded transport.
        http = openai.DefaultAsyncHttpxClient(
            timeout=timeout,
            follow_redirects=False,  # the SDK's default is True; see runtimestate.status
            transport=bounded_transport(httpx2, max_body_bytes),
        )
        return openai.AsyncOpenAI(
            base_url=openai_root(backend.base_url),
            api_key=backend.api_key or _PLACEHOLDER_KEY,
            timeout=timeout,
            max_retries=0,
            http_client=http,
        )

    @staticmethod
    async def close_sdk(sdk: Any) -> None:
        await sdk.close()

    def _classify(self, exc: BaseException) -> tuple[type[BackendError], str]:
        if isinstance(exc, openai.APIConnectionError):
            return BackendUnreachable, f"unreachable: {_cause(exc)}"
        if isinstance(exc, openai.APIStatusError):
            return status_error_class(exc.status_code), f"HTTP {exc.status_code}: {exc.message}"
        if isinstance(exc, openai.APIResponseValidationError | json.JSONDecodeError):
            return ProtocolError, f"malformed response: {type(exc).__name__}"
        if isinstance(exc, openai.APIError):
            return ServerError, f"error inside the stream: {exc.message}"
        return ProtocolError, f"unexpected SDK error: {type(exc).__name__}"

    def _malformed(self, what: str) -> ProtocolError:
        return ProtocolError(f"{self._where()}: malformed {what}", backend=self.backend.base_url)

    def _client(self) -> openai.AsyncOpenAI:
        sdk: openai.AsyncOpenAI = self._sdk()
        return sdk

    @staticmethod
    async def _once_more_if_stale(call: Callable[[], Awaitable[_T]]) -> _T:
        """``call()``, repeated once if the server had closed the connection before answering."""
        try:
            return await call()
        except openai.APIConnectionError as exc:
            if not _stale(exc):
                raise
        return await call()

    async def _completion(
        self, messages: list[ChatMessage], sampling: Sampling = _DEFAULTS
    ) -> ChatResult:
        params = sampling.named(max_tokens="max_tokens")
        response: Any = await self._once_more_if_stale(
            lambda: self._client().chat.completions.create(
                model=self.provider.model, messages=_wire(messages), stream=False, **params
            )
        )
        if not isinstance(response, ChatCompletion) or not response.choices:
            raise self._malformed("chat completion")
        message = response.choices[0].message
        usage = response.usage
        return ChatResult(
            message=ChatMessage(role=message.role or "assistant", content=message.content or ""),
            usage=Usage(
                prompt_tokens=usage.prompt_tokens if usage else 0,
                completion_tokens=usage.completion_tokens if usage else 0,
            ),
            finish_reason=response.choices[0].finish_reason,
        )

    async def _chat(self, messages: list[ChatMessage], sampling: Sampling) -> ChatResult:
        return await self._completion(messages, sampling)

    async def _prompt(self, prompt: str, system: str | None) -> str:
        messages = [ChatMessage(role="user", content=prompt)]
        if system is not None:
            messages.insert(0, ChatMessage(role="system", content=system))
        return (await self._completion(messages)).message.content

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        response: Any = await self._once_more_if_stale(
            lambda: self._client().embeddings.create(
                model=self.provider.model, input=texts, encoding_format="float"
            )
        )
        if not isinstance(response, CreateEmbeddingResponse) or len(response.data) != len(texts):
            raise self._malformed("embedding response")
        vectors = [item.embedding for item in sorted(response.data, key=lambda d: d.index)]
        if not all(_is_vector(v) for v in vectors):
            raise self._malformed(
                "embedding response: not one flat numeric vector per input (a per-token matrix?)"
            )
        if len({len(v) for v in vectors}) != 1 or not vectors[0]:
            raise self._malformed("embedding response: vectors of different or zero lengths")
        return [list(v) for v in vectors]

    async def _stream(
        self, messages: list[ChatMessage] | None, prompt: str | None, system: str | None
    ) -> AsyncGenerator[str, None]:
        if messages is None:
            messages = [ChatMessage(role="user", content=prompt or "")]
            if system is not None:
                messages.insert(0, ChatMessage(role="system", content=system))
        stream = await self._once_more_if_stale(
            lambda: self._client().chat.completions.create(
                model=self.provider.model, messages=_wire(messages), stream=True
            )
        )
        finished = False
        try:
            async for chunk in stream:
                if chunk.choices:
                    finished = finished or chunk.choices[0].finish_reason is not None
                    yield chunk.choices[0].delta.content or ""
        finally:
            await stream.close()
        if not finished:
            raise ProtocolError(
                f"{self._where()}: the stream ended without a finish_reason (no [DONE])",
                backend=self.backend.base_url,
            )
