"""Shared fixtures. The PostgreSQL and NATS fixtures live in their own modules under
``tests/fixtures`` and start private servers on free loopback ports (see those modules)."""

pytest_plugins = ["tests.fixtures.postgres", "tests.fixtures.nats"]
