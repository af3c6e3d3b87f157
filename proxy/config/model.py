"""The Settings model: one typed field per MTLS_* variable, validated from its text."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, SecretStr

from ..identity import SpiffeId, parse_spiffe_id, parse_trust_domain
from ..policy import SpiffePattern, parse_patterns
from ..proxyproto import DEFAULT_ID_TLV, ProxyProtocolRoutes, parse_proxy_protocol, parse_tlv_type
from .parse import (
    Address,
    HboneOutbound,
    IPNetwork,
    parse_address,
    parse_bool,
    parse_ca_url,
    parse_choice,
    parse_cidrs,
    parse_duration,
    parse_federated_bundles,
    parse_fingerprint,
    parse_hbone_outbound,
    parse_int,
    parse_path,
    parse_port_list,
    parse_spiffe_socket,
)
from .routes import InboundRoute, OutboundRoute, parse_inbound, parse_outbound

ENV_PREFIX = "MTLS_"


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
    from ..tls import parse_tls_groups  # the TLS engine knows which groups it supports

    return list(parse_tls_groups(text))


HBONE_PORT = 15008  # ztunnel's, and hbone.PORT


def _hbone_listen(text: str) -> Address:
    """An address, or 'off' (kept as port 0: no HBONE listener, even in transparent mode)."""
    if text.strip().lower() in ("off", "false", "none"):
        return Address("", 0)
    return parse_address(text)


def _default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 256))


Bool = Annotated[bool, _text(parse_bool)]
Port = Annotated[int, _int(1, 65535)]


OptPath = Annotated[Path | None, _text(parse_path)]
Duration = Annotated[float, _duration(allow_zero=False)]
DurationOrZero = Annotated[float, _duration(allow_zero=True)]

DURATION_FIELDS = frozenset(
    {
        "plaintext_fallback_ttl",
        "handshake_timeout",
        "connect_timeout",
        "idle_timeout",
        "drain_timeout",
        "bundle_refresh",
        "pool_idle_timeout",
        "pool_max_lifetime",
        "pool_ping_interval",
    }
)
PORT_LIST_FIELDS = frozenset({"exclude_inbound_ports", "exclude_outbound_ports"})


class Settings(BaseModel):
    """The whole sidecar configuration, built once by `load_settings` and passed down.

    Each field `x` comes from the variable MTLS_X (see `env_var`), validated from its text;
    values built in code pass through as they are. Durations are float seconds.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=False)

    # Identity
    identity_source: Annotated[
        Literal["files", "ca", "spiffe"], _choice("files", "ca", "spiffe")
    ] = Field(
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
    crl_file: OptPath = Field(
        None,
        description="PEM CRL(s) of the issuers we trust (files mode), watched.",
        examples=["/etc/mtls/crl.pem"],
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
    bundle_refresh: Duration = Field(
        300.0,
        description="How often CA mode fetches the trust bundle and the CRL.",
        examples=["5m"],
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
    spiffe_endpoint_socket: Annotated[Path | None, _text(parse_spiffe_socket)] = Field(
        None,
        description="The SPIFFE Workload API socket (default: SPIFFE_ENDPOINT_SOCKET).",
        examples=["unix:///run/spire/sockets/agent.sock"],
    )
    federated_bundles: Annotated[list[tuple[str, str]], _text(parse_federated_bundles)] = Field(
        default_factory=list,
        description="TRUST_DOMAIN=PATH|https://URL, comma-separated: SPIFFE bundles of other "
        "trust domains (files watched, endpoints fetched every MTLS_BUNDLE_REFRESH).",
        examples=["partner.example=/etc/mtls/partner.bundle.json"],
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
    policy_file: OptPath = Field(
        None,
        description="YAML authorization policy per inbound route, watched; replaces "
        "MTLS_ALLOW_PEERS when set.",
        examples=["/etc/mtls/policy.yaml"],
    )
    min_tls_version: Annotated[Literal["1.2", "1.3"], _choice("1.2", "1.3")] = Field(
        "1.3", examples=["1.3"]
    )
    tls_groups: Annotated[list[str], _text(_tls_groups)] = Field(
        default_factory=lambda: ["X25519MLKEM768", "X25519", "P-256"],
        description="Key-exchange groups, preferred first.",
        examples=["X25519MLKEM768,X25519,P-256"],
    )

    # Connection reuse between sidecars (pool.py, README "Connection reuse")
    connection_reuse: Bool = Field(
        True,
        description="Carry many app connections per mTLS connection between two sidecars.",
        examples=["true"],
    )
    pool_max_streams: Annotated[int, _int(1, 100000)] = Field(
        100, description="App connections at once on one pooled connection.", examples=["100"]
    )
    pool_idle_timeout: Duration = Field(
        300.0, description="A pooled connection without streams closes after this.", examples=["5m"]
    )
    pool_max_lifetime: Duration = Field(
        3600.0, description="A pooled connection takes no new streams after this.", examples=["1h"]
    )
    pool_protocol: Annotated[int, _int(1, 2)] = Field(
        2,
        description="The newest connection reuse version to offer and select "
        "(1: mtls-sidecar/1 only, as before PING and the connection window).",
        examples=["2"],
    )
    pool_ping_interval: Duration = Field(
        10.0,
        description="mtls-sidecar/2: PING a pooled connection silent this long; "
        "close it after twice as long.",
        examples=["10s"],
    )

    # HBONE, Istio ambient's tunnel (hbone.py, README "HBONE")
    hbone_listen: Annotated[Address | None, _text(_hbone_listen)] = Field(
        None,
        description="Also accept HBONE (HTTP/2 CONNECT over mTLS) here; 'off' disables it. "
        "Default :15008 in transparent mode, off otherwise.",
        examples=[":15008"],
    )

    hbone_outbound: Annotated[HboneOutbound, _text(parse_hbone_outbound)] = Field(
        default_factory=HboneOutbound,
        description="Outbound route names (transparent mode: destination CIDRs or ports) "
        "that dial HBONE instead of our own reuse protocol.",
        examples=["db,10.8.0.0/16,8080"],
    )
    hbone_port: Port = Field(
        15008,
        description="The port an HBONE tunnel dials on the destination's host.",
        examples=["15008"],
    )

    # Telling the app who called (PROXY protocol v2)
    proxy_protocol: Annotated[ProxyProtocolRoutes, _text(parse_proxy_protocol)] = Field(
        "off",
        description="off, all, or inbound route names: open app connections with PROXY v2.",
        examples=["all"],
    )
    proxy_protocol_id_tlv: Annotated[int, _text(parse_tlv_type)] = Field(
        DEFAULT_ID_TLV, description="TLV type of the caller's SPIFFE ID.", examples=["0xE0"]
    )
    proxy_protocol_crc32c: Bool = Field(
        False, description="Add a CRC32C checksum TLV to each PROXY header.", examples=["true"]
    )
    outbound_accept_proxy_protocol: Bool = Field(
        False,
        description="Outbound listeners expect a PROXY v2 header first (behind a load balancer).",
        examples=["true"],
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
    def hbone_address(self) -> Address | None:
        """Where HBONE is accepted: MTLS_HBONE_LISTEN, else :15008 in transparent mode."""
        listen = self.hbone_listen
        if listen is None:
            return Address("", HBONE_PORT) if self.transparent else None
        return None if listen.port == 0 else listen

    @property
    def effective_trust_domain(self) -> str | None:
        """MTLS_TRUST_DOMAIN, else the identity's trust domain, else None (the runtime then
        takes it from the certificate)."""
        if self.trust_domain is not None:
            return self.trust_domain
        if self.identity is not None:
            return self.identity.trust_domain
        return None


def env_var(field_name: str) -> str:
    """The environment variable for a Settings field: 'inbound' -> 'MTLS_INBOUND'."""
    return ENV_PREFIX + field_name.upper()


def known_variables() -> list[str]:
    """Every MTLS_* variable the settings understand, in declaration order."""
    return [env_var(name) for name in Settings.model_fields]


def example_of(field_name: str) -> str:
    """A valid example value for a Settings field ('' when it has none)."""
    info = Settings.model_fields.get(field_name)
    examples = info.examples if info is not None else None
    return str(examples[0]) if examples else ""
