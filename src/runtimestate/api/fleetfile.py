"""The fleet file: a whole declaration (backends, models, pools and their members) as one YAML
document, its JSON Schema, and the difference it makes against the store.

Why these shapes:

* **The API's own schemas validate every entry** (:class:`FleetBackend` is a ``BackendIn``, and
  so on), so a file accepts exactly what ``POST /backends`` and friends accept - one set of rules.
* **Errors name the file, the line and the field.** The document is composed with PyYAML into
  nodes first, which carry their line; the walk that turns nodes into Python values records the
  line of every path (``backends[3].baseUrl``), and each pydantic or cross-reference error is
  reported at the line of the longest path it names. Duplicate keys, which YAML itself would let
  the last one win silently, are errors too.
* **Matching is by id when the file gives one, else by name** (a model by its ``model``). An
  export carries the ids, so renaming in an exported file renames; a hand-written file without
  ids matches what is already declared by name.
* **Nothing is removed without ``prune``**: neither entities nor pool memberships the file does
  not list. With it, the store ends up holding exactly the file.
* **One transaction**: the plan is computed from reads inside the transaction that then writes it
  with the store's bulk operations, so a plan is never applied to a store that changed under it,
  and any refusal (a store ``Conflict``, a dangling reference) leaves the store as it was. A dry
  run computes the same plan in the same way and writes nothing; what it prints is what an apply
  of the same file on the same store does.
* **The network policy holds here too**: a base URL the file adds or changes must pass the
  same check as ``POST /backends`` (no denied network, nothing outside the allowed ones, not the
  service itself), reported at its line; unchanged URLs are not checked again, so re-applying a
  large file resolves nothing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic.alias_generators import to_camel
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from runtimestate import kinds
from runtimestate.api.schemas import BackendIn, Id, ModelIn, Name, PoolIn, keyed_types_only
from runtimestate.api.secrets import (
    credential_secret_names,
    named_secret_values,
    secret_credential,
)
from runtimestate.errors import InvalidInput
from runtimestate.logging import register_secret
from runtimestate.records import BACKEND_CREDENTIAL_PREFIX
from runtimestate.store.base import Store
from runtimestate.store.records import (
    Backend,
    BackendSpec,
    Model,
    ModelSpec,
    Pool,
    PoolSpec,
)

__all__ = [
    "SCHEMA_PATH",
    "Change",
    "FleetBackend",
    "FleetDocument",
    "FleetFile",
    "FleetFileError",
    "FleetModel",
    "FleetPlan",
    "FleetPool",
    "Issue",
    "apply_fleet",
    "dump_yaml",
    "export_fleet",
    "fleet_schema",
    "parse_fleet",
]

SCHEMA_PATH = Path(__file__).with_name("fleet.schema.json")
SCHEMA_ID = "https://runtimestate.dev/schemas/fleet.schema.json"
# Nodes one document may hold (aliases count each time they are expanded): 10,000 backends are
# about 50,000; the bound keeps a "billion laughs" document from exhausting memory.
MAX_NODES = 2_000_000
# Errors listed in one message; the rest are counted.
MAX_ISSUES = 10

# ``UrlPolicy.check``'s shape: the URL and the field name used in its message.
UrlCheck = Callable[[str, str], Awaitable[None]]

try:  # libyaml is an order of magnitude faster on a 10,000-backend file
    _Base: type[yaml.SafeLoader] = yaml.CSafeLoader  # type: ignore[assignment]
    _Dumper: type[yaml.SafeDumper] = yaml.CSafeDumper  # type: ignore[assignment]
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Base = yaml.SafeLoader
    _Dumper = yaml.SafeDumper

_STR_TAG = "tag:yaml.org,2002:str"


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """The safe loader with its tag resolution memoized: a fleet file repeats the same keys and
    values (``name``, ``type: ollama``) thousands of times, and resolving a plain scalar tries
    a regular expression per candidate type - the largest cost of composing a big file."""

    _resolved: dict[tuple[Any, ...], str]

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._resolved = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is not yaml.ScalarNode:
            return super().resolve(kind, value, implicit)
        key = (value, tuple(implicit) if implicit is not None else None)
        tag = self._resolved.get(key)
        if tag is None:
            tag = self._resolved[key] = super().resolve(kind, value, implicit)
        return tag


# ---- the document ------------------------------------------------------------------------
class FleetBackend(BackendIn):
    """A backend: the fields ``POST /backends`` takes but its credential - a file under
    version control is no place for a key; it names a secret instead (``apiKeySecret``)."""

    model_config = ConfigDict(json_schema_extra=keyed_types_only("apiKeySecret"))

    api_key: SkipJsonSchema[None] = Field(default=None, exclude=True)
    api_key_secret: Id | None = Field(
        default=None,
        description="The name of a secret (set with `runtimestate secrets set NAME`) that is "
        "this backend's credential. Without it, the backend's credential is left as it is.",
    )

    @field_validator("api_key", mode="before")
    @classmethod
    def _no_secret(cls, value: object) -> None:
        if value is not None:
            raise PydanticCustomError(
                "secret_in_file",
                "a fleet file holds no secrets: give the backend its apiKey with "
                "`runtimestate backend add --api-key-stdin` or PUT /backends/{id}",
            )
        return None


class FleetModel(ModelIn):
    """A model: the fields ``POST /models`` takes."""


class FleetPool(PoolIn):
    """A pool: the fields ``POST /pools`` takes, plus its members by name."""

    backends: list[Name] = Field(
        default_factory=list, description="Names of the backends in this pool."
    )
    models: list[Name] = Field(default_factory=list, description="Models (names) in this pool.")


class FleetFile(BaseModel):
    """A runtimestate fleet file: everything the API declares, but secrets (set those with
    ``runtimestate provider configure``; a cloud backend uses its provider's key)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        frozen=True,
        extra="forbid",
        title="runtimestate fleet file",
    )

    version: Literal[1] = Field(default=1, description="Version of this file format.")
    backends: list[FleetBackend] = Field(default_factory=list)
    models: list[FleetModel] = Field(default_factory=list)
    pools: list[FleetPool] = Field(default_factory=list)


