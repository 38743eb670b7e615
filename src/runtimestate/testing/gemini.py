"""An emulated Gemini API account (``v1beta``): model listing with paging, and inference.

Follows docs/protocols.md: ``GET /v1beta/models`` pages with ``pageSize`` (default 50, at most
1000) and ``pageToken``/``nextPageToken`` (absent on the last page); ``GET /v1beta/models/{id}``
returns one model; the key travels in ``x-goog-api-key`` or ``?key=``, and a wrong key is **400**
``INVALID_ARGUMENT`` with reason ``API_KEY_INVALID`` (no key at all is 403, as on the real API).

Inference covers what google-genai calls: ``models/{m}:generateContent``,
``:streamGenerateContent`` (SSE with ``alt=sse``, which the client always asks for; a JSON array
otherwise), ``:embedContent``, ``:batchEmbedContents`` (google-genai sends every
``embed_content`` call there, one request per text) and ``:countTokens``. A model the account
lacks, or one whose ``supportedGenerationMethods`` lack the method, is the real 404
``NOT_FOUND``. A stream that fails after it began carries a ``data: {"error": {...}}`` event,
which google-genai raises as ``APIError``.

The account also serves Gemini's OpenAI-compatible API under ``/v1beta/openai``: ``/chat/
completions`` (streamed or not) and ``/embeddings``, in OpenAI's shapes (the same inference as the
OpenAI emulators, :class:`~runtimestate.testing.openai.OpenAIEndpoints`). Two things differ there,
as on the real API: the key travels as ``Authorization: Bearer <key>``, and the model is named
without ``models/`` (``gemini-2.0-flash``). Its errors keep Google's error object but wrapped in a
JSON array (``[{"error": {"code": 400, ...}}]``), which is what the real endpoint answers.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from runtimestate.clock import Clock
from runtimestate.errors import mask_secret
from runtimestate.testing.base import (
    BodyError,
    EmuRequest,
    Handler,
    Reply,
    StreamReply,
    answer_words,
    count_tokens,
    embed_text,
    json_bytes,
    stable_int,
)
from runtimestate.testing.openai import OpenAIEndpoints

__all__ = ["GeminiAccount", "GeminiModel"]

_PREFIX = "/v1beta/models"
_OPENAI_PREFIX = "/v1beta/openai"
_DEFAULT_PAGE = 50
_MAX_PAGE = 1000
_EMBED_DIMS = 768
_STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}
_BAD_KEY = "API key not valid. Please pass a valid API key."


@dataclass(frozen=True, kw_only=True, slots=True)
class GeminiModel:
    """One model of the account's listing; ``name`` gets its ``models/`` prefix if missing."""

    name: str
    input_token_limit: int = 1_048_576
    output_token_limit: int = 8192
    methods: tuple[str, ...] = ("generateContent", "countTokens")
    version: str = "001"
    display_name: str | None = None
    description: str = ""
    temperature: float | None = 1.0
    top_p: float | None = 0.95
    top_k: int | None = 40
    max_temperature: float | None = 2.0
    thinking: bool = False

    def __post_init__(self) -> None:
        if not self.name.startswith("models/"):
            object.__setattr__(self, "name", f"models/{self.name}")

    @property
    def short_name(self) -> str:
        return self.name.removeprefix("models/")

    def to_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "displayName": self.display_name or self.short_name.replace("-", " ").title(),
            "description": self.description,
            "inputTokenLimit": self.input_token_limit,
            "outputTokenLimit": self.output_token_limit,
            "supportedGenerationMethods": list(self.methods),
        }
        optional = {
            "temperature": self.temperature,
            "topP": self.top_p,
            "topK": self.top_k,
            "maxTemperature": self.max_temperature,
        }
        entry.update({k: v for k, v in optional.items() if v is not None})
        if self.thinking:
            entry["thinking"] = True
        return entry


def _sse(value: Any) -> bytes:
    return b"data: " + json_bytes(value) + b"\r\n\r\n"


def _texts(content: Any) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, dict):
        return []
    parts = content.get("parts") or []
    return [str(p["text"]) for p in parts if isinstance(p, dict) and "text" in p]


