"""The Ollama API on backends that speak only OpenAI's: requests, answers and streams translated.

An Ollama backend answers ``/api/chat``, ``/api/generate`` and ``/api/embed`` natively and the
gateway relays its bytes; a vLLM, OpenAI or Gemini backend gets the same request as an OpenAI
chat completion or embedding, and its answer comes back in Ollama's shapes, so an Ollama client
(the ``ollama`` SDK, Open WebUI's Ollama connection) can use every model of the fleet:

* ``options`` map to their OpenAI fields (``num_predict`` -> ``max_tokens``, ``temperature``,
  ``top_p``, ``stop``, ``seed``, the penalties); ``tools`` pass as they are (the two APIs share
  the function schema); ``format`` becomes ``response_format``;
* a stream of ``chat.completion.chunk`` events becomes NDJSON frames, the last one ``done: true``
  with the ``done_reason`` and token counts, written when the OpenAI stream ended properly
  (``[DONE]`` or a ``finish_reason``) - a stream that ends without either gets an error frame;
* tool-call arguments, a JSON string in OpenAI's answer, become the object Ollama's carries.

The listings' and ``/api/show``'s entries for models of other types are built from the snapshot
(:func:`tag_entry`, :func:`show`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from runtimestate.errors import (
    BackendError,
    BackendUnreachable,
    ProtocolError,
    ServerError,
    redact,
)
from runtimestate.gateway.client import ClientError, Response
from runtimestate.gateway.upstream import NDJSON, Send, StreamEnd, Usage
from runtimestate.providers import BackendRef
from runtimestate.records import ListModelResponse

if TYPE_CHECKING:
    from runtimestate.gateway.routing import ServedModel

__all__ = ["answer", "error", "relay", "request", "show", "tag_entry"]

_OPTIONS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "stop": "stop",
    "num_predict": "max_tokens",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
}
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _message(message: Any) -> dict[str, Any]:
    """One Ollama chat message as OpenAI's (tool-call arguments become JSON strings)."""
    if not isinstance(message, dict):
        return {"role": "user", "content": ""}
    out: dict[str, Any] = {
        "role": message.get("role", "user"),
        "content": message.get("content", ""),
    }
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [
            {
                "id": f"call_{index}",
                "type": "function",
                "function": {
                    "name": (call.get("function") or {}).get("name", ""),
                    "arguments": json.dumps((call.get("function") or {}).get("arguments", {})),
                },
            }
            for index, call in enumerate(calls)
            if isinstance(call, dict)
        ]
    for field in ("tool_call_id", "name"):
        if field in message:
            out[field] = message[field]
    return out