def fleet_schema() -> dict[str, Any]:
    """The JSON Schema of a fleet file, as shipped in ``fleet.schema.json``."""
    schema = FleetFile.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


# ---- errors ------------------------------------------------------------------------------
Path_ = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem in a fleet file: where (line, field path) and what."""

    line: int | None
    field: str | None
    message: str

    def render(self, filename: str) -> str:
        where = filename if self.line is None else f"{filename}:{self.line}"
        return (
            f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        )


class FleetFileError(InvalidInput):
    """The file is invalid; nothing was applied. ``str()`` lists the first issues, each with the
    file, line and field."""

    def __init__(self, filename: str, issues: Sequence[Issue]) -> None:
        self.filename = filename
        self.issues = list(issues)
        shown = "; ".join(issue.render(filename) for issue in self.issues[:MAX_ISSUES])
        if len(self.issues) > MAX_ISSUES:
            shown += f" (and {len(self.issues) - MAX_ISSUES} more)"
        first = self.issues[0].field if self.issues else None
        super().__init__(shown, field=first)


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


@dataclass(slots=True)
class FleetDocument:
    """A validated fleet file with the line of every path in it."""

    fleet: FleetFile
    filename: str = "fleet"
    lines: Mapping[Path_, int] = field(default_factory=dict)

    def issue(self, path: Path_, message: str) -> Issue:
        return Issue(_line_of(self.line_map(), path), _dotted(path), message)

    def line_map(self) -> Mapping[Path_, int]:
        return self.lines


@dataclass(slots=True)
class _Lazy(FleetDocument):
    """A document read as JSON: its lines are composed on the first error that needs them."""

    text: str = ""

    def line_map(self) -> Mapping[Path_, int]:
        if not self.lines and self.text:
            self.lines = _compose(self.text, self.filename)[1]
        return self.lines


def _line_of(lines: Mapping[Path_, int], path: Path_) -> int | None:
    for end in range(len(path), -1, -1):
        line = lines.get(path[:end])
        if line is not None:
            return line
    return None


# ---- parsing -----------------------------------------------------------------------------
def parse_fleet(text: str | bytes, *, filename: str = "fleet") -> FleetDocument:
    """Parse and validate a fleet file (YAML, or JSON, which is YAML too); ``FleetFileError``
    lists every problem with its line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FleetFileError(filename, [Issue(None, None, "is not UTF-8 text")]) from exc
    data, lines = _load(text, filename)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FleetFileError(filename, [Issue(lines.get(()), None, "must be a mapping")])
    try:
        fleet = FleetFile.model_validate(data)
    except ValidationError as exc:
        if not lines:
            _, lines = _compose(text, filename)
        issues = [
            Issue(
                _line_of(lines, tuple(err["loc"])),
                _dotted(tuple(err["loc"])),
                err["msg"].removeprefix("Value error, "),
            )
            for err in exc.errors(include_url=False)
        ]
        raise FleetFileError(filename, issues) from None
    document = _Lazy(fleet=fleet, filename=filename, lines=lines, text=text)
    duplicates = list(_duplicates(document))
    if duplicates:
        raise FleetFileError(filename, duplicates)
    return document


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise _DuplicateKey
    return out


