"""``runtimestate.errors``: secrets never survive into a message, and the tree is what callers
catch by."""

from __future__ import annotations

import pytest

from runtimestate import errors
from runtimestate.errors import mask_secret, redact


@pytest.mark.parametrize(
    ("text", "secret_part"),
    [
        ("connect postgresql://fleet:s3cr3t-pw@db:5432/rs failed", "s3cr3t-pw"),
        ("GET http://admin:hunter2hunter2@node:11434/api/tags", "hunter2hunter2"),
        ("GET https://x.example/v1beta/models?key=AIzaSyA0123456789abcdef", "0123456789abcdef"),
        ("Authorization: Bearer abcdefghijklmnop1234", "abcdefghijklmnop1234"),
        ("x-goog-api-key: AIzaSomethingSecret123", "SomethingSecret123"),
        ("Incorrect API key provided: sk-proj-abcdefghijklmnop", "abcdefghijklmnop"),
    ],
)
def test_credential_shaped_tokens_are_masked(text: str, secret_part: str) -> None:
    shown = redact(text)
    assert secret_part not in shown
    assert "****" in shown


def test_urls_without_a_password_are_left_alone() -> None:
    text = "GET http://node-1:11434/api/tags and postgresql://fleet@db/rs"
    assert redact(text) == text


def test_given_secrets_are_masked_wherever_they_stand() -> None:
    assert redact("key=plainvalue99 and plainvalue99", "plainvalue99") == (
        "key=****ue99 and ****ue99"
    )


def test_mask_shows_at_most_the_last_four_of_a_long_secret() -> None:
    assert mask_secret("short") == "****"
    assert mask_secret("sk-0123456789abcd") == "****abcd"


def test_backend_errors_redact_their_message() -> None:
    error = errors.KeyRejected("GET http://u:topsecretpw@node/api rejected", backend="node")
    assert "topsecretpw" not in str(error)
    assert error.backend == "node"


def test_all_cooling_down_is_a_no_provider() -> None:
    assert issubclass(errors.AllCoolingDown, errors.NoProvider)
    assert issubclass(errors.KeyRejected, errors.BackendError)
    assert all(
        issubclass(getattr(errors, name), errors.RuntimeStateError)
        for name in errors.__all__
        if name[0].isupper()
    )
