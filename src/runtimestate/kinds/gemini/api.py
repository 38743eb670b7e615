"""The Gemini API's rules, shared by the Gemini driver and client: written once here.

* The API lives under ``/v1beta`` of the declared base URL (``https://generativelanguage.googleapis.com``);
  a base URL that already ends in ``/v1beta`` is accepted too. The SDK wants the root without
  the version (it adds ``api_version`` itself), the driver the full models URL.
* Gemini answers a bad key with **400** ``INVALID_ARGUMENT`` / ``API_KEY_INVALID`` (or the text
  "API key not valid"), not 401: :func:`rejects_key` recognises it before the status table of
  :mod:`runtimestate.status` is asked.
"""

from __future__ import annotations

from runtimestate.backends.wire import join_url

__all__ = ["VERSION", "gemini_root", "models_url", "rejects_key"]

VERSION = "v1beta"


def gemini_root(base_url: str) -> str:
    """The declared URL without a trailing ``/v1beta``: the root the SDK adds the version to."""
    return base_url.rstrip("/").removesuffix("/" + VERSION)


def models_url(base_url: str) -> str:
    """``/v1beta/models`` under ``base_url``."""
    return join_url(gemini_root(base_url) + "/" + VERSION, "/models")


def rejects_key(status: int, body: str) -> bool:
    """Whether an error answer says the key is bad, in Gemini's dialect."""
    if status in (401, 403):
        return True
    return status == 400 and ("API_KEY_INVALID" in body or "API key not valid" in body)
