"""Value parsers: each turns one env-var text into a typed value or a ValueError for a human."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from ..addresses import is_loopback

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Each parser takes the env-var text and returns a typed value or raises ValueError with a
# message for a human (what is wrong, and usually what was given).

_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def parse_bool(text: str) -> bool:
    """'true'/'false', '1'/'0', 'yes'/'no', in any case."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected true or false (also 1/0, yes/no), got {text!r}")


def parse_int(text: str, *, minimum: int, maximum: int | None = None) -> int:
    """A whole number in [minimum, maximum] (no maximum when None)."""
    value = text.strip()
    if not re.fullmatch(r"[+-]?[0-9]+", value) or len(value) > 30:
        raise ValueError(f"expected a whole number, got {text!r}")
    number = int(value)
    if number < minimum or (maximum is not None and number > maximum):
        bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise ValueError(f"must be {bounds}, got {number}")
    return number


def parse_choice(text: str, choices: Collection[str]) -> str:
    """One of `choices` (compared case-insensitively, returned as listed)."""
    value = text.strip().lower()
    for choice in choices:
        if value == choice.lower():
            return choice
    listed = ", ".join(choices)
    raise ValueError(f"must be one of {listed}; got {text!r}")


def parse_port(text: str, *, allow_zero: bool = False) -> int:
    """A TCP port, 1-65535 (0 too with allow_zero, meaning 'pick a free one')."""
    value = text.strip()
    if not value:
        raise ValueError("the port is missing")
    if not value.isascii() or not value.isdigit():
        raise ValueError(f"port {text!r} is not a number")
    port = int(value) if len(value) <= 6 else 65536
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {value} is out of range ({low}-65535)")
    return port


_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", re.IGNORECASE)
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def _check_host(host: str) -> str:
    if not host.isascii():
        raise ValueError(f"host {host!r} has non-ASCII characters; use its punycode (xn--) form")
    labels = host.split(".")
    if all(re.fullmatch(r"[0-9]+", label) for label in labels):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError:
            raise ValueError(f"host {host!r} is not a valid IPv4 address") from None
    if len(host) > 253:
        raise ValueError(f"host name is {len(host)} characters long; at most 253 are allowed")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            if not label:
                raise ValueError(f"host name {host!r} has an empty label ('..' or a dot at an end)")
            raise ValueError(
                f"host name {host!r} has an invalid label {label!r}: labels are 1-63 letters, "
                "digits or '-', and do not start or end with '-'"
            )
    return host.lower()