def _load(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    """The document's data, and the line of each path when it had to be composed for them.

    A JSON document (what programs send) is read by the ``json`` module, many times faster
    than any YAML parser; its lines are composed only if an error needs them. Anything else,
    or JSON that ``json`` refuses (a duplicate key, say), goes through the YAML composer."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text, object_pairs_hook=_no_duplicates), {}
        except ValueError:
            pass
    return _compose(text, filename)


def _compose(text: str, filename: str) -> tuple[Any, dict[Path_, int]]:
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else None
            problem = exc.problem or exc.context or "invalid YAML"
            raise FleetFileError(filename, [Issue(line, None, problem)]) from None
        except yaml.YAMLError as exc:
            raise FleetFileError(filename, [Issue(None, None, f"invalid YAML: {exc}")]) from None
        if root is None:
            return None, {}
        lines: dict[Path_, int] = {}
        issues: list[Issue] = []
        budget = [MAX_NODES]

        def build(node: yaml.Node, path: Path_, line: int) -> Any:
            budget[0] -= 1
            if budget[0] < 0:
                raise FleetFileError(filename, [Issue(line, None, "the document is too large")])
            lines.setdefault(path, line)
            if isinstance(node, yaml.MappingNode):
                out: dict[str, Any] = {}
                for key_node, value_node in node.value:
                    key_line = key_node.start_mark.line + 1
                    key = (
                        key_node.value
                        if key_node.tag == _STR_TAG
                        else loader.construct_object(key_node, deep=True)
                    )
                    if not isinstance(key, str):
                        issues.append(Issue(key_line, _dotted(path), f"key {key!r} is not text"))
                        continue
                    if key in out:
                        issues.append(
                            Issue(key_line, _dotted((*path, key)), "is given twice in one mapping")
                        )
                        continue
                    out[key] = build(value_node, (*path, key), key_line)
                return out
            if isinstance(node, yaml.SequenceNode):
                return [
                    build(item, (*path, index), item.start_mark.line + 1)
                    for index, item in enumerate(node.value)
                ]
            if node.tag == _STR_TAG:
                return node.value
            return loader.construct_object(node, deep=True)

        try:
            data = build(root, (), root.start_mark.line + 1)
        except yaml.YAMLError as exc:
            raise FleetFileError(filename, [Issue(None, None, f"invalid YAML: {exc}")]) from None
        if issues:
            raise FleetFileError(filename, issues)
        return data, lines
    finally:
        loader.dispose()


def _duplicates(document: FleetDocument) -> Iterable[Issue]:
    """The same name, id or base URL declared twice in one file."""
    fleet = document.fleet
    checks: list[tuple[str, list[Any], tuple[str, ...]]] = [
        ("backends", list(fleet.backends), ("name", "base_url", "id")),
        ("models", list(fleet.models), ("model", "id")),
        ("pools", list(fleet.pools), ("name", "id")),
    ]
    for section, items, keys in checks:
        for key in keys:
            seen: dict[str, int] = {}
            for index, item in enumerate(items):
                value = getattr(item, key)
                if value is None:
                    continue
                if value in seen:
                    yield document.issue(
                        (section, index, to_camel(key)),
                        f"{value!r} is already declared at {section}[{seen[value]}]",
                    )
                else:
                    seen[value] = index
    for index, pool in enumerate(fleet.pools):
        for member_kind in ("backends", "models"):
            members: list[str] = getattr(pool, member_kind)
            first: dict[str, int] = {}
            for position, member in enumerate(members):
                if member in first:
                    yield document.issue(
                        ("pools", index, member_kind, position), f"{member!r} is listed twice"
                    )
                first.setdefault(member, position)


# ---- the difference ----------------------------------------------------------------------
Action = Literal["add", "change", "remove"]
Kind = Literal["backend", "model", "pool", "pool-backend", "pool-model"]


@dataclass(frozen=True, slots=True)
class Change:
    """One difference: ``fields`` holds the declared values of an addition, ``[old, new]`` per
    changed field of a change, and nothing for a removal."""

    action: Action
    kind: Kind
    name: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "kind": self.kind, "name": self.name, "fields": self.fields}


@dataclass(slots=True)
class _Writes:
    delete_pool_backends: list[tuple[str, str]] = field(default_factory=list)
    delete_pool_models: list[tuple[str, str]] = field(default_factory=list)
    delete_pools: list[str] = field(default_factory=list)
    delete_backends: list[str] = field(default_factory=list)
    delete_models: list[str] = field(default_factory=list)
    update_backends: dict[str, BackendSpec] = field(default_factory=dict)
    update_models: dict[str, ModelSpec] = field(default_factory=dict)
    update_pools: dict[str, PoolSpec] = field(default_factory=dict)
    create_backends: list[BackendSpec] = field(default_factory=list)
    create_models: list[ModelSpec] = field(default_factory=list)
    create_pools: list[PoolSpec] = field(default_factory=list)
    # Members by name: the ids of pools and members created in this apply are known only then.
    add_pool_backends: list[tuple[str, str]] = field(default_factory=list)
    add_pool_models: list[tuple[str, str]] = field(default_factory=list)
    # (backend name, backend type, secret name): credentials copied from named secrets.
    set_credentials: list[tuple[str, str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class FleetPlan:
    """The difference between a fleet file and the store, and whether it was applied."""

    changes: list[Change]
    unchanged: int
    undeclared: int
    prune: bool
    dry_run: bool
    _writes: _Writes = field(repr=False, compare=False)

    def count(self, action: Action) -> int:
        return sum(1 for change in self.changes if change.action == action)

    @property
    def applied(self) -> bool:
        return not self.dry_run and bool(self.changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "dryRun": self.dry_run,
            "prune": self.prune,
            "applied": self.applied,
            "counts": {
                "added": self.count("add"),
                "changed": self.count("change"),
                "removed": self.count("remove"),
                "unchanged": self.unchanged,
                "undeclared": self.undeclared,
            },
            "changes": [change.to_json() for change in self.changes],
        }


@dataclass(frozen=True, slots=True)
class _Current:
    backends: list[Backend]
    models: list[Model]
    pools: list[Pool]
    pool_backends: set[tuple[str, str]]
    pool_models: set[tuple[str, str]]
    # Backend id -> the named secret its credential was copied from (None: set directly).
    credential_secrets: dict[str, str | None]
    secret_names: set[str]


async def _read(store: Store) -> _Current:
    return _Current(
        backends=await store.list_all_backends(),
        models=await store.list_all_models(),
        pools=await store.list_all_pools(),
        pool_backends=set(await store.list_pool_backends()),
        pool_models=set(await store.list_pool_models()),
        credential_secrets=await credential_secret_names(store),
        secret_names=set(await named_secret_values(store)),
    )


_BACKEND_FIELDS = (("name", "name"), ("base_url", "baseUrl"), ("type", "type"))
_MODEL_FIELDS = (
    ("model", "model"),
    ("context_length", "contextLength"),
    ("can_chat", "canChat"),
    ("can_embed", "canEmbed"),
    ("can_prompt", "canPrompt"),
    ("can_stream", "canStream"),
)
_POOL_FIELDS = (("name", "name"), ("purpose_type", "purposeType"))


def _declared(item: BaseModel, fields: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for attr, alias in fields:
        value = getattr(item, attr)
        values[alias] = value.value if hasattr(value, "value") else value
    return values


def _stored(record: object, fields: tuple[tuple[str, str], ...]) -> dict[str, Any]:
    return {alias: getattr(record, attr) for attr, alias in fields}


class _Differ:
    """Builds the plan; collects every problem before raising, so one run names them all."""

    def __init__(
        self, document: FleetDocument, current: _Current, *, prune: bool, dry_run: bool
    ) -> None:
        self.dry_run = dry_run
        self.doc = document
        self.cur = current
        self.prune = prune
        self.changes: list[Change] = []
        self.issues: list[Issue] = []
        self.writes = _Writes()
        self.unchanged = 0
        self.undeclared = 0
        self.new_urls: list[int] = []

    def _match(
        self,
        section: str,
        items: Sequence[Any],
        stored: Sequence[Any],
        key: str,
    ) -> list[Any | None]:
        """The stored record each file entry is, by id when given, else by ``key``."""
        by_id = {record.id: record for record in stored}
        by_key = {getattr(record, key): record for record in stored}
        matched: list[Any | None] = []
        for index, item in enumerate(items):
            record = None
            if item.id is not None and item.id in by_id:
                record = by_id[item.id]
            elif getattr(item, key) in by_key:
                record = by_key[getattr(item, key)]
                if item.id is not None and item.id != record.id:
                    self.issues.append(
                        self.doc.issue(
                            (section, index, "id"),
                            f"{getattr(item, key)!r} is declared with id {record.id!r}; "
                            "an id cannot change",
                        )
                    )
            matched.append(record)
        return matched

    def entities(
        self,
        kind: Kind,
        section: str,
        items: Sequence[Any],
        stored: Sequence[Any],
        key: str,
        fields: tuple[tuple[str, str], ...],
        extra: Callable[[Any, Any | None], tuple[dict[str, Any], dict[str, Any]]] | None = None,
    ) -> tuple[list[Any | None], list[Any]]:
        """``extra(item, record)`` adds fields that are not the record's own (a backend's
        secret reference): what the file declares, and what the store has for them."""
        matched = self._match(section, items, stored, key)
        kept_ids = {record.id for record in matched if record is not None}
        for item, record in zip(items, matched, strict=True):
            more, more_stored = extra(item, record) if extra is not None else ({}, {})
            declared = {**_declared(item, fields), **more}
            name = str(getattr(item, key))
            if record is None:
                self.changes.append(Change("add", kind, name, declared))
                continue
            old = {**_stored(record, fields), **more_stored}
            diff = {k: [old[k], v] for k, v in declared.items() if old[k] != v}
            if diff:
                self.changes.append(Change("change", kind, name, diff))
            else:
                self.unchanged += 1
        removed = [record for record in stored if record.id not in kept_ids]
        if self.prune:
            for record in removed:
                self.changes.append(Change("remove", kind, str(getattr(record, key))))
        else:
            self.undeclared += len(removed)
        return matched, removed if self.prune else []

    def run(self) -> FleetPlan:
        fleet, cur, writes = self.doc.fleet, self.cur, self.writes
        backends, gone_backends = self.entities(
            "backend",
            "backends",
            fleet.backends,
            cur.backends,
            "name",
            _BACKEND_FIELDS,
            extra=self._secret_reference,
        )
        models, gone_models = self.entities(
            "model", "models", fleet.models, cur.models, "model", _MODEL_FIELDS
        )
        pools, gone_pools = self.entities(
            "pool", "pools", fleet.pools, cur.pools, "name", _POOL_FIELDS
        )
        for index, (item, record) in enumerate(zip(fleet.backends, backends, strict=True)):
            self._credential(index, item, record)
            spec = BackendSpec(name=item.name, base_url=item.base_url, type=item.type.value)
            if record is None:
                writes.create_backends.append(
                    BackendSpec(name=spec.name, base_url=spec.base_url, type=spec.type, id=item.id)
                )
            elif (record.name, record.base_url, record.type) != (
                spec.name,
                spec.base_url,
                spec.type,
            ):
                writes.update_backends[record.id] = spec
        for model, stored in zip(fleet.models, models, strict=True):
            values = _declared(model, _MODEL_FIELDS)
            mspec = ModelSpec(
                model=model.model,
                context_length=model.context_length,
                can_chat=model.can_chat,
                can_embed=model.can_embed,
                can_prompt=model.can_prompt,
                can_stream=model.can_stream,
                id=model.id if stored is None else None,
            )
            if stored is None:
                writes.create_models.append(mspec)
            elif _stored(stored, _MODEL_FIELDS) != values:
                writes.update_models[stored.id] = mspec
        for pool, stored_pool in zip(fleet.pools, pools, strict=True):
            pspec = PoolSpec(name=pool.name, purpose_type=pool.purpose_type)
            if stored_pool is None:
                writes.create_pools.append(
                    PoolSpec(name=pool.name, purpose_type=pool.purpose_type, id=pool.id)
                )
            elif (stored_pool.name, stored_pool.purpose_type) != (pspec.name, pspec.purpose_type):
                writes.update_pools[stored_pool.id] = pspec
        self.new_urls = [
            index
            for index, (item, record) in enumerate(zip(fleet.backends, backends, strict=True))
            if record is None or record.base_url != item.base_url
        ]
        writes.delete_backends = [r.id for r in gone_backends]
        writes.delete_models = [r.id for r in gone_models]
        writes.delete_pools = [r.id for r in gone_pools]
        self._check_urls(backends, gone_backends)
        self._members("backend", "backends", backends, gone_backends, "name", pools)
        self._members("model", "models", models, gone_models, "model", pools)
        if self.issues:
            raise FleetFileError(self.doc.filename, self.issues)
        return FleetPlan(
            changes=self.changes,
            unchanged=self.unchanged,
            undeclared=self.undeclared,
            prune=self.prune,
            dry_run=self.dry_run,
            _writes=writes,
        )

    def _secret_reference(
        self, item: FleetBackend, record: Backend | None
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if item.api_key_secret is None:
            return {}, {}
        stored = None if record is None else self.cur.credential_secrets.get(record.id)
        return {"apiKeySecret": item.api_key_secret}, {"apiKeySecret": stored}

    def _credential(self, index: int, item: FleetBackend, record: Backend | None) -> None:
        """A backend that names a secret gets it as its credential when the name is new to
        it, or its type changed (the credential records the type)."""
        name = item.api_key_secret
        if name is None:
            return
        kind = kinds.get(item.type.value)
        if not kind.takes_credential:
            self.issues.append(
                self.doc.issue(("backends", index, "apiKeySecret"), kind.no_credential_reason())
            )
            return
        if name not in self.cur.secret_names:
            self.issues.append(
                self.doc.issue(
                    ("backends", index, "apiKeySecret"),
                    f"no secret named {name!r}: set it first with "
                    f"`runtimestate secrets set {name}` (the value is read from stdin)",
                )
            )
            return
        if (
            record is None
            or self.cur.credential_secrets.get(record.id) != name
            or record.type != item.type.value
        ):
            self.writes.set_credentials.append((item.name, item.type.value, name))

    def _check_urls(self, matched: list[Backend | None], gone: list[Backend]) -> None:
        """A base URL the file gives that another declared backend keeps: said here with its
        line, rather than as the store's Conflict after half the writes."""
        leaving = {record.id for record in gone} | {r.id for r in matched if r is not None}
        kept = {r.base_url: r for r in self.cur.backends if r.id not in leaving}
        for index, item in enumerate(self.doc.fleet.backends):
            other = kept.get(item.base_url)
            if other is not None:
                self.issues.append(
                    self.doc.issue(
                        ("backends", index, "baseUrl"),
                        f"backend {other.name!r} already has this base URL "
                        "(declare it in the file, or remove it with prune)",
                    )
                )

    def _members(
        self,
        kind: Literal["backend", "model"],
        section: str,
        matched: list[Any | None],
        gone: list[Any],
        key: str,
        pools: list[Pool | None],
    ) -> None:
        link_kind: Kind = "pool-backend" if kind == "backend" else "pool-model"
        stored_links = self.cur.pool_backends if kind == "backend" else self.cur.pool_models
        # Every member a pool may name: those in the file, and those the store keeps.
        leaving = {record.id for record in gone} | {m.id for m in matched if m is not None}
        file_names = {str(getattr(item, key)) for item in getattr(self.doc.fleet, section)}
        record_of_name: dict[str, Any] = {
            str(getattr(r, key)): r for r in getattr(self.cur, section) if r.id not in leaving
        }
        for item, record in zip(getattr(self.doc.fleet, section), matched, strict=True):
            if record is not None:
                record_of_name[str(getattr(item, key))] = record
        name_of_id = {str(r.id): str(getattr(r, key)) for r in getattr(self.cur, section)}
        pool_name_of_id = {p.id: p.name for p in self.cur.pools}
        declared: set[tuple[str, str]] = set()
        additions: list[tuple[str, str]] = []
        for index, (pool, record) in enumerate(zip(self.doc.fleet.pools, pools, strict=True)):
            for position, member in enumerate(getattr(pool, section)):
                if member not in file_names and member not in record_of_name:
                    where = "declared nowhere" if not self.prune else "not in the file"
                    self.issues.append(
                        self.doc.issue(
                            ("pools", index, section, position),
                            f"{kind} {member!r} is {where}",
                        )
                    )
                    continue
                member_record = record_of_name.get(member)
                if record is not None and member_record is not None:
                    pair = (record.id, member_record.id)
                    declared.add(pair)
                    if pair in stored_links:
                        self.unchanged += 1
                        continue
                self.changes.append(Change("add", link_kind, f"{pool.name}/{member}"))
                additions.append((pool.name, member))
        removals = sorted(stored_links - declared)
        if self.prune:
            for pool_id, member_id in removals:
                label = f"{pool_name_of_id[pool_id]}/{name_of_id[member_id]}"
                self.changes.append(Change("remove", link_kind, label))
        else:
            self.undeclared += len(removals)
        if kind == "backend":
            self.writes.add_pool_backends = additions
            self.writes.delete_pool_backends = removals if self.prune else []
        else:
            self.writes.add_pool_models = additions
            self.writes.delete_pool_models = removals if self.prune else []