def request(
    route: str, root: str, model: str, payload: dict[str, Any], stream: bool
) -> tuple[str, bytes]:
    """The OpenAI-API URL and body for an Ollama-API request ``payload`` on ``route``."""
    if route == "/api/embed":
        raw = payload.get("input", [])
        body: dict[str, Any] = {"model": model, "input": raw}
        if isinstance(payload.get("dimensions"), int):
            body["dimensions"] = payload["dimensions"]
        return root + "/embeddings", json.dumps(body).encode()
    if route == "/api/chat":
        raw_messages = payload.get("messages") or []
        messages = [_message(m) for m in raw_messages] if isinstance(raw_messages, list) else []
    else:
        messages = []
        if isinstance(payload.get("system"), str) and payload["system"]:
            messages.append({"role": "system", "content": payload["system"]})
        messages.append({"role": "user", "content": str(payload.get("prompt") or "")})
    body = {"model": model, "messages": messages, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    options = payload.get("options")
    if isinstance(options, dict):
        for name, field in _OPTIONS.items():
            if name in options:
                body[field] = options[name]
    if isinstance(payload.get("tools"), list):
        body["tools"] = payload["tools"]
    fmt = payload.get("format")
    if fmt == "json":
        body["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "response", "schema": fmt},
        }
    return root + "/chat/completions", json.dumps(body).encode()


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    out = []
    for call in calls if isinstance(calls, list) else []:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments else {}
            except ValueError:
                arguments = {"_raw": arguments}
        out.append({"function": {"name": function.get("name", ""), "arguments": arguments}})
    return out


def _final(route: str, model: str, reason: Any, usage: Usage) -> dict[str, Any]:
    frame: dict[str, Any] = {"model": model, "created_at": _now()}
    if route == "/api/chat":
        frame["message"] = {"role": "assistant", "content": ""}
    else:
        frame["response"] = ""
    frame.update(
        done=True,
        done_reason=_DONE_REASONS.get(str(reason), "stop"),
        total_duration=0,
        prompt_eval_count=usage.prompt,
        eval_count=usage.output,
    )
    return frame


def _get(value: dict[str, Any], name: str, kind: type[Any]) -> Any:
    found = value.get(name)
    return found if isinstance(found, kind) else None


def answer(route: str, content: bytes, model: str) -> bytes:
    """An OpenAI answer (200) as the Ollama answer of ``route``."""
    try:
        value = json.loads(content)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        return json.dumps({"error": "the backend's answer is not JSON"}).encode()
    usage: dict[str, Any] = _get(value, "usage", dict) or {}
    counted = Usage(
        prompt=int(usage.get("prompt_tokens") or 0), output=int(usage.get("completion_tokens") or 0)
    )
    if route == "/api/embed":
        data: list[Any] = _get(value, "data", list) or []
        ordered = sorted((d for d in data if isinstance(d, dict)), key=lambda d: d.get("index", 0))
        return json.dumps(
            {
                "model": model,
                "embeddings": [d.get("embedding") for d in ordered],
                "prompt_eval_count": counted.prompt,
            }
        ).encode()
    choices: list[Any] = _get(value, "choices", list) or []
    choice: dict[str, Any] = choices[0] if choices and isinstance(choices[0], dict) else {}
    message: dict[str, Any] = _get(choice, "message", dict) or {}
    frame = _final(route, model, choice.get("finish_reason"), counted)
    text = message.get("content") or ""
    if route == "/api/chat":
        frame["message"] = {"role": "assistant", "content": text}
        calls = _tool_calls(message.get("tool_calls"))
        if calls:
            frame["message"]["tool_calls"] = calls
    else:
        frame["response"] = text
    return json.dumps(frame).encode()


def error(content: bytes, status: int) -> bytes:
    """An OpenAI error body as Ollama's ``{"error": "..."}``."""
    try:
        value = json.loads(content)
    except ValueError:
        value = None
    message = f"HTTP {status}"
    if isinstance(value, dict):
        inner = value.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            message = inner["message"]
        elif isinstance(inner, str):
            message = inner
    return json.dumps({"error": message}).encode()


async def relay(
    route: str,
    response: Response,
    send: Send,
    backend: BackendRef,
    *,
    upstream: str,
    headers: list[tuple[bytes, bytes]],
    on_first: Callable[[], float],
) -> StreamEnd:
    """Relay an OpenAI SSE stream as Ollama NDJSON frames; see the module docstring."""
    where = f"{backend.type} backend {backend.name!r} ({backend.base_url})"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", NDJSON.content_type), *headers],
        }
    )
    usage = Usage()
    reason: Any = None
    finished = False
    first: float | None = None
    failure: BackendError | None = None
    buffer = b""

    async def emit(frame: dict[str, Any]) -> None:
        await send(
            {
                "type": "http.response.body",
                "body": json.dumps(frame).encode() + b"\n",
                "more_body": True,
            }
        )

    try:
        while not finished:
            chunk = await response.chunk()
            if not chunk:
                break
            if first is None:
                first = on_first()
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue  # blank separators and ": ping" comments
                data = line[5:].strip()
                if data == b"[DONE]":
                    finished = True
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    inner = event["error"]
                    text = inner.get("message") if isinstance(inner, dict) else str(inner)
                    failure = ServerError(
                        f"{where}: error inside the stream: {text}", backend=backend.base_url
                    )
                    finished = True
                    break
                if isinstance(event.get("usage"), dict):
                    usage.prompt = int(event["usage"].get("prompt_tokens") or 0)
                    usage.output = int(event["usage"].get("completion_tokens") or 0)
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    calls = _tool_calls(delta.get("tool_calls"))
                    if text or calls:
                        frame: dict[str, Any] = {
                            "model": upstream,
                            "created_at": _now(),
                            "done": False,
                        }
                        if route == "/api/chat":
                            frame["message"] = {"role": "assistant", "content": text}
                            if calls:
                                frame["message"]["tool_calls"] = calls
                        else:
                            frame["response"] = text
                        await emit(frame)
                    if choice.get("finish_reason"):
                        reason = choice["finish_reason"]
    except TimeoutError:
        failure = BackendUnreachable(
            f"{where}: the stream stalled beyond the idle timeout", backend=backend.base_url
        )
    except ClientError as exc:
        failure = BackendUnreachable(
            f"{where}: the stream broke off: {redact(str(exc), backend.api_key)}",
            backend=backend.base_url,
        )
    finally:
        if finished and failure is None:
            response.release()
        else:
            response.close()
    if failure is None and reason is None and not finished:
        failure = ProtocolError(
            f"{where}: the stream ended without its terminator", backend=backend.base_url
        )
    if failure is not None:
        await emit({"error": str(failure)})
    else:
        await emit(_final(route, upstream, reason, usage))
    await send({"type": "http.response.body", "body": b"", "more_body": False})
    return StreamEnd(error=failure, usage=usage, first_chunk_at=first)


def tag_entry(name: str, details: ListModelResponse) -> dict[str, Any]:
    """A model's entry in ``/api/tags``."""
    info = details.details
    return {
        "name": name,
        "model": name,
        "modified_at": details.modified_at.isoformat(),
        "size": details.size,
        "digest": details.digest,
        "details": {
            "parent_model": info.parent_model,
            "format": info.format,
            "family": info.family,
            "families": list(info.families) if info.families else None,
            "parameter_size": info.parameter_size,
            "quantization_level": info.quantization_level,
        },
    }


def show(served: ServedModel) -> dict[str, Any]:
    """``/api/show`` for a model no Ollama backend holds, from what the snapshot knows."""
    details = served.details
    capabilities = []
    if details.can_chat or details.can_prompt:
        capabilities.append("completion")
    if details.can_embed:
        capabilities.append("embedding")
    model_info: dict[str, Any] = {"general.architecture": served.type}
    if details.context_length:
        model_info[f"{served.type}.context_length"] = details.context_length
    return {
        "modelfile": "",
        "parameters": "",
        "template": "",
        "details": tag_entry(served.name, details)["details"],
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": _now(),
    }
