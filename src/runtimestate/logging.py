"""Log output for the service: JSON lines for machines or one readable line for people, and a
filter that keeps secrets out of both.

Library modules only call ``logging.getLogger(__name__)``; this module is the one place that
decides how records are written, and only the service (or a CLI command) calls
:func:`configure_logging`. uvicorn is started with ``log_config=None`` so that its loggers
propagate here and get the same format and the same redaction.

Redaction happens in a :class:`logging.Filter` on the handler, not in the formatters, so that it
covers every formatter and every record that reaches the handler, whichever library logged it.
The filter renders the message (``msg % args``) and the traceback, passes both through
:func:`runtimestate.errors.redact` (which masks credential-shaped tokens) together with every
secret registered through :func:`register_secret` (the bearer token, provider keys), and puts the
result back on the record. A secret is therefore masked even inside an exception message that some
third-party library built from a URL or a header.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from datetime import UTC, datetime
from enum import StrEnum
from typing import TextIO

from runtimestate.errors import redact

__all__ = [
    "MIN_SECRET_LENGTH",
    "JSONFormatter",
    "LogFormat",
    "SecretFilter",
    "TextFormatter",
    "configure_logging",
    "register_secret",
]


class LogFormat(StrEnum):
    """How log records are written: one JSON object per line, or a line for humans. Defined
    here, not with the settings: logging is set up from settings, and must not depend on them."""

    JSON = "json"
    TEXT = "text"


_secrets: set[str] = set()
_secrets_lock = threading.Lock()

# The attributes every LogRecord has; anything else on a record came from ``extra=`` and is
# written as a field of its own in JSON output.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime"}
)


# The API refuses shorter provider keys and generates 43-character tokens, so nothing shorter is
# a credential of ours; masking a two-letter string would shred every log line that contains it.
MIN_SECRET_LENGTH = 8


def register_secret(secret: str | None) -> None:
    """Mask ``secret`` in every log record from now on (values under 8 characters are ignored)."""
    if secret and len(secret) >= MIN_SECRET_LENGTH:
        with _secrets_lock:
            _secrets.add(secret)


def _redact(text: str) -> str:
    with _secrets_lock:
        known = tuple(_secrets)
    return redact(text, *known)


class SecretFilter(logging.Filter):
    """Rewrites each record with its message and traceback redacted; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = _redact(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _redact(record.exc_text)
        # The traceback now lives in exc_text; formatters must not render the raw one again.
        record.exc_info = None
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, _redact(value))
        return True


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, traceback."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """``2026-01-01T00:00:00.000Z INFO  runtimestate.state: download queued backend_id=b1``.

    Library modules put what a line is about in ``extra=`` (backend id, model, URL) and keep the
    message constant, so that JSON lines can be filtered by field; for people those fields follow
    the message as ``key=value`` pairs, or ``model deleted`` would not say which model.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = [
            f"{key}={_text_value(value)}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and key not in _TEXT_HIDDEN and not key.startswith("_")
        ]
        return " ".join([line, *fields]) if fields else line

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


# uvicorn repeats its message with ANSI colours in this field; the line already has it.
_TEXT_HIDDEN = frozenset({"color_message"})


def _text_value(value: object) -> str:
    text = str(value)
    # Quote values a reader could not otherwise tell apart from the next pair.
    return json.dumps(text) if not text or any(c in text for c in ' ="\n') else text


def configure_logging(
    *, format: LogFormat = LogFormat.TEXT, level: str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send every log record to ``stream`` (stderr) in ``format``, redacted; returns the handler.

    Replaces handlers this function installed before, so calling it twice does not duplicate
    lines; other handlers (pytest's capture, for one) are left alone.
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name("runtimestate")
    handler.addFilter(SecretFilter())
    handler.setFormatter(JSONFormatter() if format is LogFormat.JSON else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == "runtimestate"]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    return handler
