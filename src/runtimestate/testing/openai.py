"""Emulated OpenAI accounts and vLLM servers: the OpenAI-compatible API, in two dialects.

Both serve ``/v1/models``, ``/v1/chat/completions`` (a JSON object with ``usage``, or SSE
``data: {chat.completion.chunk}`` events ended by ``data: [DONE]``), ``/v1/completions`` and
``/v1/embeddings``. They differ where the real servers differ (docs/protocols.md):

- OpenAI always wants ``Authorization: Bearer <key>`` and refuses a bad one with 401 and an error
  object whose code is ``invalid_api_key``; its model entries are ``owned_by: "system"``; a model
  the account lacks is 404 ``model_not_found``. Its base URL ends in ``/v1`` (the API root the
  ``openai`` package expects), so recorded paths and fault paths are relative to that:
  ``/models``, ``/chat/completions``.
- vLLM serves one model, lists it with ``root``, ``parent``, ``max_model_len`` and
  ``permission``, ``owned_by: "vllm"``; with an API key, a bad key on ``/v1/*`` is 401 with the
  plain string body ``{"error":"Unauthorized"}`` while ``/health`` stays open.

An error after a stream began is an SSE event ``data: {"error": {...}}``, which the ``openai``
package raises as ``APIError``.
"""

from __future__ import annotations

import base64
import struct
from abc import abstractmethod
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any

from runtimestate.clock import Clock
from runtimestate.errors import mask_secret
from runtimestate.testing.base import (
    BodyError,
    EmulatedBackend,
    EmuRequest,
    Reply,
    StreamReply,
    answer_words,
    count_tokens,
    embed_text,
    json_bytes,
    stable_int,
)

__all__ = ["OpenAIAccount", "OpenAIEndpoints", "VLLMServer"]

_SSE = "text/event-stream; charset=utf-8"
_CREATED_BASE = 1_686_935_002


def _event(value: Any) -> bytes:
    return b"data: " + json_bytes(value) + b"\n\n"


