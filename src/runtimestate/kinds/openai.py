"""The OpenAI kind: list an account's models with its key from ``cloud-provider:openai``.

One ``GET <root>/v1/models`` with ``Authorization: Bearer``; the API root follows the shared
``/v1`` rule (:mod:`runtimestate.kinds.openai_api`). The listing says nothing about capabilities
or context length, so those come from the declared model; a model declared without flags is
taken as an embedding model when its id says ``embedding``, else as a chat model. A refused key
(see :mod:`runtimestate.status`) is :class:`~runtimestate.errors.KeyRejected` with a message of
our own: OpenAI's error body quotes part of the key. The listing is cached for 24 h
(:mod:`runtimestate.backends.cloud`): an account's models change rarely, and the API is
rate-limited. A self-hosted OpenAI-compatible server is the ``openai-compatible`` kind, observed
on every cycle.
"""

from __future__ import annotations

from runtimestate.backends.base import COMPLETION, EMBEDDING, Capabilities, CycleContext
from runtimestate.backends.cloud import CloudDriver, CloudModel
from runtimestate.backends.wire import decode_json, status_error
from runtimestate.errors import KeyRejected
from runtimestate.kinds.base import ClassRef, KeySource, Kind
from runtimestate.kinds.openai_api import models_url, openai_root, parse_models
from runtimestate.records import PROVIDER_KEY_PREFIX
from runtimestate.status import status_error_class

__all__ = ["KIND", "OPENAI_KEY", "OpenAIDriver"]

_NAME = "openai"
_CHAT = Capabilities(flags=COMPLETION)
_EMBED = Capabilities(flags=EMBEDDING)


class OpenAIDriver(CloudDriver):
    """The ``openai`` kind's driver: the account's models from ``/v1/models`` with the provider key,
    which say nothing of capabilities (those come from the declaration, else from the id)."""

    kv_key = PROVIDER_KEY_PREFIX + _NAME
    key_hosts = frozenset({"api.openai.com"})

    async def list_models(
        self, ctx: CycleContext, base_url: str, api_key: str
    ) -> tuple[CloudModel, ...]:
        url = models_url(base_url)
        status, body = await ctx.http.send(
            "GET", url, headers={"Authorization": f"Bearer {api_key}"}, secrets=(api_key,)
        )
        if status >= 400 and status_error_class(status) is KeyRejected:
            raise KeyRejected(f"API key rejected by OpenAI (HTTP {status})", backend=base_url)
        if status >= 400:
            raise status_error(status, body, url=url, secrets=(api_key,))
        served = parse_models(decode_json(body, url=url, secrets=(api_key,)), url)
        return tuple(
            CloudModel(id=s.id, capabilities=_EMBED if "embedding" in s.id else _CHAT)
            for s in served
        )


KIND = Kind(
    name=_NAME,
    title="OpenAI",
    driver=OpenAIDriver,
    client=ClassRef("runtimestate.kinds.openai_client:OpenAIClient"),
    api_root=openai_root,
    key_source=KeySource.CLOUD_PROVIDER,
)

OPENAI_KEY = KIND.provider_key
"""The key-value entry of the OpenAI key (``cloud-provider:openai``)."""