async def _write(store: Store, writes: _Writes) -> None:
    await store.remove_backends_from_pools(writes.delete_pool_backends)
    await store.remove_models_from_pools(writes.delete_pool_models)
    await store.delete_pools(writes.delete_pools)
    await store.delete_backends(writes.delete_backends)
    await store.delete_models(writes.delete_models)
    await store.update_backends(writes.update_backends)
    await store.update_models(writes.update_models)
    await store.update_pools(writes.update_pools)
    await store.create_backends(writes.create_backends)
    await store.create_models(writes.create_models)
    await store.create_pools(writes.create_pools)
    if writes.set_credentials:
        backend_ids = {b.name: b.id for b in await store.list_all_backends()}
        values = await named_secret_values(store)
        for backend, kind, secret in writes.set_credentials:
            register_secret(values[secret])
            await store.set_kv(
                BACKEND_CREDENTIAL_PREFIX + backend_ids[backend],
                secret_credential(values[secret], backend_type=kind, name=secret),
            )
    if writes.add_pool_backends or writes.add_pool_models:
        pool_ids = {p.name: p.id for p in await store.list_all_pools()}
        if writes.add_pool_backends:
            backend_ids = {b.name: b.id for b in await store.list_all_backends()}
            await store.assign_backends_to_pools(
                [(pool_ids[p], backend_ids[b]) for p, b in writes.add_pool_backends]
            )
        if writes.add_pool_models:
            model_ids = {m.model: m.id for m in await store.list_all_models()}
            await store.assign_models_to_pools(
                [(pool_ids[p], model_ids[m]) for p, m in writes.add_pool_models]
            )


