"""The sidecar's configuration: typed settings loaded from an injected MTLS_* mapping."""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, PlainValidator, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .errors import ConfigError, ConfigProblem
from .identity import SpiffeId, parse_spiffe_id, parse_trust_domain
from .policy import SpiffePattern, parse_patterns

ENV_PREFIX = "MTLS_"

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# ---------------------------------------------------------------------------------------
# Value parsers. Each takes the env-var text and returns a typed value or raises
# ValueError with a message for a human (what is wrong, and usually what was given).
# ---------------------------------------------------------------------------------------

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
        raise ValueError(f"the fingerprint must be hex digits (colons allowed), got {_short(text)}")
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
        raise ValueError(f"the CA URL must start with https://, got {_short(text)}")
    rest = rest.removesuffix("/")
    for char, what in (("/", "a path"), ("?", "a query"), ("#", "a fragment"), ("@", "user info")):
        if char in rest:
            raise ValueError(f"the CA URL must be just https://HOST:PORT, without {what}")
    address = parse_address(rest)
    if not address.host:
        raise ValueError("the CA URL has no host; expected https://HOST:PORT")
    return f"https://{address}"


def _short(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------

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
            errors.append(f"route {_short(item)}: {exc}")
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


# ---------------------------------------------------------------------------------------
# The Settings model
# ---------------------------------------------------------------------------------------


def _text(parse: Callable[[str], Any]) -> PlainValidator:
    """Validate env text with `parse`; values built in code (not str) pass through."""

    def validate(value: object) -> object:
        return parse(value) if isinstance(value, str) else value

    return PlainValidator(validate)


def _choice(*choices: str) -> PlainValidator:
    return _text(lambda text: parse_choice(text, choices))


def _int(minimum: int, maximum: int | None = None) -> PlainValidator:
    return _text(lambda text: parse_int(text, minimum=minimum, maximum=maximum))


def _duration(*, allow_zero: bool) -> PlainValidator:
    def parse(text: str) -> float:
        seconds = parse_duration(text)
        if seconds == 0 and not allow_zero:
            raise ValueError("must be longer than 0")
        return seconds

    return _text(parse)


def _secret(text: str) -> SecretStr:
    # Tokens never contain whitespace; a trailing newline from a template is common.
    return SecretStr(text.strip())


def _tls_groups(text: str) -> list[str]:
    from .tls import parse_tls_groups  # the TLS engine knows which groups it supports

    return list(parse_tls_groups(text))


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 256))


Bool = Annotated[bool, _text(parse_bool)]
Port = Annotated[int, _int(1, 65535)]


def parse_path(text: str) -> Path:
    """A file path (surrounding whitespace dropped; no NUL characters)."""
    if "\0" in text:
        raise ValueError("a file path may not contain a NUL character")
    return Path(text.strip())


OptPath = Annotated[Path | None, _text(parse_path)]
Duration = Annotated[float, _duration(allow_zero=False)]
DurationOrZero = Annotated[float, _duration(allow_zero=True)]

_DURATION_FIELDS = frozenset(
    {
        "plaintext_fallback_ttl",
        "handshake_timeout",
        "connect_timeout",
        "idle_timeout",
        "drain_timeout",
    }
)
_PORT_LIST_FIELDS = frozenset({"exclude_inbound_ports", "exclude_outbound_ports"})


