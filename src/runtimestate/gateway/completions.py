"""OpenAI's legacy ``/v1/completions`` on a backend that only has chat completions (Gemini's
OpenAI-compatible API has no ``/completions``): the prompt sent as one user message, the answer
and every stream event turned back into ``text_completion`` shapes.

Every other request field passes through as it came (``max_tokens``, ``temperature``, ``stop``,
``stream_options``, ...); the completion-only ones that chat has no place for (``suffix``,
``echo``, ``best_of``, ``logprobs`` as a number) are dropped. The stream is rewritten event by
event on its way out - the relay still reads the backend's own bytes for the terminator and the
usage - and an event that is not a chunk with choices (``[DONE]``, an error, the usage-only
chunk) passes unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from runtimestate.gateway.upstream import Send

__all__ = ["ChunkRewriter", "answer", "request"]

_CHAT_ONLY_LACKS = ("prompt", "suffix", "echo", "best_of", "logprobs")


def request(payload: dict[str, Any], model: str) -> bytes:
    """The chat-completion body for a completion request ``payload``."""
    prompt = payload.get("prompt")
    if isinstance(prompt, list):
        prompt = "".join(str(part) for part in prompt)
    body = {k: v for k, v in payload.items() if k not in _CHAT_ONLY_LACKS}
    body["model"] = model
    body["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else ""}]
    return json.dumps(body).encode()


def _choice(choice: Any, text_of: str) -> dict[str, Any]:
    if not isinstance(choice, dict):
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": None}
    part = choice.get(text_of)
    text = part.get("content") if isinstance(part, dict) else None
    return {
        "index": choice.get("index", 0),
        "text": text if isinstance(text, str) else "",
        "logprobs": None,
        "finish_reason": choice.get("finish_reason"),
    }


def _completion(value: dict[str, Any], text_of: str) -> dict[str, Any]:
    out = {k: v for k, v in value.items() if k != "choices"}
    out["object"] = "text_completion"
    choices = value.get("choices")
    out["choices"] = [_choice(c, text_of) for c in choices] if isinstance(choices, list) else []
    return out


def answer(content: bytes) -> bytes:
    """A chat completion (200) as a ``text_completion``; a body that is not one is kept."""
    try:
        value = json.loads(content)
    except ValueError:
        return content
    if not isinstance(value, dict):
        return content
    return json.dumps(_completion(value, "message")).encode()


class ChunkRewriter:
    """A ``send`` that turns the ``chat.completion.chunk`` events passing through it into
    ``text_completion`` events; an event split across two bodies waits for its end."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._pending = b""

    def _event(self, event: bytes) -> bytes:
        if not event.startswith(b"data: {"):
            return event
        try:
            value = json.loads(event[6:])
        except ValueError:
            return event
        if not isinstance(value, dict) or "choices" not in value:
            return event
        return b"data: " + json.dumps(_completion(value, "delta")).encode()

    async def __call__(self, message: Any) -> None:
        if message.get("type") != "http.response.body":
            await self._send(message)
            return
        data = self._pending + message.get("body", b"")
        more = message.get("more_body", False)
        events = data.split(b"\n\n")
        self._pending = events.pop() if more else b""
        out = b"".join(self._event(e) + b"\n\n" for e in events if e)
        if not more and data and not data.endswith(b"\n\n"):
            out = out.removesuffix(b"\n\n")
        if out or not more:
            await self._send({"type": "http.response.body", "body": out, "more_body": more})