class GeminiAccount(OpenAIEndpoints):
    """A Gemini API account: its key and its models (``models`` is a mutable list), listed at
    most ``max_page_size`` to a page; its native API and its OpenAI-compatible one."""

    kind = "gemini"

    def __init__(
        self,
        *,
        name: str,
        root: Callable[[], str],
        clock: Clock,
        api_key: str,
        models: Iterable[GeminiModel | str] = (),
        max_page_size: int = _MAX_PAGE,
    ) -> None:
        super().__init__(name=name, root=root, clock=clock)
        if max_page_size < 1:
            raise ValueError("max_page_size must be at least 1")
        self.api_key = api_key
        # The most models one page holds, whatever pageSize asks for: the real API caps it at
        # 1000; a test sets it lower to make a client page through a short list.
        self.max_page_size = max_page_size
        self.models: list[GeminiModel] = [
            m if isinstance(m, GeminiModel) else GeminiModel(name=m) for m in models
        ]
        self.token_seconds = 0.0
        self.route("GET", _PREFIX, self._list)
        self.route("GET", "/v1beta/tunedModels", self._tuned)
        # Gemini's OpenAI-compatible API has no legacy ``/completions``.
        self.route_openai(_OPENAI_PREFIX, completions=False)
        self._actions: dict[str, Handler] = {
            "generateContent": self._generate,
            "streamGenerateContent": self._stream_generate,
            "embedContent": self._embed,
            "batchEmbedContents": self._batch_embed,
            "countTokens": self._count,
        }

    def __repr__(self) -> str:
        return f"GeminiAccount(name={self.name!r}, api_key={mask_secret(self.api_key)!r})"

    def add_model(self, model: GeminiModel | str) -> GeminiModel:
        entry = model if isinstance(model, GeminiModel) else GeminiModel(name=model)
        self.models.append(entry)
        return entry

    def error(self, status: int, message: str) -> Reply:
        return Reply(status=status, body=json_bytes(self._error_body(status, message)))

    def _error_body(self, status: int, message: str) -> dict[str, Any]:
        return {
            "error": {
                "code": status,
                "message": message,
                "status": _STATUS_NAMES.get(status, "UNKNOWN"),
            }
        }

    def stream_error_chunk(self, message: str) -> bytes:
        return _sse(self._error_body(500, message))

    def oversized_prefix(self) -> bytes:
        return b'{"models":['

    # -- the OpenAI-compatible API ----------------------------------------------------------------

    def serves(self, model: str) -> bool:
        return any(m.short_name == model for m in self.models)

    def model_not_found(self, model: str) -> Reply:
        return self.openai_error(
            404,
            f"models/{model} is not found for API version v1main, or is not supported for "
            "generateContent. Call ListModels to see the list of available models and their "
            "supported methods.",
        )

    def embedding_dims(self, model: str) -> int:
        return _EMBED_DIMS

    def openai_error(self, status: int, message: str) -> Reply:
        return Reply(status=status, body=json_bytes([self._error_body(status, message)]))

    def _error_object(
        self, status: int, message: str, *, kind: str, param: str | None = None, code: Any = None
    ) -> Reply:
        return self.openai_error(status, message)

    # -- both --------------------------------------------------------------------------------------

    def _key(self, request: EmuRequest) -> str | None:
        if request.path.startswith(_OPENAI_PREFIX + "/"):
            scheme, _, secret = request.headers.get("authorization", "").partition(" ")
            return secret.strip() if scheme.lower() == "bearer" and secret.strip() else None
        return request.headers.get("x-goog-api-key") or request.query.get("key")

    async def respond(self, request: EmuRequest) -> Reply | StreamReply:
        key = self._key(request)
        wrap = request.path.startswith(_OPENAI_PREFIX + "/")
        if not key:
            message = (
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API."
            )
            return self.openai_error(403, message) if wrap else self.error(403, message)
        if key != self.api_key:
            body = self._error_body(400, _BAD_KEY)
            body["error"]["details"] = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {
                    "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
                    "locale": "en-US",
                    "message": _BAD_KEY,
                },
            ]
            return Reply(status=400, body=json_bytes([body] if wrap else body))
        return await super().respond(request)

    def match(self, request: EmuRequest) -> Handler | None:
        if not request.path.startswith(_PREFIX + "/"):
            return None
        if request.method == "GET":
            return self._get
        action = request.path.rpartition(":")[2]
        return self._actions.get(action) if request.method == "POST" else None

    def _find(self, name: str, method: str | None) -> GeminiModel | Reply:
        for model in self.models:
            if model.name == name and (method is None or method in model.methods):
                return model
        return self.error(
            404,
            f"{name} is not found for API version v1beta, or is not supported for "
            f"{method or 'get'}. Call ListModels to see the list of available models and their "
            "supported methods.",
        )

    def _target(
        self, request: EmuRequest, method: str
    ) -> tuple[GeminiModel, dict[str, Any]] | Reply:
        name = request.path.removeprefix("/v1beta/").rpartition(":")[0]
        found = self._find(name, method)
        if isinstance(found, Reply):
            return found
        try:
            return found, request.json_object()
        except BodyError as exc:
            return self.error(400, f"Invalid JSON payload received. {exc}")

    async def _list(self, request: EmuRequest) -> Reply:
        raw_size = request.query.get("pageSize", "")
        size = int(raw_size) if raw_size.isdigit() and int(raw_size) > 0 else _DEFAULT_PAGE
        size = min(size, self.max_page_size)
        token = request.query.get("pageToken", "")
        offset = 0
        if token:
            try:
                offset = int(base64.urlsafe_b64decode(token.encode()).decode())
            except (ValueError, binascii.Error):
                return self.error(400, "Invalid page token.")
        page = self.models[offset : offset + size]
        body: dict[str, Any] = {"models": [m.to_json() for m in page]}
        if offset + size < len(self.models):
            body["nextPageToken"] = base64.urlsafe_b64encode(str(offset + size).encode()).decode()
        return Reply(body=json_bytes(body))

    async def _tuned(self, request: EmuRequest) -> Reply:
        return Reply(body=b"{}")

    async def _get(self, request: EmuRequest) -> Reply:
        found = self._find(request.path.removeprefix("/v1beta/"), None)
        if isinstance(found, Reply):
            return found
        return Reply(body=json_bytes(found.to_json()))

    def _prompt(self, body: dict[str, Any]) -> tuple[str, int]:
        contents = body.get("contents") or []
        if isinstance(contents, dict):
            contents = [contents]
        user = [c for c in contents if isinstance(c, dict) and c.get("role", "user") == "user"]
        prompt = " ".join(_texts(user[-1])) if user else ""
        every = [t for c in contents for t in _texts(c)] + _texts(body.get("systemInstruction"))
        return prompt, sum(count_tokens(t) for t in every)

    def _answer(
        self, model: GeminiModel, body: dict[str, Any]
    ) -> tuple[list[str], str, dict[str, int]]:
        prompt, prompt_tokens = self._prompt(body)
        config = body.get("generationConfig") or {}
        limit = config.get("maxOutputTokens") if isinstance(config, dict) else None
        pieces, cut = answer_words(
            model.short_name, prompt, max_tokens=limit if isinstance(limit, int) else None
        )
        usage = {
            "promptTokenCount": prompt_tokens,
            "candidatesTokenCount": len(pieces),
            "totalTokenCount": prompt_tokens + len(pieces),
        }
        return pieces, "MAX_TOKENS" if cut else "STOP", usage

    def _frame(
        self,
        model: GeminiModel,
        text: str,
        finish: str | None,
        usage: dict[str, int] | None,
        response_id: str,
    ) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}], "role": "model"},
            "index": 0,
        }
        if finish is not None:
            candidate["finishReason"] = finish
        frame: dict[str, Any] = {"candidates": [candidate]}
        if usage is not None:
            frame["usageMetadata"] = usage
        frame["modelVersion"] = model.short_name
        frame["responseId"] = response_id
        return frame

    async def _generate(self, request: EmuRequest) -> Reply:
        target = self._target(request, "generateContent")
        if isinstance(target, Reply):
            return target
        model, body = target
        pieces, finish, usage = self._answer(model, body)
        response_id = f"{stable_int(model.name, ''.join(pieces)):016x}"
        return Reply(
            body=json_bytes(self._frame(model, "".join(pieces), finish, usage, response_id))
        )

    async def _stream_generate(self, request: EmuRequest) -> Reply | StreamReply:
        target = self._target(request, "generateContent")
        if isinstance(target, Reply):
            return target
        model, body = target
        pieces, finish, usage = self._answer(model, body)
        sse = request.query.get("alt") == "sse"
        chunks = self._chunks(model, pieces, finish, usage, sse=sse)
        content_type = "text/event-stream" if sse else "application/json; charset=UTF-8"
        return StreamReply(chunks=chunks, content_type=content_type)

    async def _chunks(
        self,
        model: GeminiModel,
        pieces: list[str],
        finish: str,
        usage: dict[str, int],
        *,
        sse: bool,
    ) -> AsyncGenerator[bytes, None]:
        response_id = f"{stable_int(model.name, ''.join(pieces)):016x}"
        for index, piece in enumerate(pieces):
            if self.token_seconds > 0:
                await self._clock.sleep(self.token_seconds)
            last = index == len(pieces) - 1
            frame = self._frame(
                model, piece, finish if last else None, usage if last else None, response_id
            )
            if sse:
                yield _sse(frame)
            else:
                yield (
                    (b"[" if index == 0 else b",\r\n") + json_bytes(frame) + (b"]" if last else b"")
                )

    def _vector(self, model: GeminiModel, request: dict[str, Any]) -> dict[str, list[float]]:
        config = request.get("embedContentConfig") or {}
        wanted = request.get("outputDimensionality", config.get("outputDimensionality"))
        dims = wanted if isinstance(wanted, int) and wanted > 0 else _EMBED_DIMS
        return {"values": embed_text(" ".join(_texts(request.get("content"))), dims)}

    async def _embed(self, request: EmuRequest) -> Reply:
        target = self._target(request, "embedContent")
        if isinstance(target, Reply):
            return target
        model, body = target
        return Reply(body=json_bytes({"embedding": self._vector(model, body)}))

    async def _batch_embed(self, request: EmuRequest) -> Reply:
        target = self._target(request, "embedContent")
        if isinstance(target, Reply):
            return target
        model, body = target
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return self.error(400, "* BatchEmbedContentsRequest.requests: at least one is required")
        vectors = [self._vector(model, r) for r in requests if isinstance(r, dict)]
        return Reply(body=json_bytes({"embeddings": vectors}))

    async def _count(self, request: EmuRequest) -> Reply:
        target = self._target(request, "countTokens")
        if isinstance(target, Reply):
            return target
        _, body = target
        _, tokens = self._prompt(body)
        return Reply(body=json_bytes({"totalTokens": tokens}))