@dataclass(frozen=True)
class Address:
    """A TCP address. host '' means all interfaces; IPv6 hosts are stored without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        """Whether this address listens on all interfaces ('', 0.0.0.0 or ::)."""
        return self.host in _WILDCARD_HOSTS

    @property
    def is_loopback(self) -> bool:
        """Whether the host is this machine's loopback: localhost, 127.0.0.0/8, ::1, or
        ::ffff:127.x.y.z."""
        return is_loopback(self.host)  # IPv4-mapped loopback too (proxy/addresses.py)


def parse_address(text: str, *, allow_zero: bool = False) -> Address:
    """Parse 'host:port', ':port' (all interfaces), '[v6]:port' or '0.0.0.0:port'.

    Host names must be RFC 1123 names; port 1-65535, or 0 too with allow_zero.
    """
    value = text.strip()
    if not value:
        raise ValueError("the address is empty; expected HOST:PORT, :PORT or [IPv6]:PORT")
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            raise ValueError(f"address {value!r} opens '[' but never closes it")
        host, rest = value[1:end], value[end + 1 :]
        if not rest.startswith(":"):
            raise ValueError(f"address {value!r} needs ':PORT' after the ']'")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ValueError(f"{host!r} in {value!r} is not a valid IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"address {value!r} has no ':PORT'; expected HOST:PORT or :PORT")
        if ":" in host:
            raise ValueError(f"address {value!r}: put IPv6 addresses in brackets, e.g. [::1]:8080")
        if host:
            host = _check_host(host)
    try:
        port = parse_port(port_text, allow_zero=allow_zero)
    except ValueError as exc:
        raise ValueError(f"address {value!r}: {exc}") from None
    return Address(host, port)


_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_DURATION_RE = re.compile(rf"(?:{_NUMBER}(?:ms|s|m|h|d))+")
_DURATION_PART_RE = re.compile(rf"({_NUMBER})(ms|s|m|h|d)")
MAX_DURATION = 100 * 365 * 86400.0
"""The longest duration accepted, in seconds (100 years)."""


def parse_duration(text: str) -> float:
    """Seconds from '90s', '15m', '24h', '7d', '500ms', combinations like '1h30m', or a
    bare number of seconds. Decimals are allowed ('1.5h'); negatives are not."""
    value = text.strip()
    hint = "write e.g. 90s, 15m, 24h, 7d, 500ms or 1h30m"
    if not value:
        raise ValueError(f"the duration is empty; {hint}")
    if value.startswith("-"):
        raise ValueError(f"negative durations are not allowed, got {text!r}")
    if len(value) > 1000:
        raise ValueError(f"duration {value[:20]!r}... is too long to be sensible; {hint}")
    if re.fullmatch(_NUMBER, value):
        total = Decimal(value)
    elif _DURATION_RE.fullmatch(value):
        total = sum(
            (Decimal(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(value)),
            Decimal(0),
        )
    else:
        raise ValueError(f"{text!r} is not a duration; {hint} (units: ms, s, m, h, d)")
    if total > Decimal(MAX_DURATION):
        raise ValueError(f"duration {value!r} is longer than 100 years")
    return float(total)


def format_duration(seconds: float) -> str:
    """The shortest exact duration text for `seconds`, e.g. 5400.0 -> '1h30m'.

    parse_duration(format_duration(x)) == x for every non-negative finite float.
    """
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    try:
        rest = Decimal(repr(float(seconds)))
    except InvalidOperation:  # pragma: no cover - repr of a finite float is always valid
        raise ValueError(f"cannot format {seconds!r} as a duration") from None
    if rest == 0:
        return "0s"
    parts: list[str] = []
    for unit in ("d", "h", "m", "s"):
        size = _DURATION_UNITS[unit]
        whole = rest // size
        if whole:
            parts.append(f"{whole}{unit}")
            rest -= whole * size
    if rest:
        millis = (rest * 1000).normalize()
        parts.append(f"{millis:f}ms")
    return "".join(parts)


def parse_port_list(text: str) -> list[int]:
    """Comma-separated ports and ranges ('80,443,8000-8010'), sorted, without repeats."""
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        low_text, dash, high_text = item.partition("-")
        low = parse_port(low_text)
        high = parse_port(high_text) if dash else low
        if high < low:
            raise ValueError(f"port range {item!r} runs backwards; write {high}-{low}")
        ports.update(range(low, high + 1))
    return sorted(ports)


def format_port_list(ports: Collection[int]) -> str:
    """The compact text for a list of ports: [80, 8000, 8001, 8002] -> '80,8000-8002'."""
    items: list[str] = []
    ordered = sorted(set(ports))
    start = 0
    while start < len(ordered):
        end = start
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        low, high = ordered[start], ordered[end]
        items.append(str(low) if low == high else f"{low}-{high}")
        start = end + 1
    return ",".join(items)


def parse_cidrs(text: str) -> list[IPNetwork]:
    """Comma-separated IPv4/IPv6 networks ('10.0.0.0/8,fd00::/8'); a bare address is a /32
    (or /128). Host bits must be zero."""
    networks: list[IPNetwork] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=True))
        except ValueError:
            try:
                loose = ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP network like 10.0.0.0/8") from None
            raise ValueError(f"{item!r} has host bits set; did you mean {loose}?") from None
    return networks


def parse_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint: 64 hex digits, colons allowed, optional 'sha256:' prefix.

    Returned lower-case without colons.
    """
    value = text.strip()
    if value[:7].lower() == "sha256:":
        value = value[7:]
    digits = value.replace(":", "").lower()
    if not re.fullmatch(r"[0-9a-f]*", digits):
        raise ValueError(
            f"the fingerprint must be hex digits (colons allowed), got {short_text(text)}"
        )
    if len(digits) != 64:
        hint = " (that is SHA-1 length; use SHA-256)" if len(digits) == 40 else ""
        raise ValueError(
            f"a SHA-256 fingerprint has 64 hex digits, this one has {len(digits)}{hint}"
        )
    return digits


def parse_ca_url(text: str) -> str:
    """The CA's URL, 'https://host:port' (a trailing '/' is dropped)."""
    value = text.strip()
    scheme, sep, rest = value.partition("://")
    if not sep or scheme.lower() != "https":
        raise ValueError(f"the CA URL must start with https://, got {short_text(text)}")
    rest = rest.removesuffix("/")
    for char, what in (("/", "a path"), ("?", "a query"), ("#", "a fragment"), ("@", "user info")):
        if char in rest:
            raise ValueError(f"the CA URL must be just https://HOST:PORT, without {what}")
    address = parse_address(rest)
    if not address.host:
        raise ValueError("the CA URL has no host; expected https://HOST:PORT")
    return f"https://{address}"


