"""Chat, prompt, embed and stream against the Gemini API through ``google-genai``'s async side.

``genai.Client`` is built with an explicit base URL, ``api_version="v1beta"`` and a timeout in
milliseconds; calls go through ``client.aio``. Two SDK defaults are overridden on purpose:

* ``retry_options`` is set to a single attempt. Without it the SDK, when aiohttp is installed,
  sleeps 1-10 s and retries once on a refused connection - invisible latency that would also
  hide the failure from the resolver's health book.
* chat history is mapped to Gemini's roles (``assistant`` -> ``model``) and system messages go
  to ``system_instruction``, which is how the API expects them.

Error mapping follows the API's quirks (see PROTOCOLS.md): a bad key is **400**
``INVALID_ARGUMENT`` / ``API_KEY_INVALID``, not 401, so it is recognised by its text and reason
before the status-based mapping. Transport failures are aiohttp's (the SDK's preferred async
transport) or httpx2's when aiohttp is absent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import httpx2
import pydantic
from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    KeyRejected,
    ProtocolError,
)
from runtimestate.providers.base import BackendRef, ChatMessage, ChatResult, ModelClient, Usage
from runtimestate.providers.ollama import classify_status

__all__ = ["GeminiClient", "gemini_root"]

_ROLES = {"assistant": "model", "model": "model", "user": "user"}


def gemini_root(base_url: str) -> str:
    """The base URL the SDK wants: without a trailing ``/v1beta`` (it adds the version)."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1beta")


def _split(messages: list[ChatMessage]) -> tuple[str | None, list[types.Content]]:
    system = [m.content for m in messages if m.role == "system"]
    contents = [
        types.Content(role=_ROLES.get(m.role, "user"), parts=[types.Part(text=m.content)])
        for m in messages
        if m.role != "system"
    ]
    return ("\n".join(system) if system else None), contents


def _config(system: str | None) -> types.GenerateContentConfig | None:
    return None if system is None else types.GenerateContentConfig(system_instruction=system)


class GeminiClient(ModelClient):
    translated = (
        genai_errors.APIError,
        genai_errors.UnknownApiResponseError,
        aiohttp.ClientError,
        httpx2.HTTPError,
        TimeoutError,
        json.JSONDecodeError,
        pydantic.ValidationError,
    )

    @classmethod
    def create_sdk(cls, backend: BackendRef, *, timeout: float) -> Any:
        return genai.Client(
            api_key=backend.api_key or "",
            http_options=types.HttpOptions(
                base_url=gemini_root(backend.base_url),
                api_version="v1beta",
                timeout=int(timeout * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
            ),
        )

    @staticmethod
    async def close_sdk(sdk: Any) -> None:
        await sdk.aio.aclose()

    def _classify(self, exc: BaseException) -> tuple[type[BackendError], str]:
        if isinstance(exc, genai_errors.APIError):
            text = f"{exc.message or ''} {exc.details!s}"
            if exc.code in (401, 403) or "API_KEY_INVALID" in text or "API key not valid" in text:
                return KeyRejected, f"key rejected: HTTP {exc.code}: {exc.message}"
            return classify_status(exc.code), f"HTTP {exc.code} {exc.status}: {exc.message}"
        if isinstance(exc, aiohttp.ClientPayloadError | httpx2.RemoteProtocolError):
            return BackendUnreachable, f"stream broken: {type(exc).__name__}"
        if isinstance(exc, aiohttp.ClientError | httpx2.TransportError | TimeoutError):
            return BackendUnreachable, f"unreachable: {type(exc).__name__}: {exc}"
        return ProtocolError, f"malformed response: {type(exc).__name__}"

    def _malformed(self, what: str) -> ProtocolError:
        return ProtocolError(f"{self._where()}: malformed {what}", backend=self.backend.base_url)

    def _models(self) -> Any:
        sdk: genai.Client = self._sdk()
        return sdk.aio.models

    async def _generate(self, system: str | None, contents: list[types.Content]) -> ChatResult:
        response = await self._models().generate_content(
            model=self.provider.model, contents=contents, config=_config(system)
        )
        if not isinstance(response, types.GenerateContentResponse):
            raise self._malformed("generateContent response")
        usage = response.usage_metadata
        return ChatResult(
            message=ChatMessage(role="assistant", content=response.text or ""),
            usage=Usage(
                prompt_tokens=(usage.prompt_token_count or 0) if usage else 0,
                completion_tokens=(usage.candidates_token_count or 0) if usage else 0,
            ),
        )

    async def _chat(self, messages: list[ChatMessage]) -> ChatResult:
        system, contents = _split(messages)
        return await self._generate(system, contents)

    async def _prompt(self, prompt: str, system: str | None) -> str:
        contents = [types.Content(role="user", parts=[types.Part(text=prompt)])]
        return (await self._generate(system, contents)).message.content

    async def _embed(self, texts: list[str]) -> list[list[float]]:
        response = await self._models().embed_content(model=self.provider.model, contents=texts)
        embeddings = response.embeddings or []
        if len(embeddings) != len(texts):
            raise self._malformed("embedding response")
        return [list(e.values or []) for e in embeddings]

    async def _stream(
        self, messages: list[ChatMessage] | None, prompt: str | None, system: str | None
    ) -> AsyncGenerator[str, None]:
        if messages is not None:
            system, contents = _split(messages)
        else:
            contents = [types.Content(role="user", parts=[types.Part(text=prompt or "")])]
        chunks = await self._models().generate_content_stream(
            model=self.provider.model, contents=contents, config=_config(system)
        )
        try:
            async for chunk in chunks:
                yield chunk.text or ""
        finally:
            await chunks.aclose()
