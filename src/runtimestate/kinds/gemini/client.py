"""Chat, prompt, embed and stream against the Gemini API through ``google-genai``'s async side.

``genai.Client`` is built with an explicit base URL, ``api_version="v1beta"`` and a timeout in
milliseconds; calls go through ``client.aio``. Three SDK defaults are overridden on purpose:

* the async transport is an ``httpx2.AsyncClient`` we own and close. Left to itself the SDK
  prefers aiohttp when it is installed (it is: the emulators use it), and that path subclasses
  ``aiohttp.ClientSession`` (a deprecation warning on every session) and, on a refused
  connection, sleeps 1-10 s and retries - invisible latency that would also hide the failure
  from the resolver's health book. With httpx2 a closed stream closes its response, like the
  other clients - almost: the SDK nests async generators without closing them, so closing its
  stream early leaves the HTTP response open until garbage collection. Each stream is therefore
  tagged with a request header, an httpx2 response hook remembers the tagged response, and our
  stream closes that response itself when it ends.
* ``retry_options`` is a single attempt: retrying elsewhere is the resolver's decision.
* nothing comes from the environment: the key is the snapshot's (a backend without one is
  :class:`~runtimestate.errors.KeyRejected` before any request, where the SDK would fall back to
  ``GOOGLE_API_KEY``) and ``vertexai=False`` is explicit.
* chat history is mapped to Gemini's roles (``assistant`` -> ``model``) and system messages go
  to ``system_instruction``, which is how the API expects them.

Error mapping follows the API's quirks (see :mod:`.api`): a bad key is **400**
``INVALID_ARGUMENT`` / ``API_KEY_INVALID``, not 401, so it is recognised by its text and reason
before the status table of :mod:`runtimestate.status`. Transport failures are httpx2's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

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
from runtimestate.kinds.gemini.api import VERSION, gemini_root, rejects_key
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

__all__ = ["GeminiClient"]

_ROLES = {"assistant": "model", "model": "model", "user": "user"}


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


_DEFAULTS = Sampling()

# Request header that tags a streaming request so its response can be closed deterministically.
_STREAM_TAG = "x-runtimestate-stream"


@dataclass(frozen=True, kw_only=True, slots=True)
class _Sdk:
    client: genai.Client
    http: httpx2.AsyncClient
    # Open streaming responses by tag, filled by the response hook, emptied by the stream.
    streams: dict[str, httpx2.Response]


def _finish_reason(response: types.GenerateContentResponse) -> str | None:
    """Gemini's finish reason in OpenAI's words (STOP -> stop, MAX_TOKENS -> length)."""
    candidates = response.candidates or []
    reason = candidates[0].finish_reason if candidates else None
    if reason is None:
        return None
    name = str(getattr(reason, "value", reason)).lower()
    return {"max_tokens": "length"}.get(name, name)


class GeminiClient(ModelClient):
    """The ``gemini`` kind's model client, on ``google-genai``'s async side with our own transport,
    one attempt per call and nothing taken from the environment."""

    translated = (
        genai_errors.APIError,
        genai_errors.UnknownApiResponseError,
        httpx2.HTTPError,
        TimeoutError,
        json.JSONDecodeError,
        pydantic.ValidationError,
    )

    @classmethod
    def create_sdk(cls, backend: BackendRef, *, timeout: float, max_body_bytes: int) -> Any:
        if not backend.api_key:
            # Without a key the SDK would take GOOGLE_API_KEY / GEMINI_API_KEY from the
            # environment - a key the snapshot never declared - or raise a bare ValueError.
            raise KeyRejected(
                f"gemini backend {backend.name!r} ({backend.base_url}): no API key configured",
                backend=backend.base_url,
            )
        streams: dict[str, httpx2.Response] = {}

        async def remember(response: httpx2.Response) -> None:
            tag = response.request.headers.get(_STREAM_TAG)
            if tag:
                streams[tag] = response

        http = httpx2.AsyncClient(
            event_hooks={"response": [remember]},
            follow_redirects=False,  # the key travels in a header a redirect would forward
            transport=bounded_transport(httpx2, max_body_bytes),
        )
        client = genai.Client(
            # Explicit, so GOOGLE_GENAI_USE_VERTEXAI in the environment cannot switch the API.
            vertexai=False,
            api_key=backend.api_key,
            http_options=types.HttpOptions(
                base_url=gemini_root(backend.base_url),
                api_version=VERSION,
                timeout=int(timeout * 1000),
                retry_options=types.HttpRetryOptions(attempts=1),
                httpx_async_client=http,
            ),
        )
        return _Sdk(client=client, http=http, streams=streams)

    @staticmethod
    async def close_sdk(sdk: Any) -> None:
        await sdk.client.aio.aclose()
        await sdk.http.aclose()

    def _classify(self, exc: BaseException) -> tuple[type[BackendError], str]:
        if isinstance(exc, genai_errors.APIError):
            text = f"{exc.message or ''} {exc.details!s}"
            if rejects_key(exc.code, text):
                return KeyRejected, f"key rejected: HTTP {exc.code}: {exc.message}"
            return status_error_class(exc.code), f"HTTP {exc.code} {exc.status}: {exc.message}"
        if isinstance(exc, httpx2.RemoteProtocolError):
            return BackendUnreachable, f"stream broken: {type(exc).__name__}"
        if isinstance(exc, httpx2.TransportError | TimeoutError):
            return BackendUnreachable, f"unreachable: {type(exc).__name__}: {exc}"
        return ProtocolError, f"malformed response: {type(exc).__name__}"

    def _malformed(self, what: str) -> ProtocolError:
        return ProtocolError(f"{self._where()}: malformed {what}", backend=self.backend.base_url)

    def _models(self) -> Any:
        return self._handle().client.aio.models

    def _handle(self) -> _Sdk:
        sdk: _Sdk = self._sdk()
        return sdk

    async def _generate(
        self,
        system: str | None,
        contents: list[types.Content],
        sampling: Sampling | None = None,
    ) -> ChatResult:
        config = _config(system)
        if sampling is not None and sampling != _DEFAULTS:
            config = (config or types.GenerateContentConfig()).model_copy(
                update=sampling.named(max_tokens="max_output_tokens", stop="stop_sequences")
            )
        response = await self._models().generate_content(
            model=self.provider.model, contents=contents, config=config
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
            finish_reason=_finish_reason(response),
        )

    async def _chat(self, messages: list[ChatMessage], sampling: Sampling) -> ChatResult:
        system, contents = _split(messages)
        return await self._generate(system, contents, sampling)

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
        sdk = self._handle()
        tag = uuid.uuid4().hex
        config = types.GenerateContentConfig(
            system_instruction=system, http_options=types.HttpOptions(headers={_STREAM_TAG: tag})
        )
        try:
            chunks = await sdk.client.aio.models.generate_content_stream(
                model=self.provider.model, contents=contents, config=config
            )
            try:
                async for chunk in chunks:
                    yield chunk.text or ""
            finally:
                await chunks.aclose()  # type: ignore[attr-defined]
        finally:
            response = sdk.streams.pop(tag, None)
            if response is not None:
                await response.aclose()
