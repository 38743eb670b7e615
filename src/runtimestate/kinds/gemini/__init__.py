"""The Gemini kind: a Google AI Studio account, one key for the kind.

The driver (:mod:`.driver`) pages through the account's models; the model client
(:mod:`.client`, loaded on first use) calls them through ``google-genai``. Both follow the API's
rules in :mod:`.api` - the ``/v1beta`` root and the bad key answered as 400.
"""

from __future__ import annotations

from runtimestate.kinds.base import ClassRef, KeySource, Kind
from runtimestate.kinds.gemini.api import gemini_root, rejects_key
from runtimestate.kinds.gemini.driver import NAME, GeminiDriver

__all__ = ["GEMINI_KEY", "KIND"]

KIND = Kind(
    name=NAME,
    title="Gemini",
    driver=GeminiDriver,
    client=ClassRef("runtimestate.kinds.gemini.client:GeminiClient"),
    api_root=gemini_root,
    key_source=KeySource.CLOUD_PROVIDER,
    rejects_key=rejects_key,
)

GEMINI_KEY = KIND.provider_key
"""The key-value entry of the Gemini key (``cloud-provider:gemini``)."""
