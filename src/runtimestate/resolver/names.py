"""Model-name normalization, so that ``llama3.1`` finds ``meta-llama/Llama-3.1-8B-Instruct``.

The same model is spelled differently by every backend type: Ollama adds tags and quantization
(``llama3.1:8b-instruct-q4_K_M``), vLLM serves Hugging Face ids with an organisation prefix
(``meta-llama/Llama-3.1-8B-Instruct``), Gemini prefixes ``models/``. Like the Go package's
``NormalizeModelName``, matching ignores case, separators, the organisation prefix,
quantization suffixes and the ``latest`` tag. Two keys come out of a name:

* :func:`normalize_model_name` - the whole name without those decorations
  (``llama3.1:8b-instruct-q4_K_M`` -> ``llama318binstruct``);
* :func:`model_family` - the same without the tag (``llama3.1:8b`` -> ``llama31``), so a request
  for ``llama3.1`` can match any size when nothing more precise exists.

The resolver tries, for each preferred name in order: the exact name, then the normalized key,
then the family key; the first tier with a usable candidate wins, so a precise request is never
answered by a looser match when the precise one is available.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["model_family", "name_keys", "normalize_model_name"]

# Quantization and weight-format decorations, as a trailing segment after a separator.
_QUANT = re.compile(
    r"[-_.:](?:i?q\d(?:_[0-9a-z]+)*|f16|fp16|bf16|f32|fp32|fp8|int4|int8|w4a16|w8a8|"
    r"awq|gptq|gguf|ggml|exl2|mlx|4bit|8bit)$"
)
_SEPARATORS = re.compile(r"[\s\-_.:/]+")


def _strip(name: str) -> tuple[str, str]:
    """Split a lower-cased, prefix-free name into (model, tag) with quantization removed."""
    name = name.strip().lower()
    name = name.rsplit("/", 1)[-1]
    model, _, tag = name.partition(":")
    while True:
        stripped = _QUANT.sub("", model)
        if stripped == model:
            break
        model = stripped
    if tag:
        # A tag that is only a quantization (``:q8_0``) says nothing about the model.
        tag = _QUANT.sub("", ":" + tag).lstrip(":")
        while True:
            stripped = _QUANT.sub("", tag)
            if stripped == tag:
                break
            tag = stripped
    if tag == "latest":
        tag = ""
    return model, tag


@lru_cache(maxsize=65536)
def name_keys(name: str) -> tuple[str, str]:
    """Both keys of ``name`` at once, ``(normalized, family)``: the resolver's index needs both
    for every provider, and stripping the name once halves the cost of building it."""
    model, tag = _strip(name)
    family = _SEPARATORS.sub("", model)
    return (_SEPARATORS.sub("", model + tag) if tag else family), family


def normalize_model_name(name: str) -> str:
    """The comparison key of ``name``: no case, separators, org prefix, quantization, ``latest``."""
    return name_keys(name)[0]


def model_family(name: str) -> str:
    """The comparison key of ``name`` without its tag (``llama3.1:8b`` -> ``llama31``)."""
    return name_keys(name)[1]
