"""What an id, a name and a model name may be, checked the same way by the API and the store.

Every layer that accepts one of these from outside (the HTTP schemas, the store, the CLI) calls
the checks here, so a value refused by one is refused by all and a row the store holds can
always be named again in a URL:

* **ids** are ``[A-Za-z0-9._-]{1,128}`` and never ``.`` or ``..`` alone: an id is a path
  segment (``/backends/{id}``), a key-value suffix (``backend-credential:<id>``) and a log
  field, and ``a/b``, ``?x#y`` or ``..`` would break each of them;
* **names** of backends and pools (and a pool's purpose) are printable text of at most
  :data:`MAX_NAME_LENGTH` characters, trimmed, without control characters;
* **model names** follow one grammar that covers every backend type: Ollama's
  ``[host[:port]/][namespace/]name[:tag]``, Hugging Face's ``org/name`` (vLLM and self-hosted
  OpenAI-compatible servers) and the cloud providers' ids (``gpt-4o``, ``models/gemini-pro``,
  ``ft:gpt-4o-mini:org:suffix:id``). Never ``|`` (an internal separator), a ``..`` segment,
  whitespace or a control character. A model is declared once for the whole fleet, not per
  backend, so the grammar is the union of the backend types' grammars, not one of them.

:func:`model_key` is the normalized name two declarations are compared by: ``llama3``,
``llama3:latest``, ``Llama3:LATEST`` and ``registry.ollama.ai/library/llama3`` are one model,
as Ollama itself treats them, and ``models/gemini-pro`` is ``gemini-pro`` as Gemini treats it.
The store keeps it in a column with a unique index, so the rule holds under concurrent creates.

The regular expressions are ECMAScript-compatible because they are published in the OpenAPI
schema as well.
"""

from __future__ import annotations

import functools
import re

from runtimestate.errors import InvalidInput

__all__ = [
    "ID_PATTERN",
    "MAX_ID_LENGTH",
    "MAX_MODEL_NAME_LENGTH",
    "MAX_NAME_LENGTH",
    "MODEL_NAME_PATTERN",
    "NAME_PATTERN",
    "check_id",
    "check_model_name",
    "check_name",
    "model_key",
]

MAX_ID_LENGTH = 128
MAX_NAME_LENGTH = 256
MAX_MODEL_NAME_LENGTH = 256

# Every id but "." and "..", said without a lookahead (which JSON Schema tools and pydantic's
# regex engine do not support): a first character that is not a dot, or one or two dots
# followed by more.
ID_PATTERN = (
    r"^(?:[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,127}|\.[A-Za-z0-9_\-][A-Za-z0-9._\-]{0,126}"
    r"|\.\.[A-Za-z0-9._\-]{1,126})$"
)

# What a name may not contain anywhere: C0 and C1 control characters, DEL, line and paragraph
# separators, invisible format characters (zero-width spaces and joiners, the bidirectional
# overrides that make a name display as another, the byte-order mark) and noncharacters. Lone
# surrogates are refused by check_name itself: a surrogate range is a pattern some JSON Schema
# validators cannot compile, and then they ignore the whole pattern.
_FORBIDDEN = r"\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff0-\uffff"
# Printable text with some character that is not whitespace.
NAME_PATTERN = rf"^[^{_FORBIDDEN}]*[^\s{_FORBIDDEN}][^{_FORBIDDEN}]*$"

# A segment starts with a letter, digit or underscore and never holds two dots in a row (said
# without a lookahead, for the same reason as ids).
_SEGMENT = r"[A-Za-z0-9_][A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]+)*\.?"
_PORT = r"(?::[0-9]{1,5})?"
_TAG = r"(?::[A-Za-z0-9_][A-Za-z0-9_:\-]*(?:\.[A-Za-z0-9_:\-]+)*\.?)?"
MODEL_NAME_PATTERN = rf"^(?:{_SEGMENT}{_PORT}/)?(?:{_SEGMENT}/)?{_SEGMENT}{_TAG}$"

_ID = re.compile(ID_PATTERN)
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
_NAME = re.compile(NAME_PATTERN)


def _require_string(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}", field=field)
    return value


def check_id(value: object, field: str = "id") -> str:
    """``value`` if it is a valid id, else ``InvalidInput`` naming ``field``."""
    text = _require_string(value, field)
    if _ID.fullmatch(text) is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidInput(
            f"{field} {shown!r} is not a valid id: use 1 to {MAX_ID_LENGTH} letters, digits, "
            "'.', '_' or '-' (and not '.' or '..' alone)",
            field=field,
        )
    return text


def check_name(value: object, field: str = "name") -> str:
    """``value`` trimmed, if it is a valid backend or pool name, else ``InvalidInput``."""
    text = _require_string(value, field).strip()
    if not text:
        raise InvalidInput(f"{field} must not be empty", field=field)
    if len(text) > MAX_NAME_LENGTH:
        raise InvalidInput(
            f"{field} is {len(text)} characters long; at most {MAX_NAME_LENGTH} are allowed",
            field=field,
        )
    if _NAME.fullmatch(text) is None or any(0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise InvalidInput(
            f"{field} must be printable text without control characters", field=field
        )
    return text


def check_model_name(value: object, field: str = "model") -> str:
    """``value`` trimmed, if it is a valid model name, else ``InvalidInput``."""
    text = _require_string(value, field).strip()
    if not text:
        raise InvalidInput(f"{field} must not be empty", field=field)
    if len(text) > MAX_MODEL_NAME_LENGTH:
        raise InvalidInput(
            f"{field} is {len(text)} characters long; at most {MAX_MODEL_NAME_LENGTH} are allowed",
            field=field,
        )
    if _MODEL_NAME.fullmatch(text) is None:
        shown = text if len(text) <= 40 else text[:40] + "..."
        raise InvalidInput(
            f"{field} {shown!r} is not a model name: use [host/][namespace/]name[:tag] "
            "(Ollama), org/name (Hugging Face) or the provider's model id, made of letters, "
            "digits, '_', '.', '-' (no '..', no spaces)",
            field=field,
        )
    return text


_DEFAULT_HOST = "registry.ollama.ai/"
_DEFAULT_NAMESPACE = "library/"
_GEMINI_PREFIX = "models/"


@functools.lru_cache(maxsize=65536)
def model_key(name: str) -> str:
    """The normalized name two model declarations are compared by (see the module text)."""
    key = name.strip().casefold()
    if key.startswith(_GEMINI_PREFIX):
        key = key[len(_GEMINI_PREFIX) :]
    if key.startswith(_DEFAULT_HOST):
        key = key[len(_DEFAULT_HOST) :]
    if key.startswith(_DEFAULT_NAMESPACE):
        key = key[len(_DEFAULT_NAMESPACE) :]
    # A colon before the last slash belongs to a host's port, not to a tag.
    if ":" not in key.rsplit("/", 1)[-1]:
        key += ":latest"
    return key