def _text(content: Any) -> str:
    """A message's text: a plain string or the text parts of a content list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _embedding_dims(model: str) -> int:
    if "large" in model:
        return 3072
    return 1536


class OpenAIEndpoints(EmulatedBackend):
    """The OpenAI inference endpoints (chat, completions, embeddings), for any backend that
    serves them: OpenAI and vLLM, and Ollama's OpenAI-compatible API under ``/v1``. A subclass
    says which models it serves and how it answers for one it does not; it registers the routes
    under its own prefix with :meth:`route_openai`."""

    token_seconds: float
    # Switchable behaviours of real OpenAI-compatible servers other than the reference ones:
    # ``context_limit`` refuses a request whose prompt plus ``max_tokens`` exceeds it, with the
    # real 400 ``context_length_exceeded`` answer; ``sse_pings`` sends ``: ping`` comment lines
    # between stream events (as llama.cpp's server and proxies do to keep a connection alive);
    # ``per_token_embeddings`` answers an embedding as one vector per token of the input (what a
    # server with pooling switched off returns) instead of one flat vector.
    context_limit: int | None = None
    sse_pings: bool = False
    per_token_embeddings: bool = False

    def route_openai(self, prefix: str, *, completions: bool = True) -> None:
        self.route("POST", f"{prefix}/chat/completions", self._openai_chat)
        if completions:
            self.route("POST", f"{prefix}/completions", self._openai_completions)
        self.route("POST", f"{prefix}/embeddings", self._openai_embeddings)

    @abstractmethod
    def serves(self, model: str) -> bool:
        """Whether inference on ``model`` is answered."""

    @abstractmethod
    def model_not_found(self, model: str) -> Reply:
        """The answer for inference on a model this backend does not serve."""

    def embedding_dims(self, model: str) -> int:
        return _embedding_dims(model)

    def openai_error(self, status: int, message: str) -> Reply:
        if status == 429:
            return self._error_object(status, message, kind="requests", code="rate_limit_exceeded")
        kind = "invalid_request_error" if status < 500 else "server_error"
        return self._error_object(status, message, kind=kind)

    def _error_object(
        self, status: int, message: str, *, kind: str, param: str | None = None, code: Any = None
    ) -> Reply:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return Reply(status=status, body=json_bytes(body))

    def _inference_body(self, request: EmuRequest, *, required: str) -> dict[str, Any] | Reply:
        try:
            body = request.json_object()
        except BodyError as exc:
            return self.openai_error(400, str(exc))
        for field in ("model", required):
            if field not in body:
                return self._error_object(
                    400,
                    f"Missing required parameter: '{field}'.",
                    kind="invalid_request_error",
                    param=field,
                    code="missing_required_parameter",
                )
        if not isinstance(body["model"], str) or not self.serves(body["model"]):
            return self.model_not_found(str(body["model"]))
        return body

    async def _openai_chat(self, request: EmuRequest) -> Reply | StreamReply:
        body = self._inference_body(request, required="messages")
        if isinstance(body, Reply):
            return body
        messages = body["messages"] if isinstance(body["messages"], list) else []
        texts = [_text(m.get("content")) for m in messages if isinstance(m, dict)]
        users = [
            _text(m.get("content"))
            for m in messages
            if isinstance(m, dict) and m.get("role") == "user"
        ]
        return self._openai_answer(body, prompt=users[-1] if users else "", texts=texts, chat=True)

    async def _openai_completions(self, request: EmuRequest) -> Reply | StreamReply:
        body = self._inference_body(request, required="prompt")
        if isinstance(body, Reply):
            return body
        raw = body["prompt"]
        prompt = raw if isinstance(raw, str) else " ".join(str(p) for p in raw or [])
        return self._openai_answer(body, prompt=prompt, texts=[prompt], chat=False)

    def _openai_answer(
        self, body: dict[str, Any], *, prompt: str, texts: list[str], chat: bool
    ) -> Reply | StreamReply:
        model: str = body["model"]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        pieces, cut = answer_words(
            model, prompt, max_tokens=limit if isinstance(limit, int) else None
        )
        prompt_tokens = sum(count_tokens(t) for t in texts)
        wanted = prompt_tokens + (limit if isinstance(limit, int) else 0)
        if self.context_limit is not None and wanted > self.context_limit:
            return self._error_object(
                400,
                f"This model's maximum context length is {self.context_limit} tokens. However, "
                f"you requested {wanted} tokens ({prompt_tokens} in the messages, "
                f"{wanted - prompt_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                kind="invalid_request_error",
                param="messages",
                code="context_length_exceeded",
            )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        prefix = "chatcmpl" if chat else "cmpl"
        head = {
            "id": f"{prefix}-{stable_int(model, prompt):016x}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(self._clock.now().timestamp()),
            "model": model,
        }
        finish = "length" if cut else "stop"
        if body.get("stream") is True:
            options = body.get("stream_options") or {}
            include_usage = isinstance(options, dict) and options.get("include_usage") is True
            chunks = self._openai_stream(
                head, pieces, finish, usage if include_usage else None, chat=chat
            )
            return StreamReply(chunks=chunks, content_type=_SSE)
        text = "".join(pieces)
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        else:
            choice["text"] = text
        return Reply(body=json_bytes({**head, "choices": [choice], "usage": usage}))

    async def _openai_stream(
        self,
        head: dict[str, Any],
        pieces: list[str],
        finish: str,
        usage: dict[str, int] | None,
        *,
        chat: bool,
    ) -> AsyncGenerator[bytes, None]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def choice(text: str | None, reason: str | None, role: bool = False) -> dict[str, Any]:
            entry: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": reason}
            if chat:
                delta: dict[str, Any] = {"role": "assistant"} if role else {}
                if text is not None:
                    delta["content"] = text
                entry["delta"] = delta
            else:
                entry["text"] = text or ""
            return entry

        if chat:
            yield _event({**head, "choices": [choice("", None, role=True)]})
        for piece in pieces:
            if self.token_seconds > 0:
                await self._clock.sleep(self.token_seconds)
            if self.sse_pings:
                yield b": ping\n\n"
            yield _event({**head, "choices": [choice(piece, None)]})
        yield _event({**head, "choices": [choice(None, finish)]})
        if usage is not None:
            yield _event({**head, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    async def _openai_embeddings(self, request: EmuRequest) -> Reply:
        body = self._inference_body(request, required="input")
        if isinstance(body, Reply):
            return body
        raw = body["input"]
        inputs = [raw] if isinstance(raw, str) else [str(item) for item in raw or []]
        wanted = body.get("dimensions")
        dims = (
            wanted if isinstance(wanted, int) and wanted > 0 else self.embedding_dims(body["model"])
        )
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, text in enumerate(inputs):
            vector = embed_text(text, dims)
            encoded: Any = vector
            if self.per_token_embeddings:
                encoded = [embed_text(token, dims) for token in text.split() or [text]]
            if as_base64:
                encoded = base64.b64encode(struct.pack(f"<{dims}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(count_tokens(t) for t in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return Reply(
            body=json_bytes(
                {"object": "list", "data": data, "model": body["model"], "usage": usage}
            )
        )


class _OpenAICompatible(OpenAIEndpoints):
    """What OpenAI and vLLM share beyond inference: auth, listing and error dialect."""

    def __init__(self, *, name: str, root: Callable[[], str], clock: Clock) -> None:
        super().__init__(name=name, root=root, clock=clock)
        self.token_seconds = 0.0
        prefix = self.api_prefix
        self.route("GET", f"{prefix}/models", self._models)
        self.route_openai(prefix)

    api_prefix = "/v1"

    @abstractmethod
    def model_entries(self) -> list[dict[str, Any]]:
        """The ``data`` of ``/v1/models``."""

    @abstractmethod
    def unauthorized(self, request: EmuRequest) -> Reply | None:
        """The 401 answer for this request, or None when its key is accepted."""

    def serves(self, model: str) -> bool:
        return any(entry["id"] == model for entry in self.model_entries())

    def error(self, status: int, message: str) -> Reply:
        return self.openai_error(status, message)

    def stream_error_chunk(self, message: str) -> bytes:
        return _event(
            {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
        )

    def oversized_prefix(self) -> bytes:
        return b'{"object":"list","data":['

    async def respond(self, request: EmuRequest) -> Reply | StreamReply:
        refusal = self.unauthorized(request)
        if refusal is not None:
            return refusal
        return await super().respond(request)

    def _created(self, model: str) -> int:
        return _CREATED_BASE + stable_int(model) % 50_000_000

    async def _models(self, request: EmuRequest) -> Reply:
        return Reply(body=json_bytes({"object": "list", "data": self.model_entries()}))


class OpenAIAccount(_OpenAICompatible):
    """An OpenAI account: a key and the models it may use. ``models`` is a mutable list."""

    kind = "openai"
    mount = "/v1"
    api_prefix = ""

    def __init__(
        self,
        *,
        name: str,
        root: Callable[[], str],
        clock: Clock,
        api_key: str,
        models: Iterable[str] = (),
    ) -> None:
        super().__init__(name=name, root=root, clock=clock)
        self.api_key = api_key
        self.models: list[str] = list(models)

    def __repr__(self) -> str:
        return f"OpenAIAccount(name={self.name!r}, api_key={mask_secret(self.api_key)!r})"

    def match(self, request: EmuRequest) -> Any:
        if request.method == "GET" and request.path.startswith("/models/"):
            return self._retrieve
        return None

    def model_entries(self) -> list[dict[str, Any]]:
        return [self._entry(model) for model in self.models]

    def serves(self, model: str) -> bool:
        return model in self.models

    def _entry(self, model: str) -> dict[str, Any]:
        return {
            "id": model,
            "object": "model",
            "created": self._created(model),
            "owned_by": "system",
        }

    async def _retrieve(self, request: EmuRequest) -> Reply:
        model = request.path.removeprefix("/models/")
        if model not in self.models:
            return self.model_not_found(model)
        return Reply(body=json_bytes(self._entry(model)))

    def unauthorized(self, request: EmuRequest) -> Reply | None:
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return self._error_object(
                401,
                "You didn't provide an API key. You need to provide your API key in an "
                "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                kind="invalid_request_error",
            )
        if key.strip() != self.api_key:
            return self._error_object(
                401,
                f"Incorrect API key provided: {mask_secret(key.strip())}. You can find your API "
                "key at https://platform.openai.com/account/api-keys.",
                kind="invalid_request_error",
                code="invalid_api_key",
            )
        return None

    def model_not_found(self, model: str) -> Reply:
        return self._error_object(
            404,
            f"The model `{model}` does not exist or you do not have access to it.",
            kind="invalid_request_error",
            code="model_not_found",
        )


class VLLMServer(_OpenAICompatible):
    """A vLLM server serving ``model``, plus any LoRA ``adapters`` (listed with ``parent`` set to
    the base model and ``max_model_len`` null). ``healthy`` False makes ``/health`` answer 503."""

    kind = "vllm"

    def __init__(
        self,
        *,
        name: str,
        root: Callable[[], str],
        clock: Clock,
        model: str,
        max_model_len: int | None = 8192,
        api_key: str | None = None,
    ) -> None:
        super().__init__(name=name, root=root, clock=clock)
        self.model = model
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.adapters: list[str] = []
        self.healthy = True
        self.route("GET", "/health", self._health)
        self.route("GET", "/version", self._version)

    def __repr__(self) -> str:
        masked = mask_secret(self.api_key) if self.api_key else None
        return f"VLLMServer(name={self.name!r}, model={self.model!r}, api_key={masked!r})"

    def add_adapter(self, name: str) -> None:
        """Serve a LoRA adapter ``name`` on top of the base model (as ``--lora-modules`` does)."""
        self.adapters.append(name)

    def model_entries(self) -> list[dict[str, Any]]:
        base = self._entry(self.model, root=self.model, parent=None, length=self.max_model_len)
        adapters = [
            self._entry(name, root=f"/adapters/{name}", parent=self.model, length=None)
            for name in self.adapters
        ]
        return [base, *adapters]

    def _entry(
        self, model: str, *, root: str, parent: str | None, length: int | None
    ) -> dict[str, Any]:
        created = self._created(model)
        permission = {
            "id": f"modelperm-{stable_int(self.name, model):016x}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        return {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": root,
            "parent": parent,
            "max_model_len": length,
            "permission": [permission],
        }

    def unauthorized(self, request: EmuRequest) -> Reply | None:
        if self.api_key is None or not request.path.startswith("/v1"):
            return None
        header = request.headers.get("Authorization", "")
        if header != f"Bearer {self.api_key}":
            return Reply(status=401, body=json_bytes({"error": "Unauthorized"}))
        return None

    def model_not_found(self, model: str) -> Reply:
        return self._error_object(
            404,
            f"The model `{model}` does not exist.",
            kind="NotFoundError",
            param="model",
            code=404,
        )

    async def _health(self, request: EmuRequest) -> Reply:
        return Reply(status=200 if self.healthy else 503, content_type="text/plain; charset=utf-8")

    async def _version(self, request: EmuRequest) -> Reply:
        return Reply(body=json_bytes({"version": "0.8.5"}))
