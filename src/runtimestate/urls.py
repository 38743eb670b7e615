"""Which backend URLs the service accepts: the syntax every caller checks, and the network policy.

:func:`check_backend_url` is the syntax: ``http`` or ``https``, a host, a port in range, no
user-info (``http://user:pass@host`` would store a password in clear and echo it in every
listing, and ``http://127.0.0.1:9@evil.com`` reads as one host but goes to another), no fragment
and no whitespace. Credentials for a backend go in its per-backend credential instead.

:class:`UrlPolicy` is where a backend may point, decided by the operator:

* an optional **allow list** of networks: when set, a backend's address must be in one of them;
* a **deny list** of networks, link-local (``169.254.0.0/16``, ``fe80::/10``) by default: the
  cloud metadata services live there, and a token holder must not be able to make the service
  fetch ``http://169.254.169.254/`` and report what it found;
* **the service itself**: a backend URL that reaches the service's own port on one of its own
  addresses would make the service reconcile itself.

A host name is resolved when the URL is declared (through the API or in a fleet file), and every
address it resolves to must pass. A name that does not resolve (yet) is accepted - fleets are
declared before their machines boot. A name is checked again every time it is resolved to
connect: the drivers' and the gateway's HTTP sessions resolve through
:class:`runtimestate.backends.http.PolicyResolver`, which drops the addresses this policy refuses,
so a name that later moves into a denied network (a DNS change, or a rebinding attack that
answers a harmless address at declaration) is refused before any byte, let alone a key, is
sent. Literal addresses are checked without resolving; they cannot change.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from runtimestate.errors import InvalidInput

__all__ = [
    "DEFAULT_DENIED_NETWORKS",
    "URL_PATTERN",
    "UrlPolicy",
    "check_backend_url",
    "parse_networks",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_DENIED_NETWORKS = ("169.254.0.0/16", "fe80::/10")
MAX_URL_LENGTH = 2048
_RESOLVE_TIMEOUT = 2.0

# Published in the OpenAPI schema so that clients (and schemathesis) know what is accepted. The
# check below accepts every string this matches, and also bracketed IPv6 literals, which a
# readable pattern cannot describe exactly. No '@' before the path (user-info) and no '#'.
_PORT = (
    r"(?::(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]"
    r"|6553[0-5]))"
)
URL_PATTERN = rf"^https?://[A-Za-z0-9][A-Za-z0-9.\-]*{_PORT}?(?:[/?][!-\"$-~]*)?$"


def check_backend_url(value: object, field: str = "base_url") -> str:
    """``value`` without trailing slashes if it is an acceptable backend URL, else
    ``InvalidInput`` naming ``field`` and what is wrong."""
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}", field=field)
    text = value.strip()
    if len(text) > MAX_URL_LENGTH:
        raise InvalidInput(f"{field} is longer than {MAX_URL_LENGTH} characters", field=field)
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise InvalidInput(
            f"{field} must not contain whitespace or control characters", field=field
        )
    try:
        split = urlsplit(text)
        port = split.port  # raises ValueError past 65535 or for a non-number
    except ValueError as exc:
        raise InvalidInput(f"{field} has an invalid host or port", field=field) from exc
    if split.scheme not in {"http", "https"} or not split.hostname or port == 0:
        raise InvalidInput(f"{field} must be an http:// or https:// URL with a host", field=field)
    if "@" in split.netloc:
        raise InvalidInput(
            f"{field} must not contain a user name or password; "
            "give the backend a credential (apiKey) instead",
            field=field,
        )
    if "#" in text:
        raise InvalidInput(f"{field} must not contain a fragment ('#')", field=field)
    return text.rstrip("/")


def parse_networks(values: Iterable[str], field: str) -> tuple[Network, ...]:
    """CIDR strings (``10.0.0.0/8``, ``fd00::/8``, or a single address) as networks."""
    networks: list[Network] = []
    for raw in values:
        text = raw.strip()
        if not text:
            continue
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise InvalidInput(f"{field}: {text!r} is not a network (CIDR)", field=field) from exc
    return tuple(networks)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


@dataclass(kw_only=True)
class UrlPolicy:
    """Where backend URLs may point (see the module text). ``self_port`` is the service's own
    port, ``None`` when it is not serving (then "the service itself" is not checked); the
    service sets it with :meth:`serving_at` once its socket is bound (port 0 picks one)."""

    allowed: Sequence[Network] = ()
    denied: Sequence[Network] = field(
        default_factory=lambda: parse_networks(DEFAULT_DENIED_NETWORKS, "denied")
    )
    self_port: int | None = None
    self_host: str = "127.0.0.1"

    def serving_at(self, host: str, port: int) -> None:
        self.self_host = host
        self.self_port = port

    async def check(self, url: str, field: str = "base_url") -> None:
        """``InvalidInput`` when ``url`` (already syntax-checked) points where it may not."""
        split = urlsplit(url)
        host = split.hostname or ""
        port = split.port or (443 if split.scheme == "https" else 80)
        literal = _literal(host)
        addresses = [literal] if literal is not None else await _resolve(host, port)
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                raise InvalidInput(f"{field} resolves to {reason}", field=field)
        if self.self_port is not None and port == self.self_port:
            mine = await self._own_addresses()
            if host.casefold() == "localhost" or any(a in mine for a in addresses):
                raise InvalidInput(
                    f"{field} points at this runtimestate service itself", field=field
                )

    def refusal(self, address: Address | str) -> str | None:
        """Why ``address`` may not be reached ("169.254.169.254, in the denied network ..."),
        or None when it may. A string that is not an address is refused."""
        if isinstance(address, str):
            parsed = _literal(address)
            if parsed is None:
                return f"{address!r} is not an IP address"
            address = parsed
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        for network in self.denied:
            if address.version == network.version and address in network:
                return (
                    f"{address}, in the denied network {network} "
                    "(see the backend_networks_deny setting)"
                )
        if self.allowed and not any(
            address.version == network.version and address in network for network in self.allowed
        ):
            return (
                f"{address}, outside the allowed networks (see the backend_networks_allow setting)"
            )
        return None

    async def _own_addresses(self) -> set[Address]:
        bound = _literal(self.self_host)
        if bound is not None and not bound.is_unspecified:
            own = {bound}
            if bound.is_loopback:
                own |= {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
            return own
        # Bound to every interface (0.0.0.0, ::) or by name: any loopback or local address.
        own = {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")}
        own |= set(await _resolve(socket.gethostname(), None))
        if bound is None:
            own |= set(await _resolve(self.self_host, None))
        return own


async def _resolve(host: str, port: int | None) -> list[Address]:
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), _RESOLVE_TIMEOUT
        )
    except (OSError, TimeoutError, UnicodeError):
        return []
    found: list[Address] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = _literal(str(sockaddr[0]))
        if address is not None and address not in found:
            found.append(address)
    return found