def short_text(text: str) -> str:
    """`text` quoted for a message, cut to 60 characters."""
    return repr(text if len(text) <= 60 else text[:57] + "...")


def parse_path(text: str) -> Path:
    """A file path (surrounding whitespace dropped; no NUL characters)."""
    if "\0" in text:
        raise ValueError("a file path may not contain a NUL character")
    return Path(text.strip())


def parse_spiffe_socket(text: str) -> Path:
    """The Workload API socket as SPIFFE_ENDPOINT_SOCKET writes it: 'unix:///path',
    'unix:/path' or a plain absolute path (TCP endpoints are not supported)."""
    value = text.strip()
    if "\0" in value:
        raise ValueError("a socket path may not contain a NUL character")
    if value.startswith("unix://"):
        rest = value[len("unix://") :]
        if not rest.startswith("/"):
            raise ValueError(
                "unix:// needs an absolute path (unix:///run/spire/agent.sock), "
                f"got {short_text(text)}"
            )
        value = rest
    elif value.startswith("unix:"):
        value = value[len("unix:") :]
    elif "://" in value or value.startswith("tcp:"):
        raise ValueError(
            f"only Unix socket endpoints are supported (unix:///path), got {short_text(text)}"
        )
    if not value.startswith("/"):
        raise ValueError(f"the socket path must be absolute, got {short_text(text)}")
    return Path(value)


def parse_federated_bundles(text: str) -> list[tuple[str, str]]:
    """MTLS_FEDERATED_BUNDLES: 'TRUST_DOMAIN=SOURCE,...', SOURCE a SPIFFE bundle file path or
    a bundle endpoint URL (https://..., the https_web profile). Each trust domain once."""
    from ..identity import parse_trust_domain

    out: list[tuple[str, str]] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        td_text, sep, source = item.partition("=")
        if not sep or not source.strip():
            raise ValueError(
                f"expected TRUST_DOMAIN=PATH or TRUST_DOMAIN=https://URL, got {short_text(item)}"
            )
        td = parse_trust_domain(td_text.strip().removeprefix("spiffe://"))
        source = source.strip()
        if "://" in source:
            if not source.lower().startswith("https://"):
                raise ValueError(
                    f"bundle endpoint for {td} must be an https:// URL (https_web profile), "
                    f"got {short_text(source)}"
                )
        elif "\0" in source:
            raise ValueError("a file path may not contain a NUL character")
        if any(td == seen for seen, _ in out):
            raise ValueError(f"trust domain {td} is listed twice")
        out.append((td, source))
    if not out:
        raise ValueError("no TRUST_DOMAIN=SOURCE pair given")
    return out


@dataclass(frozen=True)
class HboneOutbound:
    """MTLS_HBONE_OUTBOUND: which outbound connections dial HBONE instead of our protocol."""

    routes: frozenset[str] = frozenset()
    cidrs: tuple[IPNetwork, ...] = ()
    ports: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.routes or self.cidrs or self.ports)

    def __str__(self) -> str:
        """The env-var syntax (what `check` shows): names, then CIDRs, then ports."""
        items = [*sorted(self.routes), *(str(n) for n in self.cidrs)]
        if self.ports:
            items.append(format_port_list(sorted(self.ports)))
        return ",".join(items)

    def matches(self, host: str, port: int) -> bool:
        """Transparent mode: does the original destination `host:port` dial HBONE?"""
        if port in self.ports:
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(ip in net for net in self.cidrs)


_HBONE_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def parse_hbone_outbound(text: str) -> HboneOutbound:
    """Comma-separated outbound route names, destination CIDRs (or addresses) and ports or
    port ranges: 'db,10.8.0.0/16,8080,9000-9010'."""
    routes: set[str] = set()
    cidrs: list[IPNetwork] = []
    ports: set[int] = set()
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item.replace("-", "").isdigit():
            ports.update(parse_port_list(item))
        elif "/" in item or ":" in item or item.replace(".", "").isdigit():
            cidrs += parse_cidrs(item)
        elif _HBONE_NAME_RE.fullmatch(item):
            routes.add(item)
        else:
            raise ValueError(
                f"{item!r} is neither an outbound route name, a CIDR nor a port (or range)"
            )
    return HboneOutbound(frozenset(routes), tuple(cidrs), frozenset(ports))