class Settings(BaseSettings):
    """The whole sidecar configuration, built once by `load_settings` and passed down.

    Each field `x` comes from the variable MTLS_X. Durations are float seconds.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=True,
        frozen=True,
        extra="forbid",
        validate_default=False,
    )

    # Identity
    identity_source: Annotated[Literal["files", "ca"], _choice("files", "ca")] = Field(
        "files", description="Where the sidecar's certificate comes from.", examples=["files"]
    )
    cert_file: OptPath = Field(
        None, description="PEM certificate chain, leaf first.", examples=["/etc/mtls/tls.crt"]
    )
    key_file: OptPath = Field(
        None, description="PEM private key of the leaf.", examples=["/etc/mtls/tls.key"]
    )
    trust_bundle_file: OptPath = Field(
        None, description="PEM trust roots.", examples=["/etc/mtls/ca.crt"]
    )
    ca_url: Annotated[str | None, _text(parse_ca_url)] = Field(
        None, description="The enrolment service.", examples=["https://mtls-ca.internal:8443"]
    )
    ca_token: Annotated[SecretStr | None, _text(_secret)] = Field(
        None, description="Join token for enrolment (secret).", examples=["<join token>"]
    )
    ca_token_file: OptPath = Field(
        None, description="File holding the join token.", examples=["/var/run/mtls/token"]
    )
    ca_fingerprint: Annotated[str | None, _text(parse_fingerprint)] = Field(
        None,
        description="SHA-256 of the CA root certificate.",
        examples=["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"],
    )
    identity: Annotated[SpiffeId | None, _text(lambda text: parse_spiffe_id(text.strip()))] = Field(
        None,
        description="SPIFFE ID to enrol as.",
        examples=["spiffe://corp.example/ns/shop/sa/web"],
    )
    trust_domain: Annotated[str | None, _text(lambda text: parse_trust_domain(text.strip()))] = (
        Field(
            None, description="Trust domain (default: the identity's).", examples=["corp.example"]
        )
    )

    # Routes
    inbound: Annotated[list[InboundRoute], _text(parse_inbound)] = Field(
        default_factory=list,
        description="[NAME=]LISTEN=TARGET, comma-separated.",
        examples=["0.0.0.0:8443=127.0.0.1:8080"],
    )
    outbound: Annotated[list[OutboundRoute], _text(parse_outbound)] = Field(
        default_factory=list,
        description="[NAME=]LISTEN=REMOTE[@SPIFFE_ID], comma-separated.",
        examples=["127.0.0.1:15432=db.internal:8443@spiffe://corp.example/db"],
    )
    transparent: Bool = Field(False, description="Transparent interception.", examples=["true"])
    inbound_capture_port: Port = Field(15006, examples=["15006"])
    outbound_capture_port: Port = Field(15001, examples=["15001"])
    proxy_uid: Annotated[int, _int(0, 4294967294)] = Field(1337, examples=["1337"])
    exclude_inbound_ports: Annotated[list[int], _text(parse_port_list)] = Field(
        default_factory=list, examples=["22,9090-9099"]
    )
    exclude_outbound_ports: Annotated[list[int], _text(parse_port_list)] = Field(
        default_factory=list, examples=["53,8000-8010"]
    )
    exclude_outbound_cidrs: Annotated[list[IPNetwork], _text(parse_cidrs)] = Field(
        default_factory=list, examples=["169.254.169.254/32,10.96.0.0/12"]
    )

    # Security policy
    inbound_mode: Annotated[
        Literal["strict", "permissive", "audit"], _choice("strict", "permissive", "audit")
    ] = Field("strict", examples=["strict"])
    outbound_mode: Annotated[Literal["strict", "permissive"], _choice("strict", "permissive")] = (
        Field("strict", examples=["strict"])
    )
    plaintext_fallback_ttl: DurationOrZero = Field(300.0, examples=["5m"])
    allow_peers: Annotated[list[SpiffePattern], _text(parse_patterns)] = Field(
        default_factory=list, examples=["spiffe://corp.example/ns/shop/*/**"]
    )
    min_tls_version: Annotated[Literal["1.2", "1.3"], _choice("1.2", "1.3")] = Field(
        "1.3", examples=["1.3"]
    )
    tls_groups: Annotated[list[str], _text(_tls_groups)] = Field(
        default_factory=lambda: ["X25519MLKEM768", "X25519", "P-256"],
        description="Key-exchange groups, preferred first.",
        examples=["X25519MLKEM768,X25519,P-256"],
    )

    # Operations
    admin_listen: Annotated[Address, _text(lambda t: parse_address(t, allow_zero=True))] = Field(
        Address("127.0.0.1", 15000), examples=["127.0.0.1:15000"]
    )
    admin_allow_remote_drain: Bool = Field(False, examples=["false"])
    workers: Annotated[int, _int(1, 256)] = Field(default_factory=_default_workers, examples=["2"])
    handshake_timeout: Duration = Field(10.0, examples=["10s"])
    connect_timeout: Duration = Field(5.0, examples=["5s"])
    idle_timeout: DurationOrZero = Field(3600.0, description="0 disables.", examples=["1h"])
    drain_timeout: DurationOrZero = Field(30.0, examples=["30s"])
    max_connections: Annotated[int, _int(1)] = Field(10000, examples=["10000"])
    log_level: Annotated[
        Literal["debug", "info", "warning", "error"], _choice("debug", "info", "warning", "error")
    ] = Field("info", examples=["info"])
    log_format: Annotated[Literal["json", "text"], _choice("json", "text")] = Field(
        "json", examples=["json"]
    )
    peer_identity_cap: Annotated[int, _int(0)] = Field(100, examples=["100"])
    drop_privileges: Bool = Field(
        False, description="Switch to MTLS_PROXY_UID after binding.", examples=["true"]
    )

    @property
    def effective_trust_domain(self) -> str | None:
        """MTLS_TRUST_DOMAIN, else the identity's trust domain, else None (the runtime then
        takes it from the certificate)."""
        if self.trust_domain is not None:
            return self.trust_domain
        if self.identity is not None:
            return self.identity.trust_domain
        return None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only init kwargs and the injected mapping: never the process environment."""
        return (init_settings, MappingSource(settings_cls, _current_env.get()))