async def apply_fleet(
    store: Store,
    document: FleetDocument,
    *,
    prune: bool = False,
    dry_run: bool = False,
    check_url: UrlCheck | None = None,
) -> FleetPlan:
    """Compute the difference between ``document`` and the store and, unless ``dry_run``,
    apply it - all in one transaction (see the module docstring).

    ``check_url`` is where backend URLs may point (the service's network policy): every base
    URL the file adds or changes is checked, once per host, and a refused one is an issue on
    its line like any other, in a dry run too - a dry run shows what the apply would do."""
    async with store.transaction() as tx:
        differ = _Differ(document, await _read(tx), prune=prune, dry_run=dry_run)
        plan = differ.run()
        if check_url is not None:
            await _check_destinations(document, differ.new_urls, check_url)
        if not plan.applied:
            return plan
        await _write(tx, plan._writes)
    return plan


_URL_CHECKS_AT_ONCE = 32


async def _check_destinations(
    document: FleetDocument, indexes: Sequence[int], check_url: UrlCheck
) -> None:
    backends = document.fleet.backends
    by_host: dict[str, list[int]] = {}
    for index in indexes:
        # The policy looks at the host and port only: one check per distinct one.
        by_host.setdefault(urlsplit(backends[index].base_url).netloc.casefold(), []).append(index)
    gate = asyncio.Semaphore(_URL_CHECKS_AT_ONCE)

    async def refusal(index: int) -> str | None:
        async with gate:
            try:
                await check_url(backends[index].base_url, "the URL")
            except InvalidInput as exc:
                return str(exc)
            return None

    firsts = [group[0] for group in by_host.values()]
    reasons = await asyncio.gather(*(refusal(index) for index in firsts))
    issues = [
        document.issue(("backends", index, "baseUrl"), reason)
        for first, reason in zip(firsts, reasons, strict=True)
        if reason is not None
        for index in by_host[urlsplit(backends[first].base_url).netloc.casefold()]
    ]
    if issues:
        issues.sort(key=lambda issue: issue.line or 0)
        raise FleetFileError(document.filename, issues)


