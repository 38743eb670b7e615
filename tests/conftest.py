"""Shared fixtures. They live in modules under ``tests/fixtures``: PostgreSQL and NATS start
private servers on free loopback ports; ``common`` has the emulator and the in-process bus."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from runtimestate import logging as rs_logging

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.nats", "tests.fixtures.common"]


@pytest.fixture(autouse=True)
def _isolated_log_secrets() -> Iterator[None]:
    # Secrets registered for log masking live for the whole process, as they should in the
    # service; between tests they would make one test's output depend on which ran before it.
    saved = set(rs_logging._secrets)
    yield
    with rs_logging._secrets_lock:
        rs_logging._secrets.clear()
        rs_logging._secrets.update(saved)
