"""Chat, prompt, embed and stream against an Ollama server through ``ollama.AsyncClient``.

The official client is pointed at the backend's base URL (it keeps a path prefix, which is how
one emulator serves many nodes). Its error surface is uneven, so :meth:`OllamaClient._classify`
is where it is made regular:

* a non-2xx answer is ``ResponseError`` with the status; an ``{"error"}`` line in the middle of a
  stream is ``ResponseError`` with ``status_code == -1`` - the server failed after accepting the
  request, so it counts as a server error;
* a refused connection is the built-in ``ConnectionError`` on plain requests but a raw
  ``httpx.ConnectError`` on streams; timeouts and dropped streams are other ``httpx`` transport
  errors;
* a body that is not JSON, or JSON of the wrong shape, surfaces as ``JSONDecodeError`` or a
  pydantic ``ValidationError``.

Streams are the SDK's own async generators; closing ours closes theirs, which leaves the
``httpx`` streaming context and closes the response (and, mid-body, the connection).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import httpx
import ollama
import pydantic

from runtimestate.errors import BackendError, BackendUnreachable, ProtocolError, ServerError
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

__all__ = ["OllamaClient"]


def _system(system: str | None) -> dict[str, Any]:
    # An empty system text would replace the model's own; send the field only when given.
    return {} if system is None else {"system": system}


class OllamaClient(ModelClient):
    """The ``ollama`` kind's model client, on the official ``ollama.AsyncClient`` with its uneven
    errors made regular."""

    translated = (
        ollama.ResponseError,
        ConnectionError,
        httpx.HTTPError,
        json.JSONDecodeError,
        pydantic.ValidationError,
    )

    @classmethod
    def create_sdk(cls, backend: BackendRef, *, timeout: float, max_body_bytes: int) -> Any:
        return ollama.AsyncClient(
            host=backend.base_url.rstrip("/"),
            timeout=timeout,
            follow_redirects=False,  # the SDK's default is True; see runtimestate.status
            transport=bounded_transport(httpx, max_body_bytes),
        )

    @staticmethod
    async def close_sdk(sdk: Any) -> None:
        await sdk.close()

    def _classify(self, exc: BaseException) -> tuple[type[BackendError], str]:
        if isinstance(exc, ollama.ResponseError):
            if exc.status_code == -1:
                return ServerError, f"error inside the stream: {exc.error}"
            return status_error_class(exc.status_code), f"HTTP {exc.status_code}: {exc.error}"
        if isinstance(exc, ConnectionError | httpx.TransportError):
            return BackendUnreachable, f"unreachable: {type(exc).__name__}: {exc}"
        return ProtocolError, f"malformed response: {type(exc).__name__}"

    def _client(self) -> ollama.AsyncClient:
        sdk: ollama.AsyncClient = self._sdk()
        return sdk

    async def _chat(self, messages: list[ChatMessage], sampling: Sampling) -> ChatResult:
        options = sampling.named(max_tokens="num_predict")
        response = await self._client().chat(
            model=self.provider.model,
            messages=[{"role": m.role, "content": m.content} for m in messages],
            stream=False,
            options=options or None,
        )
        return ChatResult(
            message=ChatMessage(
                role=response.message.role or "assistant",
                content=response.message.content or "",
            ),
            usage=Usage(
                prompt_tokens=response.prompt_eval_count or 0,
                completion_tokens=response.eval_count or 0,
            ),
            finish_reason=response.done_reason,
        )

    async def _prompt(self, prompt: str, system: str | None) -> str:
        response = await self._client().generate(
            model=self.provider.model, prompt=prompt, stream=False, **_system(system)
        )
        return str(response.response)

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        response = await self._client().embed(model=self.provider.model, input=texts)
        if len(response.embeddings) != len(texts):  # one vector per text, as the others check
            raise ProtocolError(
                f"{self._where()}: malformed embedding response", backend=self.backend.base_url
            )
        return [list(vector) for vector in response.embeddings]

    async def _stream(
        self, messages: list[ChatMessage] | None, prompt: str | None, system: str | None
    ) -> AsyncGenerator[str, None]:
        client = self._client()
        if messages is not None:
            chats = await client.chat(
                model=self.provider.model,
                messages=[{"role": m.role, "content": m.content} for m in messages],
                stream=True,
            )
            try:
                async for part in chats:
                    yield part.message.content or ""
            finally:
                await chats.aclose()  # type: ignore[attr-defined]
        else:
            generated = await client.generate(
                model=self.provider.model, prompt=prompt or "", stream=True, **_system(system)
            )
            try:
                async for piece in generated:
                    yield piece.response or ""
            finally:
                await generated.aclose()  # type: ignore[attr-defined]
