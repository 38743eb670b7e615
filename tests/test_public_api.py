"""The public API is exactly ``runtimestate.__all__``: every name resolves, nothing is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

import runtimestate

SEED_NAMES = {
    "State",
    "LLMState",
    "ListModelResponse",
    "ModelDetails",
    "ProviderConfig",
    "PROVIDER_KEY_PREFIX",
    "OPENAI_KEY",
    "GEMINI_KEY",
    "local_provider_adapter",
}


def test_all_is_exactly_the_public_surface() -> None:
    assert set(runtimestate.__all__) == SEED_NAMES | {
        "BackendPlan",
        "BackendType",
        "Messenger",
        "Provider",
        "ProviderFromRuntimeState",
        "ResolveRequest",
        "Resolver",
        "Store",
        "__version__",
        "open_bus",
        "open_store",
    }
    assert len(runtimestate.__all__) == len(set(runtimestate.__all__))


@pytest.mark.parametrize("name", sorted(runtimestate.__all__))
def test_every_exported_name_resolves(name: str) -> None:
    assert getattr(runtimestate, name) is not None


def test_seed_constants() -> None:
    assert runtimestate.PROVIDER_KEY_PREFIX == "cloud-provider:"
    assert runtimestate.OPENAI_KEY == "cloud-provider:openai"
    assert runtimestate.GEMINI_KEY == "cloud-provider:gemini"


def test_unknown_attribute_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = runtimestate.no_such_name


def test_importing_the_package_does_not_load_the_sdks() -> None:
    # The CLI imports the package on every command; the SDKs cost about a second.
    code = (
        "import sys, runtimestate, runtimestate.cli; "
        "heavy = [m for m in ('ollama', 'openai', 'google.genai', 'aiohttp') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""
