"""The message bus: one interface, in-process and NATS implementations.

:func:`open_bus` is the one place that turns a URL into a :class:`Messenger`; everything above
this layer receives the messenger it builds and never names an implementation.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from runtimestate.errors import InvalidInput

from .base import DEFAULT_MAX_PENDING, Handler, Message, Messenger, Subscription

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_MAX_PENDING",
    "Handler",
    "Message",
    "Messenger",
    "Subscription",
    "open_bus",
]

DEFAULT_CONNECT_TIMEOUT = 5.0

_NATS_SCHEMES = ("nats", "tls")


def _nats_servers(url: str) -> list[str]:
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise InvalidInput("the bus URL names no server", field="url")
    for server in servers:
        try:
            parts = urlsplit(server)
            port = parts.port
        except ValueError as exc:
            raise InvalidInput(f"malformed bus URL: {exc}", field="url") from exc
        if parts.scheme not in _NATS_SCHEMES or not parts.hostname:
            raise InvalidInput(
                "each server of a NATS bus URL must look like nats://host:port or tls://host:port",
                field="url",
            )
        if port == 0 or parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidInput(
                "a NATS server URL carries only a host and a port (and optional credentials)",
                field="url",
            )
    return servers


async def open_bus(
    url: str | None = None,
    *,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    name: str | None = None,
) -> Messenger:
    """Open the bus named by ``url`` and return it, connected.

    ``None`` or ``memory://`` gives the in-process bus. ``nats://host:port`` (or ``tls://``;
    several servers separated by commas) connects to NATS, giving up with ``BusError`` after
    ``connect_timeout`` seconds; ``name`` labels the connection in the server's monitoring.
    Anything else is ``InvalidInput`` with ``field="url"``.
    """
    if url is not None and not isinstance(url, str):
        raise InvalidInput("the bus URL must be a string", field="url")
    if url is None or url.strip() in ("memory://", "memory:"):
        from .memory import MemoryMessenger

        return MemoryMessenger()
    servers = _nats_servers(url)
    if not connect_timeout > 0:
        raise InvalidInput("connect_timeout must be positive", field="connect_timeout")
    from .nats import NatsMessenger

    return await NatsMessenger.connect(servers, connect_timeout=connect_timeout, name=name)
