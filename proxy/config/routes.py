"""Routes: MTLS_INBOUND / MTLS_OUTBOUND items parsed into typed routes, and the route checks."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from ..addresses import is_unspecified, normalize
from ..identity import SpiffeId, parse_spiffe_id
from .parse import Address, parse_address, short_text

T = TypeVar("T")

_ROUTE_NAME_RE = re.compile(r"[a-z0-9_-]{1,32}")


@dataclass(frozen=True)
class InboundRoute:
    """Accept mTLS on `listen`, forward plaintext to `target` (the local app)."""

    name: str
    listen: Address
    target: Address

    def __str__(self) -> str:
        return f"{self.name}={self.listen}={self.target}"


@dataclass(frozen=True)
class OutboundRoute:
    """Accept plaintext from the local app on `listen`, dial `remote` with mTLS and, when
    `expected_peer` is set, require exactly that identity."""

    name: str
    listen: Address
    remote: Address
    expected_peer: SpiffeId | None = None

    def __str__(self) -> str:
        peer = f"@{self.expected_peer}" if self.expected_peer is not None else ""
        return f"{self.name}={self.listen}={self.remote}{peer}"


def listen_conflict(a: Address, b: Address) -> bool:
    """Whether two listen addresses cannot both be bound (same port, same or wildcard host).

    Port 0 (pick a free port) never conflicts.
    """
    if a.port != b.port or a.port == 0:
        return False
    return a.host == b.host or a.is_wildcard or b.is_wildcard


def _split_route(item: str) -> tuple[str | None, str, str]:
    parts = item.split("=")
    if len(parts) == 2:
        return None, parts[0], parts[1]
    if len(parts) == 3:
        name = parts[0].strip()
        if not _ROUTE_NAME_RE.fullmatch(name):
            raise ValueError(
                f"route name {name!r} must be 1-32 of lower-case letters, digits, '_' or '-'"
            )
        return name, parts[1], parts[2]
    raise ValueError("expected LISTEN=TARGET or NAME=LISTEN=TARGET")


def _parse_routes(text: str, parse_one: Callable[[str], T]) -> list[T]:
    routes: list[T] = []
    errors: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            routes.append(parse_one(item))
        except ValueError as exc:
            errors.append(f"route {short_text(item)}: {exc}")
    if errors:
        raise ValueError("; ".join(errors))
    return routes


def _check_unique(routes: Sequence[InboundRoute | OutboundRoute]) -> None:
    errors: list[str] = []
    for index, route in enumerate(routes):
        for other in routes[:index]:
            if route.name == other.name:
                errors.append(
                    f"two routes are named {route.name!r} ({other.listen} and {route.listen}); "
                    "name them with NAME=LISTEN=..."
                )
            elif listen_conflict(route.listen, other.listen):
                errors.append(
                    f"routes {other.name!r} and {route.name!r} both listen on port "
                    f"{route.listen.port} ({other.listen} and {route.listen})"
                )
    if errors:
        raise ValueError("; ".join(errors))


def _inbound_route(item: str) -> InboundRoute:
    name, listen_text, target_text = _split_route(item)
    listen = parse_address(listen_text, allow_zero=True)
    target = parse_address(target_text)
    if not target.host:
        raise ValueError(f"target {target} needs a host, e.g. 127.0.0.1:{target.port}")
    return InboundRoute(name or str(listen.port), listen, target)


def _outbound_route(item: str) -> OutboundRoute:
    name, listen_text, remote_text = _split_route(item)
    remote_text, at, peer_text = remote_text.partition("@")
    listen = parse_address(listen_text, allow_zero=True)
    remote = parse_address(remote_text)
    if not remote.host:
        raise ValueError(f"remote {remote} needs a host, e.g. db.internal:{remote.port}")
    expected: SpiffeId | None = None
    if at:
        if not peer_text.strip():
            raise ValueError(
                "nothing after '@'; expected a SPIFFE ID like spiffe://corp.example/db"
            )
        expected = parse_spiffe_id(peer_text.strip())
    return OutboundRoute(name or str(listen.port), listen, remote, expected)


def parse_inbound(text: str) -> list[InboundRoute]:
    """Parse MTLS_INBOUND: comma-separated [NAME=]LISTEN=TARGET items.

    The default route name is the listen port. Empty text means no routes. Listen
    addresses and names must be unique; the target port may not be 0.
    """
    routes = _parse_routes(text, _inbound_route)
    _check_unique(routes)
    return routes


def parse_outbound(text: str) -> list[OutboundRoute]:
    """Parse MTLS_OUTBOUND: comma-separated [NAME=]LISTEN=REMOTE[@SPIFFE_ID] items.

    The default route name is the listen port. Empty text means no routes. Listen
    addresses and names must be unique; the remote port may not be 0.
    """
    routes = _parse_routes(text, _outbound_route)
    _check_unique(routes)
    return routes


def format_routes(routes: Sequence[InboundRoute | OutboundRoute]) -> str:
    """The env-var text for a list of routes (parses back to the same routes)."""
    return ",".join(str(route) for route in routes)


def dials_itself(listen: Address, remote: Address) -> bool:
    """Whether a connection to `remote` would arrive back at a listener on `listen`.

    Judged from the text alone (no DNS): same port, and the same host, or a wildcard or
    loopback listen host with a loopback remote host (a wildcard remote such as 0.0.0.0 is
    this machine too). Port 0 (a free port picked at bind time) never matches.
    """
    if listen.port == 0 or listen.port != remote.port:
        return False
    # Compared normalised: [::ffff:127.0.0.1] is 127.0.0.1 (proxy/addresses.py).
    lhost, rhost = normalize(listen.host), normalize(remote.host)
    if lhost == rhost:
        return True
    anywhere = remote.is_wildcard or is_unspecified(remote.host)
    if not (remote.is_loopback or anywhere):
        return False
    if lhost == "0.0.0.0":
        return ":" not in rhost  # IPv4 only: [::1] does not reach it
    if listen.is_wildcard:
        return True  # '' and '::' take IPv4 and IPv6
    if listen.is_loopback:
        # 127.0.0.1 and 127.0.0.2 are different addresses; a name such as 'localhost' may be
        # either, and a wildcard remote reaches loopback listeners.
        return anywhere or not (_is_ip(rhost) and _is_ip(lhost))
    return False


def _is_ip(host: str) -> bool:
    return ":" in host or host.replace(".", "").isdigit()
