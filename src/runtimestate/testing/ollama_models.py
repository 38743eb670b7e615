"""Ollama model names and the emulated models they stand for.

Ollama names are ``[host/][namespace/]model[:tag]`` and the tag defaults to ``latest``: a node
lists ``llama3`` as ``llama3:latest``. :func:`normalize_model_name` applies that rule (and drops
the default ``registry.ollama.ai/library/`` prefix, which Ollama never shows), so the inventory
is keyed exactly as ``/api/tags`` reports it.

Everything about a model the emulator invents (digest, layers, size, family, parameter size) is
derived from a SHA-256 of its name, so the same name gives the same model in every run and on
every node, as a registry would.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

__all__ = [
    "InvalidModelName",
    "OllamaLayer",
    "OllamaModel",
    "make_model",
    "normalize_model_name",
]

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(?::\d+)?$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")
_SIZE_TAG = re.compile(r"^(\d+(?:\.\d+)?)([bm])", re.IGNORECASE)
_DEFAULT_HOST = "registry.ollama.ai"
_DEFAULT_NAMESPACE = "library"


class InvalidModelName(ValueError):
    """The string is not a valid Ollama model name."""


def normalize_model_name(name: str) -> str:
    """``llama3`` -> ``llama3:latest``; raises :class:`InvalidModelName` for an invalid name."""
    if not name or name != name.strip():
        raise InvalidModelName(name)
    parts = name.split("/")
    last = parts[-1]
    base, _, tag = last.partition(":")
    if ":" in last and not _TAG.match(tag):
        raise InvalidModelName(name)
    tag = tag or "latest"
    prefix = parts[:-1]
    if len(prefix) > 2 or not _PART.match(base):
        raise InvalidModelName(name)
    if len(prefix) == 2:
        if not _HOST.match(prefix[0]) or not _PART.match(prefix[1]):
            raise InvalidModelName(name)
        if prefix[0] == _DEFAULT_HOST:
            prefix = prefix[1:]
    elif prefix and not _PART.match(prefix[0]):
        raise InvalidModelName(name)
    if prefix == [_DEFAULT_NAMESPACE]:
        prefix = []
    return "/".join([*prefix, f"{base}:{tag}"])


def namespace_of(name: str) -> str:
    """The namespace Ollama's OpenAI-style listing reports as ``owned_by``."""
    parts = name.split("/")
    return parts[-2] if len(parts) > 1 else _DEFAULT_NAMESPACE


@dataclass(frozen=True, kw_only=True, slots=True)
class OllamaLayer:
    """One blob of a model (weights, template, parameters), shared between models by digest."""

    digest: str  # bare hex
    size: int
    media_type: str


@dataclass(frozen=True, kw_only=True, slots=True)
class OllamaModel:
    """A model a node holds or can pull: what ``/api/tags`` and ``/api/show`` describe."""

    name: str
    digest: str  # bare hex, as /api/tags shows it
    size: int
    modified_at: datetime
    family: str
    parameter_size: str
    quantization_level: str
    capabilities: tuple[str, ...]
    context_length: int
    embedding_length: int
    layers: tuple[OllamaLayer, ...]
    template: str
    parameters: str

    @property
    def details(self) -> dict[str, object]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": self.quantization_level,
        }

    def tags_entry(self) -> dict[str, object]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": self.modified_at.isoformat(),
            "size": self.size,
            "digest": self.digest,
            "details": self.details,
        }


def _hex(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


def _family(base: str) -> str:
    match = re.match(r"[a-z]+", base.lower())
    return match.group(0) if match else "llama"


def _parameter_size(tag: str, seed: int) -> tuple[str, float]:
    match = _SIZE_TAG.match(tag)
    if match:
        number = float(match.group(1))
        billions = number / 1000 if match.group(2).lower() == "m" else number
    else:
        billions = round(0.5 + (seed % 140) / 10, 1)
    label = f"{billions:g}B" if billions >= 1 else f"{billions * 1000:g}M"
    return label, billions


def make_model(
    name: str,
    *,
    capabilities: Iterable[str] | None = None,
    context_length: int | None = None,
    embedding_length: int | None = None,
    family: str | None = None,
    parameter_size: str | None = None,
    quantization_level: str = "Q4_K_M",
    size: int | None = None,
    modified_at: datetime,
) -> OllamaModel:
    """The emulated model called ``name``; unspecified attributes are derived from the name."""
    full = normalize_model_name(name)
    base, _, tag = full.rsplit("/", 1)[-1].partition(":")
    seed = int(_hex(full)[:12], 16)
    embedding = "embed" in base.lower()
    caps = (
        tuple(capabilities)
        if capabilities is not None
        else (("embedding",) if embedding else ("completion",))
    )
    size_label, billions = _parameter_size(tag, seed)
    total = size if size is not None else max(int(billions * 0.6e9), 20_000_000) + seed % 997
    small = (
        ("application/vnd.ollama.image.template", 1_400 + seed % 300),
        ("application/vnd.ollama.image.license", 7_000 + seed % 900),
        ("application/vnd.ollama.image.params", 90 + seed % 60),
    )
    weights = max(total - sum(s for _, s in small), 1)
    layers = (
        OllamaLayer(
            digest=_hex(full, "weights", str(weights)),
            size=weights,
            media_type="application/vnd.ollama.image.model",
        ),
        *(OllamaLayer(digest=_hex(full, kind), size=s, media_type=kind) for kind, s in small),
    )
    return OllamaModel(
        name=full,
        digest=_hex(full, "manifest", *(layer.digest for layer in layers)),
        size=sum(layer.size for layer in layers),
        modified_at=modified_at,
        family=family or ("bert" if embedding else _family(base)),
        parameter_size=parameter_size or size_label,
        quantization_level=quantization_level,
        capabilities=caps,
        context_length=context_length or (2048 if embedding else 8192),
        embedding_length=embedding_length or (768 if embedding else 3072),
        layers=layers,
        template="" if embedding else "{{ if .System }}{{ .System }}\n{{ end }}{{ .Prompt }}",
        parameters="" if embedding else 'stop                           "<|eot_id|>"',
    )