_current_env: ContextVar[Mapping[str, str]] = ContextVar(
    "mtls_settings_env", default=MappingProxyType({})
)


class MappingSource(PydanticBaseSettingsSource):
    """A settings source over an injected mapping of env-var names to text.

    Names are the config's env_prefix plus the upper-case field name, matched exactly.
    Empty (or blank) values count as not set.
    """

    def __init__(self, settings_cls: type[BaseSettings], env: Mapping[str, str]) -> None:
        super().__init__(settings_cls)
        self.env = env
        self.prefix = str(self.config.get("env_prefix", ""))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        """The raw text for `field_name`, or None when unset or blank."""
        value = self.env.get(self.prefix + field_name.upper())
        if value is not None and not value.strip():
            value = None
        return value, field_name, False

    def __call__(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name, info in self.settings_cls.model_fields.items():
            value, key, _ = self.get_field_value(info, name)
            if value is not None:
                data[key] = value
        return data


def env_var(field_name: str) -> str:
    """The environment variable for a Settings field: 'inbound' -> 'MTLS_INBOUND'."""
    return ENV_PREFIX + field_name.upper()


def known_variables() -> list[str]:
    """Every MTLS_* variable the settings understand, in declaration order."""
    return [env_var(name) for name in Settings.model_fields]


def _example(field_name: str) -> str:
    examples = Settings.model_fields[field_name].examples
    return str(examples[0]) if examples else ""


@contextmanager
def _injected(env: Mapping[str, str]) -> Iterator[None]:
    token = _current_env.set(env)
    try:
        yield
    finally:
        _current_env.reset(token)


def _build(env: Mapping[str, str]) -> Settings:
    with _injected(env):
        return Settings()


def _field_problems(exc: ValidationError) -> list[ConfigProblem]:
    problems: list[ConfigProblem] = []
    for error in exc.errors(include_url=False):
        name = str(error["loc"][0]) if error["loc"] else ""
        ctx = error.get("ctx") or {}
        message = str(ctx["error"]) if "error" in ctx else error["msg"]
        var = env_var(name) if name in Settings.model_fields else ENV_PREFIX + "?"
        example = _example(name) if name in Settings.model_fields else ""
        problems.append(ConfigProblem(var, message, example))
    return problems


def _unknown_problems(env: Mapping[str, str], also_known: Collection[str]) -> list[ConfigProblem]:
    known = known_variables()
    problems: list[ConfigProblem] = []
    for key in env:
        upper = key.upper()
        if not upper.startswith(ENV_PREFIX) or key in known or key in also_known:
            continue
        if upper in known:
            message = f"unknown variable; names are upper-case: did you mean {upper}?"
        else:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
            message = (
                f"unknown variable; did you mean {close[0]}?"
                if close
                else ("unknown variable (MTLS_* names are reserved for the sidecar's settings)")
            )
        problems.append(ConfigProblem(key, message))
    return problems


def _file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return f"{path} does not exist"
        if not path.is_file():
            return f"{path} is not a regular file"
    except (OSError, ValueError) as exc:
        return f"{path} cannot be checked ({exc})"
    if not os.access(path, os.R_OK):
        return f"{path} is not readable by this user (uid {os.getuid()})"
    return None


def _cross_problems(s: Settings, bad: set[str]) -> list[ConfigProblem]:
    """Checks that span fields. Variables that already have a problem are skipped, since
    their value here is only the default standing in for the bad one."""
    problems: list[ConfigProblem] = []

    def add(name: str, message: str) -> None:
        problems.append(ConfigProblem(env_var(name), message, _example(name)))

    def ok(*names: str) -> bool:
        return not any(env_var(n) in bad for n in names)

    if not ok("identity_source"):
        pass
    elif s.identity_source == "files":
        for name in ("cert_file", "key_file", "trust_bundle_file"):
            path = getattr(s, name)
            if not ok(name):
                continue
            if path is None:
                add(name, "required when MTLS_IDENTITY_SOURCE=files")
            elif (problem := _file_problem(path)) is not None:
                add(name, problem)
    else:
        for name in ("ca_url", "ca_fingerprint", "identity"):
            if ok(name) and getattr(s, name) is None:
                add(name, "required when MTLS_IDENTITY_SOURCE=ca")
        if ok("ca_token", "ca_token_file"):
            if s.ca_token is not None and s.ca_token_file is not None:
                add("ca_token", "set only one of MTLS_CA_TOKEN and MTLS_CA_TOKEN_FILE")
            elif s.ca_token is None and s.ca_token_file is None:
                add("ca_token", "MTLS_IDENTITY_SOURCE=ca needs MTLS_CA_TOKEN or MTLS_CA_TOKEN_FILE")
        token_file = s.ca_token_file
        if ok("ca_token_file") and token_file is not None and (p := _file_problem(token_file)):
            add("ca_token_file", p)

    if (
        ok("trust_domain", "identity")
        and s.trust_domain is not None
        and s.identity is not None
        and s.identity.trust_domain != s.trust_domain
    ):
        add(
            "trust_domain",
            f"is {s.trust_domain} but MTLS_IDENTITY {s.identity} is in trust domain "
            f"{s.identity.trust_domain}",
        )

    if ok("inbound", "outbound", "transparent") and not (s.inbound or s.outbound or s.transparent):
        add("inbound", "nothing to do: set MTLS_INBOUND, MTLS_OUTBOUND or MTLS_TRANSPARENT=true")

    listeners: list[tuple[str, Address]] = []
    if ok("inbound"):
        listeners += [(f"MTLS_INBOUND route {r.name!r}", r.listen) for r in s.inbound]
    if ok("outbound"):
        for route in s.outbound:
            for owner, address in listeners:
                if listen_conflict(route.listen, address):
                    add(
                        "outbound",
                        f"route {route.name!r} listens on {route.listen}, which collides with "
                        f"{owner} on {address}",
                    )
        listeners += [(f"MTLS_OUTBOUND route {r.name!r}", r.listen) for r in s.outbound]

    if s.transparent and ok("transparent"):
        captures = [name for name in ("inbound_capture_port", "outbound_capture_port") if ok(name)]
        if len(captures) == 2 and s.inbound_capture_port == s.outbound_capture_port:
            add(
                "outbound_capture_port",
                f"must differ from MTLS_INBOUND_CAPTURE_PORT (both {s.outbound_capture_port})",
            )
        for name in captures:
            port: int = getattr(s, name)
            for owner, address in listeners:
                if address.port == port:
                    add(name, f"port {port} collides with {owner} listening on {address}")
        listeners += [(env_var(n), Address("", getattr(s, n))) for n in captures]

    if ok("admin_listen"):
        for owner, address in listeners:
            if listen_conflict(s.admin_listen, address):
                add(
                    "admin_listen",
                    f"{s.admin_listen} collides with {owner} listening on {address}",
                )
    return problems


def load_settings(env: Mapping[str, str], *, also_known: Collection[str] = ()) -> Settings:
    """Build Settings from `env` (a mapping of MTLS_* names to text, e.g. os.environ).

    Raises ConfigError listing every problem at once: bad values, missing or conflicting
    variables, and unknown MTLS_* names (typos). `also_known` names extra MTLS_* variables
    that other parts of the program read, so they are not reported as unknown.
    """
    problems: list[ConfigProblem] = []
    bad: set[str] = set()
    settings: Settings | None
    try:
        settings = _build(env)
    except ValidationError as exc:
        problems = _field_problems(exc)
        bad = {p.var for p in problems}
        # Rebuild without the bad variables, so the cross-field checks can still run.
        try:
            settings = _build({k: v for k, v in env.items() if k not in bad})
        except ValidationError:  # pragma: no cover - defaults are always valid
            settings = None
    if settings is not None:
        problems += _cross_problems(settings, bad)
    problems += _unknown_problems(env, also_known)
    if problems:
        raise ConfigError(problems)
    assert settings is not None
    return settings


def _jsonable(name: str, value: object) -> object:
    if value is None or isinstance(value, bool | int | str):
        if name in _DURATION_FIELDS and isinstance(value, int | float):
            return format_duration(value)
        return value
    if isinstance(value, float):
        return format_duration(value) if name in _DURATION_FIELDS else value
    if isinstance(value, SecretStr):
        return "***"
    if name in _PORT_LIST_FIELDS and isinstance(value, list):
        return format_port_list(value)
    if isinstance(value, list):
        return [str(item) for item in value]
    return str(value)


def redacted(settings: Settings) -> dict[str, object]:
    """The effective configuration as JSON-able values keyed by env-var name.

    Secrets (MTLS_CA_TOKEN) show as '***'; durations in duration syntax ('5m'); routes,
    addresses and identities in their env-var syntax. MTLS_TRUST_DOMAIN shows the effective
    trust domain (None: taken from the certificate at run time).
    """
    out: dict[str, object] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if name == "trust_domain":
            value = settings.effective_trust_domain
        out[env_var(name)] = _jsonable(name, value)
    return out