# ---- export ------------------------------------------------------------------------------
async def export_fleet(store: Store) -> FleetFile:
    """The store's declaration as a fleet file (with ids, so that renames in it apply)."""
    async with store.transaction() as tx:
        current = await _read(tx)
    backend_names = {b.id: b.name for b in current.backends}
    model_names = {m.id: m.model for m in current.models}
    members: dict[str, tuple[list[str], list[str]]] = {p.id: ([], []) for p in current.pools}
    for pool_id, backend_id in current.pool_backends:
        members[pool_id][0].append(backend_names[backend_id])
    for pool_id, model_id in current.pool_models:
        members[pool_id][1].append(model_names[model_id])
    return FleetFile(
        backends=[
            FleetBackend.model_validate(
                {
                    "name": b.name,
                    "baseUrl": b.base_url,
                    "type": b.type,
                    "id": b.id,
                    "apiKeySecret": current.credential_secrets.get(b.id),
                }
            )
            for b in sorted(current.backends, key=lambda b: b.name)
        ],
        models=[
            FleetModel.model_validate({**_stored(m, _MODEL_FIELDS), "id": m.id})
            for m in sorted(current.models, key=lambda m: m.model)
        ],
        pools=[
            FleetPool.model_validate(
                {
                    "name": p.name,
                    "purposeType": p.purpose_type,
                    "id": p.id,
                    "backends": sorted(members[p.id][0]),
                    "models": sorted(members[p.id][1]),
                }
            )
            for p in sorted(current.pools, key=lambda p: p.name)
        ],
    )


_HEADER = (
    "# runtimestate fleet file: apply with `runtimestate apply FILE` (see --dry-run, --prune).\n"
    f"# yaml-language-server: $schema={SCHEMA_ID}\n"
)


def dump_yaml(fleet: FleetFile) -> str:
    """``fleet`` as YAML, keys in the schema's order, ids last."""
    data = fleet.model_dump(mode="json", by_alias=True)
    for section in ("backends", "models", "pools"):
        data[section] = [
            {k: v for k, v in {**item, "id": item.get("id")}.items() if v is not None}
            for item in data[section]
        ]
    body = yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    return _HEADER + body


def load_shipped_schema() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return result


def write_schema() -> None:
    """Regenerate the shipped ``fleet.schema.json`` from the models (after changing them)."""
    text = json.dumps(fleet_schema(), indent=2, sort_keys=True) + "\n"
    SCHEMA_PATH.write_text(text, encoding="utf-8")
