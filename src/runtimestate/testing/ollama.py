"""An emulated Ollama server (the parts of its API that runtimestate and its clients use).

Shapes and status codes follow docs/protocols.md: ``/api/tags`` with bare-hex digests and
``:latest`` tags, the NDJSON pull stream (``pulling manifest``, one ``pulling <12 hex>`` series
per layer, ``verifying sha256 digest``, ``writing manifest``, ``removing unused layers`` only when
something was pruned, ``success``), errors as ``{"error": ...}`` (inside a 200 stream once it has
begun), ``/api/show``, ``/api/ps``, ``/api/delete``, and the inference endpoints ``/api/chat``,
``/api/generate`` and ``/api/embed``, and the OpenAI-compatible ``/v1`` inference endpoints.

A pull spreads its progress lines over :attr:`OllamaNode.pull_seconds` and adds the model only
after ``writing manifest`` has been delivered: the dispatcher stops driving the generator when the
client disconnects or a stream fault cuts in, so a broken-off pull lands nothing.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from runtimestate.clock import Clock
from runtimestate.testing.base import (
    BodyError,
    EmuRequest,
    Reply,
    StreamReply,
    answer_words,
    count_tokens,
    embed_text,
    json_bytes,
)
from runtimestate.testing.ollama_models import (
    InvalidModelName,
    OllamaModel,
    make_model,
    namespace_of,
    normalize_model_name,
)
from runtimestate.testing.openai import OpenAIEndpoints

__all__ = ["OllamaNode"]

_NDJSON = "application/x-ndjson"
_KEEP_ALIVE = timedelta(minutes=5)
_WEIGHT_STEPS = 8
_NS_PER_TOKEN = 10_000_000
_NS_PER_PROMPT_TOKEN = 1_000_000
_LOAD_NS = 1_000_000


def _line(value: dict[str, Any]) -> bytes:
    return json_bytes(value) + b"\n"


class OllamaNode(OpenAIEndpoints):
    """One emulated Ollama server. ``models`` maps normalized names to :class:`OllamaModel`.

    ``pullable`` (normalized names) limits what a pull can fetch; None means any valid name.
    ``catalog`` holds models with custom attributes that a pull of that name should produce
    (see :meth:`offer`). ``token_seconds`` paces streamed inference chunks.
    """

    kind = "ollama"
    version = "0.5.1"

    def __init__(
        self,
        *,
        name: str,
        root: Callable[[], str],
        clock: Clock,
        pull_seconds: float = 0.05,
        pullable: Iterable[str] | None = None,
    ) -> None:
        super().__init__(name=name, root=root, clock=clock)
        self.models: dict[str, OllamaModel] = {}
        self.catalog: dict[str, OllamaModel] = {}
        self.pull_seconds = pull_seconds
        self.token_seconds = 0.0
        self.pullable: set[str] | None = (
            {normalize_model_name(n) for n in pullable} if pullable is not None else None
        )
        self.loaded: dict[str, datetime] = {}
        # Pulls streaming right now, and pulls whose client went away before the end: what a
        # test of cancelling counts, from outside the code that cancels.
        self.pulls_running = 0
        self.pulls_broken_off = 0
        # Pull requests received, per model name as normalized: what a test of retrying counts.
        self.pull_requests: dict[str, int] = {}
        self.route("GET", "/", self._root_text)
        self.route("GET", "/api/version", self._version)
        self.route("GET", "/api/tags", self._tags)
        self.route("GET", "/api/ps", self._ps)
        self.route("GET", "/v1/models", self._openai_models)
        self.route("POST", "/api/pull", self._pull)
        self.route("DELETE", "/api/delete", self._delete)
        self.route("POST", "/api/show", self._show)
        self.route("POST", "/api/chat", self._chat)
        self.route("POST", "/api/generate", self._generate)
        self.route("POST", "/api/embed", self._embed)
        # Ollama's OpenAI-compatible API, as real Ollama serves it under /v1.
        self.route_openai("/v1")

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "pull_requests": dict(self.pull_requests)}

    def add_model(self, name: str, **attributes: Any) -> OllamaModel:
        """Put a model in the inventory as if pulled; attributes as in :func:`make_model`."""
        model = self._make(name, **attributes)
        self.models[model.name] = model
        return model

    def offer(self, name: str, **attributes: Any) -> OllamaModel:
        """Make a pull of ``name`` produce a model with these attributes."""
        model = self._make(name, **attributes)
        self.catalog[model.name] = model
        return model

    def _make(self, name: str, **attributes: Any) -> OllamaModel:
        attributes.setdefault("modified_at", self._clock.now())
        return make_model(name, **attributes)

    @staticmethod
    def _pullable_names(names: set[str]) -> set[str]:
        # Normalized on use, so a test may assign plain names ("llama3") to ``pullable``.
        return {normalize_model_name(n) for n in names}

    def error(self, status: int, message: str) -> Reply:
        return Reply(status=status, body=json_bytes({"error": message}))

    def serves(self, model: str) -> bool:
        return self._find(model) is not None

    def model_not_found(self, model: str) -> Reply:
        return self._error_object(
            404, f'model "{model}" not found, try pulling it first', kind="api_error"
        )

    def embedding_dims(self, model: str) -> int:
        found = self._find(model)
        return found.embedding_length if found is not None else super().embedding_dims(model)

    def stream_error_chunk(self, message: str) -> bytes:
        return _line({"error": message})

    def route_not_found(self, request: EmuRequest) -> Reply:
        # Ollama's router (gin) answers unknown paths in plain text, not in its JSON error shape.
        return Reply(status=404, body=b"404 page not found", content_type="text/plain")

    def oversized_prefix(self) -> bytes:
        return b'{"models":['

    def _ok(self, value: Any) -> Reply:
        return Reply(body=json_bytes(value))

    def _model_field(self, body: dict[str, Any]) -> str:
        value = body.get("model") or body.get("name") or ""
        return value if isinstance(value, str) else ""

    def _find(self, name: str) -> OllamaModel | None:
        try:
            return self.models.get(normalize_model_name(name))
        except InvalidModelName:
            return None

    async def _root_text(self, request: EmuRequest) -> Reply:
        return Reply(body=b"Ollama is running", content_type="text/plain; charset=utf-8")

    async def _version(self, request: EmuRequest) -> Reply:
        return self._ok({"version": self.version})

    async def _tags(self, request: EmuRequest) -> Reply:
        return self._ok({"models": [m.tags_entry() for m in self.models.values()]})

    async def _ps(self, request: EmuRequest) -> Reply:
        now = self._clock.now()
        running = []
        for name, expires_at in list(self.loaded.items()):
            model = self.models.get(name)
            if model is None or expires_at <= now:
                del self.loaded[name]
                continue
            running.append(
                {
                    "name": model.name,
                    "model": model.name,
                    "size": model.size,
                    "digest": model.digest,
                    "details": model.details,
                    "expires_at": expires_at.isoformat(),
                    "size_vram": model.size,
                    "context_length": model.context_length,
                }
            )
        return self._ok({"models": running})

    async def _openai_models(self, request: EmuRequest) -> Reply:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": int(m.modified_at.timestamp()),
                "owned_by": namespace_of(m.name),
            }
            for m in self.models.values()
        ]
        return self._ok({"object": "list", "data": data})

    async def _pull(self, request: EmuRequest) -> Reply | StreamReply:
        try:
            body = request.json_object()
            name = normalize_model_name(self._model_field(body))
        except BodyError as exc:
            return self.error(400, str(exc))
        except InvalidModelName:
            return self.error(400, "invalid model name")
        self.pull_requests[name] = self.pull_requests.get(name, 0) + 1
        lines = self._pull_lines(name)
        if body.get("stream", True) is not False:
            return StreamReply(chunks=lines, content_type=_NDJSON)
        async for raw in lines:
            if raw.startswith(b'{"error"'):
                return Reply(status=500, body=raw.rstrip(b"\n"))
        return self._ok({"status": "success"})

    async def _pull_lines(self, name: str) -> AsyncGenerator[bytes, None]:
        self.pulls_running += 1
        finished = False
        try:
            async for line in self._pull_steps(name):
                yield line
            finished = True
        finally:
            self.pulls_running -= 1
            if not finished:
                self.pulls_broken_off += 1

    async def _pull_steps(self, name: str) -> AsyncGenerator[bytes, None]:
        yield _line({"status": "pulling manifest"})
        if self.pullable is not None and name not in self._pullable_names(self.pullable):
            yield _line({"error": "pull model manifest: file does not exist"})
            return
        offered = self.catalog.get(name)
        model = replace(offered, modified_at=self._clock.now()) if offered else self._make(name)
        on_disk = {layer.digest for m in self.models.values() for layer in m.layers}
        fresh = [layer for layer in model.layers if layer.digest not in on_disk]
        steps = sum(_WEIGHT_STEPS if i == 0 else 1 for i, _ in enumerate(fresh)) or 1
        interval = self.pull_seconds / steps
        for layer in model.layers:
            status = {"status": f"pulling {layer.digest[:12]}", "digest": f"sha256:{layer.digest}"}
            if layer.digest in on_disk:
                yield _line({**status, "total": layer.size, "completed": layer.size})
                continue
            parts = _WEIGHT_STEPS if layer is fresh[0] else 1
            yield _line({**status, "total": layer.size})
            for part in range(1, parts + 1):
                await self._clock.sleep(interval)
                yield _line(
                    {**status, "total": layer.size, "completed": layer.size * part // parts}
                )
        yield _line({"status": "verifying sha256 digest"})
        yield _line({"status": "writing manifest"})
        # Reached only if the client took "writing manifest": a broken-off pull lands nothing.
        previous = self.models.get(name)
        self.models[name] = model
        if previous is not None:
            kept = {layer.digest for m in self.models.values() for layer in m.layers}
            if any(layer.digest not in kept for layer in previous.layers):
                yield _line({"status": "removing unused layers"})
        yield _line({"status": "success"})

    async def _delete(self, request: EmuRequest) -> Reply:
        try:
            given = self._model_field(request.json_object())
            name = normalize_model_name(given)
        except BodyError as exc:
            return self.error(400, str(exc))
        except InvalidModelName:
            return self.error(400, f'name "{given}" is invalid')
        if self.models.pop(name, None) is None:
            return self.error(404, f"model '{given}' not found")
        self.loaded.pop(name, None)
        return Reply(content_type="text/plain; charset=utf-8")

    async def _show(self, request: EmuRequest) -> Reply:
        try:
            given = self._model_field(request.json_object())
        except BodyError as exc:
            return self.error(400, str(exc))
        if not given:
            return self.error(400, "model is required")
        model = self._find(given)
        if model is None:
            return self.error(404, f"model '{given}' not found")
        arch = model.family
        return self._ok(
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {model.name}\n',
                "parameters": model.parameters,
                "template": model.template,
                "details": model.details,
                "model_info": {
                    "general.architecture": arch,
                    "general.parameter_count": model.size * 2,
                    f"{arch}.context_length": model.context_length,
                    f"{arch}.embedding_length": model.embedding_length,
                },
                "capabilities": list(model.capabilities),
                "modified_at": model.modified_at.isoformat(),
            }
        )

    def _inference_model(self, body: dict[str, Any], need: str | None) -> OllamaModel | Reply:
        given = self._model_field(body)
        if not given:
            return self.error(400, "model is required")
        model = self._find(given)
        if model is None:
            return self.error(404, f'model "{given}" not found, try pulling it first')
        if need is not None and "completion" not in model.capabilities:
            return self.error(400, f'"{given}" does not support {need}')
        self.loaded[model.name] = self._clock.now() + _KEEP_ALIVE
        return model

    async def _chat(self, request: EmuRequest) -> Reply | StreamReply:
        return await self._complete(request, chat=True)

    async def _generate(self, request: EmuRequest) -> Reply | StreamReply:
        return await self._complete(request, chat=False)

    async def _complete(self, request: EmuRequest, *, chat: bool) -> Reply | StreamReply:
        try:
            body = request.json_object()
        except BodyError as exc:
            return self.error(400, str(exc))
        model = self._inference_model(body, "chat" if chat else "generate")
        if isinstance(model, Reply):
            return model
        if chat:
            messages = body.get("messages") or []
            if not isinstance(messages, list):
                return self.error(400, "messages must be a list")
            texts = [str(m.get("content", "")) for m in messages if isinstance(m, dict)]
            users = [
                str(m.get("content", ""))
                for m in messages
                if isinstance(m, dict) and m.get("role") == "user"
            ]
            prompt = users[-1] if users else ""
            empty = not messages
        else:
            prompt = str(body.get("prompt") or "")
            texts = [prompt, str(body.get("system") or "")]
            empty = not prompt
        created = self._clock.now().isoformat()
        if empty:
            return self._ok(self._frame(model, created, "", chat=chat, done="load"))
        options = body.get("options") or {}
        limit = options.get("num_predict") if isinstance(options, dict) else None
        pieces, cut = answer_words(
            model.name, prompt, max_tokens=limit if isinstance(limit, int) else None
        )
        final = self._frame(model, created, "", chat=chat, done="length" if cut else "stop")
        final.update(_timings(sum(count_tokens(t) for t in texts), len(pieces)))
        if body.get("stream", True) is False:
            final[("message" if chat else "response")] = (
                {"role": "assistant", "content": "".join(pieces)} if chat else "".join(pieces)
            )
            return self._ok(final)
        return StreamReply(
            chunks=self._chunks(model, pieces, final, chat=chat), content_type=_NDJSON
        )

    async def _chunks(
        self, model: OllamaModel, pieces: list[str], final: dict[str, Any], *, chat: bool
    ) -> AsyncGenerator[bytes, None]:
        for piece in pieces:
            if self.token_seconds > 0:
                await self._clock.sleep(self.token_seconds)
            created = self._clock.now().isoformat()
            yield _line(self._frame(model, created, piece, chat=chat, done=None))
        yield _line(final)

    def _frame(
        self, model: OllamaModel, created: str, text: str, *, chat: bool, done: str | None
    ) -> dict[str, Any]:
        frame: dict[str, Any] = {"model": model.name, "created_at": created}
        if chat:
            frame["message"] = {"role": "assistant", "content": text}
        else:
            frame["response"] = text
        frame["done"] = done is not None
        if done is not None:
            frame["done_reason"] = done
        return frame

    async def _embed(self, request: EmuRequest) -> Reply:
        try:
            body = request.json_object()
        except BodyError as exc:
            return self.error(400, str(exc))
        model = self._inference_model(body, None)
        if isinstance(model, Reply):
            return model
        raw = body.get("input", [])
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            return self.error(400, "invalid input type")
        wanted = body.get("dimensions")
        dims = (
            wanted
            if isinstance(wanted, int) and 0 < wanted <= model.embedding_length
            else model.embedding_length
        )
        tokens = sum(count_tokens(text) for text in inputs)
        return self._ok(
            {
                "model": model.name,
                "embeddings": [embed_text(text, dims) for text in inputs],
                "total_duration": _LOAD_NS + tokens * _NS_PER_PROMPT_TOKEN,
                "load_duration": _LOAD_NS,
                "prompt_eval_count": tokens,
            }
        )


def _timings(prompt_tokens: int, eval_tokens: int) -> dict[str, int]:
    prompt_ns = prompt_tokens * _NS_PER_PROMPT_TOKEN
    eval_ns = eval_tokens * _NS_PER_TOKEN
    return {
        "total_duration": _LOAD_NS + prompt_ns + eval_ns,
        "load_duration": _LOAD_NS,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": prompt_ns,
        "eval_count": eval_tokens,
        "eval_duration": eval_ns,
    }
