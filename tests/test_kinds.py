"""The kinds registry: one descriptor per backend kind, and nothing else that lists kinds.

The structural tests read the source of the package (no git): a kind's name may appear in its
own module and in the registry, and no module outside :mod:`runtimestate.kinds` may hold a list
of kinds (a tuple, list, set or dict literal, or an enum, with two or more kind names) - that is
how the old code needed six to nine edits per new type.
"""

from __future__ import annotations

import ast
import pkgutil
from enum import Enum
from pathlib import Path

import pytest

import runtimestate
from runtimestate import kinds
from runtimestate.api.providers import ProviderType
from runtimestate.backends import Driver
from runtimestate.cli.fleet import CLOUD_PROVIDERS
from runtimestate.errors import Unsupported
from runtimestate.kinds import BackendType, KeySource
from runtimestate.providers import ModelClient

PACKAGE = Path(runtimestate.__file__).parent
KINDS_DIR = PACKAGE / "kinds"
NAMES = frozenset(kinds.names())


def sources() -> dict[Path, str]:
    return {path: path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}


def test_each_kind_is_registered_once_with_a_driver_and_a_client() -> None:
    assert len(NAMES) == len(kinds.KINDS)
    for kind in kinds.KINDS:
        assert kinds.get(kind.name) is kind
        assert issubclass(kind.driver, Driver)
        assert issubclass(kind.client_class(), ModelClient)
        assert kind.api_root("http://h/").startswith("http://h")
    with pytest.raises(Unsupported, match="unknown backend type 'nope'"):
        kinds.get("nope")


def test_every_kind_module_is_registered() -> None:
    # A kind's module (or package) defines KIND; forgetting its registry line is caught here.
    modules = {
        info.name
        for info in pkgutil.iter_modules([str(KINDS_DIR)])
        if "KIND = Kind("
        in (
            (KINDS_DIR / info.name / "__init__.py")
            if info.ispkg
            else (KINDS_DIR / f"{info.name}.py")
        ).read_text()
    }
    registered = {kind.driver.__module__.split(".")[2] for kind in kinds.KINDS}
    assert modules == registered


def test_choices_everywhere_come_from_the_registry() -> None:
    assert [t.value for t in BackendType] == list(kinds.names())
    assert BackendType("openai-compatible") is BackendType.OPENAI_COMPATIBLE  # type: ignore[attr-defined]
    cloud = [k.name for k in kinds.KINDS if k.key_source is KeySource.CLOUD_PROVIDER]
    assert [t.value for t in ProviderType] == cloud
    assert list(CLOUD_PROVIDERS) == cloud
    assert kinds.get("openai").provider_key == runtimestate.OPENAI_KEY
    assert kinds.get("gemini").provider_key == runtimestate.GEMINI_KEY


def code_of(text: str) -> str:
    """The source without its comments and docstrings: what the program does with a name."""
    tree = ast.parse(text)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            body[0] = ast.Pass()
    return ast.unparse(tree)


def test_the_openai_compatible_kind_touched_its_module_and_the_registry_only() -> None:
    spellings = ("openai-compatible", "openai_compatible")
    # The emulators (runtimestate.testing) model servers, not kinds: an emulated server for the
    # new kind's tests is test equipment, like the tests themselves.
    touched = {
        path.relative_to(PACKAGE).as_posix()
        for path, text in sources().items()
        if PACKAGE / "testing" not in path.parents and any(s in code_of(text) for s in spellings)
    }
    assert touched == {"kinds/openai_compatible.py", "kinds/__init__.py"}
    registry_lines = [
        line
        for line in (KINDS_DIR / "__init__.py").read_text().splitlines()
        if "openai_compatible" in line
    ]
    # Its import and its line in KINDS.
    assert len(registry_lines) == 2


def _kind_names_in(node: ast.AST) -> set[str]:
    return {
        item.value
        for item in ast.walk(node)
        if isinstance(item, ast.Constant) and isinstance(item.value, str) and item.value in NAMES
    }


def hard_coded_kind_lists(tree: ast.AST) -> list[str]:
    """Where ``tree`` lists two or more kind names in one literal or one enum."""
    found = []
    for node in ast.walk(tree):
        literal = isinstance(node, ast.Tuple | ast.List | ast.Set | ast.Dict)
        enum = isinstance(node, ast.ClassDef) and any(
            isinstance(b, ast.Name) and b.id.endswith("Enum") for b in node.bases
        )
        if literal or enum:
            names = _kind_names_in(node)
        else:
            continue
        if len(names) >= 2:
            found.append(f"line {getattr(node, 'lineno', '?')}: {sorted(names)}")
    return found


def test_no_module_outside_the_registry_lists_kinds() -> None:
    offenders = {
        path.relative_to(PACKAGE).as_posix(): found
        for path, text in sources().items()
        if KINDS_DIR not in path.parents and (found := hard_coded_kind_lists(ast.parse(text)))
    }
    assert offenders == {}


def test_the_list_check_finds_a_hard_coded_list() -> None:
    # The check above must be able to fail: the shapes the old code used are found.
    for source in (
        'CLOUD_PROVIDERS = ("openai", "gemini")',
        'class T(StrEnum):\n    A = "ollama"\n    B = "vllm"',
        'CLIENTS = {"ollama": 1, "openai-compatible": 2}',
        'if kind in ["vllm", "openai"]: pass',
    ):
        assert hard_coded_kind_lists(ast.parse(source)) != [], source


def test_enums_derived_from_the_registry_are_enums() -> None:
    assert issubclass(BackendType, Enum)
    assert issubclass(ProviderType, Enum)


def test_a_status_quirk_belongs_to_its_kind() -> None:
    # Gemini answers a bad key with 400 API_KEY_INVALID; no other kind reads a 400 that way.
    body = '{"error": {"code": 400, "status": "INVALID_ARGUMENT", "details": ["API_KEY_INVALID"]}}'
    quirky = [kind.name for kind in kinds.KINDS if kind.key_rejected(400, body)]
    assert quirky == ["gemini"]
    assert not kinds.get("gemini").key_rejected(400, '{"error": "bad field"}')
    assert kinds.get("gemini").api_root("https://g.example/v1beta/") == "https://g.example"
    assert kinds.get("vllm").api_root("http://node:8000") == "http://node:8000/v1"
    assert kinds.get("openai").api_root("https://api.example/v1") == "https://api.example/v1"
