"""The OpenAI driver: list an account's models with its key from ``OPENAI_KEY``.

One ``GET <root>/v1/models`` with ``Authorization: Bearer``; ``base_url`` is the API root,
``/v1`` appended when absent. The listing says nothing about capabilities or context length, so
those come from the declared model; a model declared without flags is taken as an embedding
model when its id says ``embedding``, else as a chat model. A 401 (or 403) is
:class:`~runtimestate.errors.KeyRejected` with a message of our own: OpenAI's error body quotes
part of the key.
"""

from __future__ import annotations

from runtimestate.backends.base import Capabilities, CycleContext, register
from runtimestate.backends.cloud import CloudDriver, CloudModel
from runtimestate.backends.http import decode_json, status_error
from runtimestate.backends.vllm import openai_models_url, parse_models
from runtimestate.errors import KeyRejected
from runtimestate.records import OPENAI_KEY

__all__ = ["OpenAIDriver"]

_CHAT = Capabilities(can_chat=True, can_prompt=True, can_stream=True)
_EMBED = Capabilities(can_embed=True)


@register
class OpenAIDriver(CloudDriver):
    type_name = "openai"
    kv_key = OPENAI_KEY

    async def list_models(
        self, ctx: CycleContext, base_url: str, api_key: str
    ) -> tuple[CloudModel, ...]:
        url = openai_models_url(base_url)
        status, body = await ctx.http.send(
            "GET", url, headers={"Authorization": f"Bearer {api_key}"}, secrets=(api_key,)
        )
        if status in (401, 403):
            raise KeyRejected(f"API key rejected by OpenAI (HTTP {status})", backend=base_url)
        if status >= 400:
            raise status_error(status, body, url=url, secrets=(api_key,))
        served = parse_models(decode_json(body, url=url, secrets=(api_key,)), url)
        return tuple(
            CloudModel(id=s.id, capabilities=_EMBED if "embedding" in s.id else _CHAT)
            for s in served
        )
