"""The Gemini driver: page through an account's models with the key ``cloud-provider:gemini``.

``GET <base>/v1beta/models?pageSize=1000`` with ``x-goog-api-key``, following
``nextPageToken`` until a page has none. The listing already carries what the reconciler needs -
``inputTokenLimit`` (the context length) and ``supportedGenerationMethods`` - so, unlike the
Go runtimestate package, there is no second request per model. ``generateContent`` means chat,
prompt and stream; ``embedContent`` means embed.

Gemini answers a bad key with **400** ``API_KEY_INVALID`` (not 401; see :mod:`.api`); that, a
401 and a 403 are :class:`~runtimestate.errors.KeyRejected` with a message that never repeats
the key (the key also travels in a header, never in the URL, so it cannot leak through a logged
URL).
"""

from __future__ import annotations

from typing import Any

from runtimestate.backends.base import COMPLETION, EMBEDDING, Capabilities, CycleContext
from runtimestate.backends.cloud import CloudDriver, CloudModel
from runtimestate.backends.wire import decode_json, status_error
from runtimestate.errors import KeyRejected, ProtocolError
from runtimestate.kinds.gemini.api import models_url, rejects_key
from runtimestate.records import PROVIDER_KEY_PREFIX

__all__ = ["NAME", "GeminiDriver"]

NAME = "gemini"

# The API's largest page: the fewest requests. The server may send fewer per page, and the
# listing follows nextPageToken until it ends.
_PAGE_SIZE = 1000
# A server that keeps answering with new tokens must not keep a cycle busy forever.
_MAX_PAGES = 100


def parse_model(item: Any, url: str) -> CloudModel:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise ProtocolError(f"model entry from {url} has no name", backend=url)
    methods = item.get("supportedGenerationMethods") or []
    limit = item.get("inputTokenLimit")
    if not isinstance(methods, list):
        raise ProtocolError(f"model entry from {url} has malformed methods", backend=url)
    generates = "generateContent" in methods
    embeds = "embedContent" in methods or "batchEmbedContents" in methods
    return CloudModel(
        id=item["name"],
        capabilities=Capabilities(
            context_length=limit if isinstance(limit, int) else 0,
            flags=(COMPLETION if generates else frozenset())
            | (EMBEDDING if embeds else frozenset()),
        ),
    )


class GeminiDriver(CloudDriver):
    """The ``gemini`` kind's driver: the account's models, with their context length and
    capabilities, from the paged listing."""

    kv_key = PROVIDER_KEY_PREFIX + NAME
    key_hosts = frozenset({"generativelanguage.googleapis.com"})

    async def list_models(
        self, ctx: CycleContext, base_url: str, api_key: str
    ) -> tuple[CloudModel, ...]:
        url = models_url(base_url)
        models: list[CloudModel] = []
        token = ""
        seen: set[str] = set()
        for _ in range(_MAX_PAGES):
            params = {"pageSize": str(_PAGE_SIZE)}
            if token:
                params["pageToken"] = token
            status, body = await ctx.http.send(
                "GET", url, headers={"x-goog-api-key": api_key}, params=params, secrets=(api_key,)
            )
            if status >= 400 and rejects_key(status, body.decode("utf-8", "replace")):
                raise KeyRejected(f"API key rejected by Gemini (HTTP {status})", backend=base_url)
            if status >= 400:
                raise status_error(status, body, url=url, secrets=(api_key,))
            page = decode_json(body, url=url, secrets=(api_key,))
            if not isinstance(page, dict) or not isinstance(page.get("models", []), list):
                raise ProtocolError(f"model page from {url} has no models array", backend=url)
            models.extend(parse_model(item, url) for item in page.get("models") or [])
            token = page.get("nextPageToken") or ""
            if not token:
                return tuple(models)
            if not isinstance(token, str) or token in seen:
                raise ProtocolError(f"model paging from {url} repeats a page token", backend=url)
            seen.add(token)
        raise ProtocolError(f"model paging from {url} exceeded {_MAX_PAGES} pages", backend=url)
