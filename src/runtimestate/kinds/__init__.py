"""The registry of backend kinds: the one place that lists them.

Every kind is one module (or package) of this package defining a :class:`~.base.Kind` named
``KIND``: its driver, its model client, its API root, its key, whether it pulls and deletes, how
its server refuses a key. :data:`KINDS` below lists them, one line each. Everything else that
depends on the set of kinds - :data:`BackendType`, the API's and the CLI's choices, the cloud
key entries, the client a backend is called with, the adapter's and resolver's known types -
asks this module, so adding a kind is adding its module and one line here.

The kind modules import nothing heavy (no SDK, no aiohttp): the CLI reads the registry on every
command. A kind's model client is imported the first time one of its models is called.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType

from runtimestate.errors import Unsupported
from runtimestate.kinds import gemini, ollama, openai, openai_compatible, vllm
from runtimestate.kinds.base import ClassRef, HoldsModel, KeySource, Kind, PullStream

__all__ = [
    "KINDS",
    "BackendType",
    "ClassRef",
    "HoldsModel",
    "KeySource",
    "Kind",
    "PullStream",
    "cloud_kinds",
    "get",
    "names",
    "pull_check",
    "pull_stream",
]

KINDS: tuple[Kind, ...] = (
    ollama.KIND,
    vllm.KIND,
    openai.KIND,
    gemini.KIND,
    openai_compatible.KIND,
)

_BY_NAME = MappingProxyType({kind.name: kind for kind in KINDS})
if len(_BY_NAME) != len(KINDS):
    raise RuntimeError("two backend kinds share a name")


def _member(name: str) -> str:
    return name.upper().replace("-", "_")


BackendType = StrEnum(  # type: ignore[misc]
    "BackendType", [(_member(kind.name), kind.name) for kind in KINDS], module=__name__
)
BackendType.__doc__ = """The backend types, one member per registered kind
(``BackendType.OPENAI_COMPATIBLE`` is ``"openai-compatible"``). The store keeps a backend's type
as free text, so a row written by another tool with an unknown type is reported on its backend,
not rejected."""


def names() -> tuple[str, ...]:
    """Every kind's name, in registry order."""
    return tuple(_BY_NAME)


def get(name: str) -> Kind:
    """The kind called ``name``; :class:`~runtimestate.errors.Unsupported` if there is none."""
    kind = _BY_NAME.get(name)
    if kind is None:
        raise Unsupported(f"unknown backend type {name!r}; known: {', '.join(_BY_NAME)}")
    return kind


def cloud_kinds() -> tuple[Kind, ...]:
    """The kinds with one key per kind (configured through ``/providers``)."""
    return tuple(kind for kind in KINDS if kind.cloud)


def _puller() -> Kind | None:
    """The kind whose backends models are pulled onto.

    The download queue is keyed by a backend's base URL and does not record its kind, so at
    most one kind may pull; a second one would need its kind in the job.
    """
    pullers = [kind for kind in KINDS if kind.pull is not None]
    if len(pullers) > 1:
        raise RuntimeError(
            "more than one backend kind pulls models: " + ", ".join(k.name for k in pullers)
        )
    return pullers[0] if pullers else None


def pull_stream() -> PullStream | None:
    """The pull stream of the kind that pulls (see :func:`_puller`)."""
    kind = _puller()
    return None if kind is None else kind.pull


def pull_check() -> HoldsModel | None:
    """How the kind that pulls tells whether a backend already holds a model; ``None`` if it
    cannot tell."""
    kind = _puller()
    return None if kind is None else kind.holds
