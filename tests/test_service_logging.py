"""The service's log output: JSON lines or text, and no secret in either."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from runtimestate.logging import MIN_SECRET_LENGTH, configure_logging, register_secret
from runtimestate.settings import LogFormat

SECRET = "registered-secret-value-42"


@pytest.fixture
def output() -> Iterator[tuple[io.StringIO, logging.Logger]]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    yield stream, logging.getLogger("runtimestate.test")
    for handler in [h for h in root.handlers if h.get_name() == "runtimestate"]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_json_lines_carry_message_level_extras_and_traceback(
    output: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = output
    configure_logging(format=LogFormat.JSON, level="info", stream=stream)
    log.info("cycle took %.1f s", 1.25, extra={"backend": "node-1"})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("cycle failed")
    log.debug("not shown")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == "cycle took 1.2 s"
    assert (first["level"], first["logger"], first["backend"]) == (
        "INFO",
        "runtimestate.test",
        "node-1",
    )
    assert first["time"].endswith("+00:00")
    assert second["level"] == "ERROR"
    assert "ValueError: boom" in second["exception"]


def test_text_lines(output: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = output
    configure_logging(format=LogFormat.TEXT, level="WARNING", stream=stream)
    log.info("quiet")
    log.warning("backend %s is slow", "node-1")
    (line,) = stream.getvalue().splitlines()
    assert line.endswith("WARN  runtimestate.test: backend node-1 is slow") or line.endswith(
        "WARNING runtimestate.test: backend node-1 is slow"
    )
    assert line[:4].isdigit()
    assert "Z " in line


def test_text_lines_carry_their_extra_fields(output: tuple[io.StringIO, logging.Logger]) -> None:
    stream, log = output
    configure_logging(format=LogFormat.TEXT, level="INFO", stream=stream)
    log.info("model deleted", extra={"backend_id": "b-1", "model": "llama3:latest"})
    log.info("backend failed", extra={"backend_id": "b-2", "error": "HTTP 500: model is busy"})
    first, second = stream.getvalue().splitlines()
    assert first.endswith("runtimestate.test: model deleted backend_id=b-1 model=llama3:latest")
    assert second.endswith('backend failed backend_id=b-2 error="HTTP 500: model is busy"')


@pytest.mark.parametrize("log_format", list(LogFormat))
def test_secrets_are_masked_in_messages_arguments_extras_and_tracebacks(
    output: tuple[io.StringIO, logging.Logger], log_format: LogFormat
) -> None:
    stream, log = output
    configure_logging(format=log_format, level="DEBUG", stream=stream)
    register_secret(SECRET)
    log.info("token is %s", SECRET)
    log.info("calling https://x.example/v1?key=AIzaSyA0123456789abcdef", extra={"k": SECRET})
    log.info("header Authorization: Bearer abcdefghijklmnop1234")
    try:
        raise RuntimeError(f"refused key sk-proj-{SECRET}")
    except RuntimeError:
        log.exception("request failed")
    text = stream.getvalue()
    assert SECRET not in text
    assert "AIzaSyA0123456789abcdef" not in text
    assert "abcdefghijklmnop1234" not in text
    assert text.count("****") >= 4
    assert "request failed" in text
    assert "RuntimeError" in text


def test_configuring_twice_does_not_duplicate_lines(
    output: tuple[io.StringIO, logging.Logger],
) -> None:
    stream, log = output
    configure_logging(format=LogFormat.TEXT, stream=stream)
    configure_logging(format=LogFormat.TEXT, stream=stream)
    log.warning("once")
    assert stream.getvalue().count("once") == 1


def test_a_string_too_short_to_be_a_key_is_not_masked_everywhere(
    output: tuple[io.StringIO, logging.Logger],
) -> None:
    # Registering "n" once must not turn every later "runtimestate" into "ru****timestate".
    stream, log = output
    configure_logging(format=LogFormat.TEXT, level="INFO", stream=stream)
    register_secret("n")
    register_secret("x" * (MIN_SECRET_LENGTH - 1))
    log.info("runtimestate stopped")
    assert stream.getvalue().rstrip().endswith("runtimestate.test: runtimestate stopped")
