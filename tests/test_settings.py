"""Tests for proxy.config: value parsers, loading from a mapping, every error at once."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from proxy.config import (
    Address,
    InboundRoute,
    OutboundRoute,
    Settings,
    dials_itself,
    format_duration,
    format_port_list,
    format_routes,
    known_variables,
    listen_conflict,
    load_settings,
    parse_address,
    parse_bool,
    parse_ca_url,
    parse_cidrs,
    parse_duration,
    parse_fingerprint,
    parse_inbound,
    parse_int,
    parse_outbound,
    parse_port_list,
    redacted,
)
from proxy.errors import ConfigError, ConfigProblem
from proxy.identity import SpiffeId
from proxy.policy import parse_pattern

FP = "ab" * 32

# A complete, valid configuration that needs no files: the ca identity source.
BASE = {
    "MTLS_IDENTITY_SOURCE": "ca",
    "MTLS_CA_URL": "https://ca.internal:8443",
    "MTLS_CA_TOKEN": "s3cret-token",
    "MTLS_CA_FINGERPRINT": FP,
    "MTLS_IDENTITY": "spiffe://corp.example/ns/shop/sa/web",
    "MTLS_INBOUND": "0.0.0.0:8443=127.0.0.1:8080",
}


def load(**overrides: str) -> Settings:
    env = dict(BASE)
    env.update(overrides)
    return load_settings({k: v for k, v in env.items() if v != "<unset>"})


def problems_of(env: dict[str, str]) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    return info.value.problems


def load_problems(**overrides: str) -> list[ConfigProblem]:
    env = dict(BASE)
    env.update(overrides)
    return problems_of({k: v for k, v in env.items() if v != "<unset>"})


# ---------------------------------------------------------------------------------------
# Parsers
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", Address("127.0.0.1", 8080)),
        (":8443", Address("", 8443)),
        ("0.0.0.0:1", Address("0.0.0.0", 1)),
        ("[::1]:65535", Address("::1", 65535)),
        ("[2001:DB8:0::1]:80", Address("2001:db8::1", 80)),
        ("DB.Internal:8443", Address("db.internal", 8443)),
        ("  localhost:80  ", Address("localhost", 80)),
        ("my-svc.ns.svc.cluster.local:9", Address("my-svc.ns.svc.cluster.local", 9)),
        ("a" * 63 + ".b:1", Address("a" * 63 + ".b", 1)),
        ("1host:2", Address("1host", 2)),
    ],
)
def test_parse_address_good(text: str, expected: Address) -> None:
    assert parse_address(text) == expected
    assert parse_address(str(expected)) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("8080", "no ':PORT'"),
        ("host:", "port is missing"),
        ("host:0", "out of range (1-65535)"),
        ("host:65536", "out of range"),
        ("host:99999999999", "out of range"),
        ("host:-1", "not a number"),
        ("host:http", "not a number"),
        ("::1:80", "brackets"),
        ("[::1]80", "':PORT' after the ']'"),
        ("[::1:80", "never closes"),
        ("[zz::1]:80", "not a valid IPv6 address"),
        ("[127.0.0.1]:80", "not a valid IPv6 address"),
        ("999.0.0.1:80", "not a valid IPv4 address"),
        ("1.2.3:80", "not a valid IPv4 address"),
        ("bad_host:80", "invalid label 'bad_host'"),
        ("-bad:80", "invalid label"),
        ("bad-.x:80", "invalid label"),
        ("a..b:80", "empty label"),
        ("a" * 64 + ":80", "invalid label"),
        ("ünï.example:80", "non-ASCII"),
        (("a" * 60 + ".") * 5 + "com:80", "at most 253"),
    ],
)
def test_parse_address_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_address(text)
    assert fragment in str(info.value)


def test_parse_address_port_zero() -> None:
    assert parse_address("127.0.0.1:0", allow_zero=True) == Address("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"\(0-65535\)"):
        parse_address("127.0.0.1:70000", allow_zero=True)


def test_address_str() -> None:
    assert str(Address("", 80)) == ":80"
    assert str(Address("::", 80)) == "[::]:80"
    assert str(Address("h", 80)) == "h:80"
    assert Address("", 1).is_wildcard and Address("0.0.0.0", 1).is_wildcard
    assert not Address("127.0.0.1", 1).is_wildcard


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("24h", 86400.0),
        ("7d", 604800.0),
        ("500ms", 0.5),
        ("1h30m", 5400.0),
        ("1d2h3m4s5ms", 93784.005),
        ("30", 30.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        ("0.25", 0.25),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration_good(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("-5s", "negative"),
        ("-1", "negative"),
        ("5 s", "not a duration"),
        ("5sec", "not a duration"),
        ("1H", "not a duration"),
        ("h", "not a duration"),
        ("1.s", "not a duration"),
        ("inf", "not a duration"),
        ("nan", "not a duration"),
        ("1e3", "not a duration"),
        ("36501d", "longer than 100 years"),
        ("1" * 1001, "too long"),
    ],
)
def test_parse_duration_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(text)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (300.0, "5m"), (5400.0, "1h30m"), (0.5, "500ms"), (90061.5, "1d1h1m1s500ms")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_format_duration_rejects_negative() -> None:
    with pytest.raises(ValueError):
        format_duration(-1.0)
    with pytest.raises(ValueError):
        format_duration(float("nan"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        *[("true", True), ("TRUE", True), ("1", True), ("Yes", True)],
        *[("false", False), ("False", False), ("0", False), ("NO", False)],
    ],
)
def test_parse_bool(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "y", "on", "2", "truee"])
def test_parse_bool_bad(text: str) -> None:
    with pytest.raises(ValueError, match="expected true or false"):
        parse_bool(text)


def test_parse_int() -> None:
    assert parse_int(" 5 ", minimum=1, maximum=9) == 5
    with pytest.raises(ValueError, match="from 1 to 9, got 10"):
        parse_int("10", minimum=1, maximum=9)
    with pytest.raises(ValueError, match="at least 1"):
        parse_int("0", minimum=1)
    with pytest.raises(ValueError, match="whole number"):
        parse_int("1.5", minimum=1)


def test_port_lists() -> None:
    assert parse_port_list("") == []
    assert parse_port_list("443, 80,8000-8002,80") == [80, 443, 8000, 8001, 8002]
    assert format_port_list([8002, 80, 8000, 8001, 443]) == "80,443,8000-8002"
    for bad, fragment in [("0", "out of range"), ("10-5", "backwards"), ("a", "not a number")]:
        with pytest.raises(ValueError, match=fragment):
            parse_port_list(bad)


def test_cidrs() -> None:
    assert parse_cidrs("10.0.0.0/8, fd00::/8,169.254.169.254") == [
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
        ipaddress.ip_network("169.254.169.254/32"),
    ]
    with pytest.raises(ValueError, match=r"host bits set; did you mean 10\.0\.0\.0/8"):
        parse_cidrs("10.0.0.1/8")
    with pytest.raises(ValueError, match="not an IP network"):
        parse_cidrs("10.0.0.0/33")


def test_fingerprint() -> None:
    colons = ":".join(["AB"] * 32)
    assert parse_fingerprint(colons) == FP
    assert parse_fingerprint("sha256:" + FP.upper()) == FP
    with pytest.raises(ValueError, match="SHA-1"):
        parse_fingerprint("ab" * 20)
    with pytest.raises(ValueError, match="hex digits"):
        parse_fingerprint("zz" * 32)


def test_ca_url() -> None:
    assert parse_ca_url("https://ca.internal:8443/") == "https://ca.internal:8443"
    assert parse_ca_url("HTTPS://[::1]:8443") == "https://[::1]:8443"
    for bad, fragment in [
        ("http://ca:8443", "must start with https://"),
        ("ca:8443", "must start with https://"),
        ("https://ca", "no ':PORT'"),
        ("https://ca:8443/enrol", "without a path"),
        ("https://u@ca:8443", "without user info"),
        ("https://:8443", "no host"),
    ]:
        with pytest.raises(ValueError) as info:
            parse_ca_url(bad)
        assert fragment in str(info.value)


# ---------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------


def test_parse_inbound() -> None:
    routes = parse_inbound(" 0.0.0.0:8443=127.0.0.1:8080 , admin=:9443=[::1]:9090,")
    assert routes == [
        InboundRoute("8443", Address("0.0.0.0", 8443), Address("127.0.0.1", 8080)),
        InboundRoute("admin", Address("", 9443), Address("::1", 9090)),
    ]
    assert parse_inbound(format_routes(routes)) == routes
    assert parse_inbound("") == []
    assert parse_inbound("  ") == []


def test_parse_outbound() -> None:
    routes = parse_outbound(
        "127.0.0.1:15432=db.internal:8443@spiffe://corp.example/db,web=:0=web:443"
    )
    assert routes == [
        OutboundRoute(
            "15432",
            Address("127.0.0.1", 15432),
            Address("db.internal", 8443),
            SpiffeId("corp.example", "/db"),
        ),
        OutboundRoute("web", Address("", 0), Address("web", 443), None),
    ]
    assert str(routes[0]) == "15432=127.0.0.1:15432=db.internal:8443@spiffe://corp.example/db"
    assert parse_outbound(format_routes(routes)) == routes


@pytest.mark.parametrize(
    ("parse", "text", "fragment"),
    [
        (parse_inbound, "8443", "expected LISTEN=TARGET"),
        (parse_inbound, "a=b=c=d", "expected LISTEN=TARGET"),
        (parse_inbound, ":8443=127.0.0.1:0", "out of range (1-65535)"),
        (parse_inbound, ":8443=:8080", "needs a host"),
        (parse_inbound, "Bad=:8443=h:1", "route name 'Bad'"),
        (parse_inbound, ("x" * 33) + "=:8443=h:1", "route name"),
        (parse_inbound, ":8443=h:1,:8443=h:2", "two routes are named '8443'"),
        (parse_inbound, "a=:8443=h:1,b=127.0.0.1:8443=h:2", "both listen on port 8443"),
        (parse_inbound, "a=127.0.0.1:80=h:1,b=127.0.0.1:80=h:2", "both listen on port 80"),
        (parse_inbound, ":1=h:1,:2=h:x", "route ':2=h:x'"),
        (parse_outbound, ":1=h:1@", "nothing after '@'"),
        (parse_outbound, ":1=h:1@spiffe://TD/x", "upper-case"),
        (parse_outbound, ":1=h:0", "out of range"),
        (parse_outbound, ":1=:5", "needs a host"),
    ],
)
def test_routes_bad(parse: Any, text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse(text)
    assert fragment in str(info.value)


def test_route_errors_all_reported() -> None:
    with pytest.raises(ValueError) as info:
        parse_inbound(":1=h:0,:2=h:x")
    assert "route ':1=h:0'" in str(info.value)
    assert "route ':2=h:x'" in str(info.value)


def test_listen_conflict() -> None:
    assert listen_conflict(Address("", 1), Address("127.0.0.1", 1))
    assert listen_conflict(Address("a", 1), Address("a", 1))
    assert not listen_conflict(Address("a", 1), Address("b", 1))
    assert not listen_conflict(Address("a", 1), Address("a", 2))
    assert not listen_conflict(Address("", 0), Address("", 0))


# ---------------------------------------------------------------------------------------
# Loading settings
# ---------------------------------------------------------------------------------------


def test_defaults() -> None:
    s = load()
    assert s.identity_source == "ca"
    assert s.transparent is False
    assert (s.inbound_capture_port, s.outbound_capture_port, s.proxy_uid) == (15006, 15001, 1337)
    assert s.exclude_inbound_ports == [] and s.exclude_outbound_cidrs == []
    assert (s.inbound_mode, s.outbound_mode, s.min_tls_version) == ("strict", "strict", "1.3")
    assert s.plaintext_fallback_ttl == 300.0
    assert s.allow_peers == []
    assert s.admin_listen == Address("127.0.0.1", 15000)
    assert s.admin_allow_remote_drain is False
    assert s.workers == max(1, min(os.cpu_count() or 1, 256))
    assert (s.handshake_timeout, s.connect_timeout, s.idle_timeout, s.drain_timeout) == (
        10.0,
        5.0,
        3600.0,
        30.0,
    )
    assert s.max_connections == 10000
    assert (s.log_level, s.log_format, s.peer_identity_cap) == ("info", "json", 100)
    assert s.drop_privileges is False
    assert s.cert_file is None and s.trust_domain is None
    assert s.effective_trust_domain == "corp.example"
    assert s.outbound == []


GOOD_VALUES: list[tuple[str, str, str, object]] = [
    # variable, text, attribute, expected value
    ("MTLS_IDENTITY_SOURCE", "CA", "identity_source", "ca"),
    ("MTLS_CA_URL", "https://10.0.0.1:9443/", "ca_url", "https://10.0.0.1:9443"),
    ("MTLS_CA_FINGERPRINT", ":".join(["Ab"] * 32), "ca_fingerprint", FP),
    ("MTLS_IDENTITY", " spiffe://corp.example/x ", "identity", SpiffeId("corp.example", "/x")),
    ("MTLS_CA_TOKEN", "tok\n", "ca_token", SecretStr("tok")),
    ("MTLS_KEY_FILE", "/x/key.pem", "key_file", Path("/x/key.pem")),
    ("MTLS_TRUST_DOMAIN", "corp.example", "trust_domain", "corp.example"),
    ("MTLS_INBOUND", "", "inbound", []),
    ("MTLS_OUTBOUND", ":1=h:2", "outbound", [OutboundRoute("1", Address("", 1), Address("h", 2))]),
    ("MTLS_TRANSPARENT", "yes", "transparent", True),
    ("MTLS_INBOUND_CAPTURE_PORT", "16006", "inbound_capture_port", 16006),
    ("MTLS_OUTBOUND_CAPTURE_PORT", "16001", "outbound_capture_port", 16001),
    ("MTLS_PROXY_UID", "0", "proxy_uid", 0),
    ("MTLS_EXCLUDE_INBOUND_PORTS", "22,9000-9001", "exclude_inbound_ports", [22, 9000, 9001]),
    ("MTLS_EXCLUDE_OUTBOUND_PORTS", "53", "exclude_outbound_ports", [53]),
    (
        "MTLS_EXCLUDE_OUTBOUND_CIDRS",
        "10.0.0.0/8",
        "exclude_outbound_cidrs",
        [ipaddress.ip_network("10.0.0.0/8")],
    ),
    ("MTLS_INBOUND_MODE", "Audit", "inbound_mode", "audit"),
    ("MTLS_INBOUND_MODE", "permissive", "inbound_mode", "permissive"),
    ("MTLS_OUTBOUND_MODE", "permissive", "outbound_mode", "permissive"),
    ("MTLS_PLAINTEXT_FALLBACK_TTL", "0", "plaintext_fallback_ttl", 0.0),
    ("MTLS_ALLOW_PEERS", "spiffe://td/*", "allow_peers", [parse_pattern("spiffe://td/*")]),
    ("MTLS_MIN_TLS_VERSION", "1.2", "min_tls_version", "1.2"),
    ("MTLS_ADMIN_LISTEN", ":0", "admin_listen", Address("", 0)),
    ("MTLS_ADMIN_ALLOW_REMOTE_DRAIN", "true", "admin_allow_remote_drain", True),
    ("MTLS_WORKERS", "256", "workers", 256),
    ("MTLS_HANDSHAKE_TIMEOUT", "500ms", "handshake_timeout", 0.5),
    ("MTLS_CONNECT_TIMEOUT", "2", "connect_timeout", 2.0),
    ("MTLS_IDLE_TIMEOUT", "0", "idle_timeout", 0.0),
    ("MTLS_DRAIN_TIMEOUT", "1m", "drain_timeout", 60.0),
    ("MTLS_MAX_CONNECTIONS", "1", "max_connections", 1),
    ("MTLS_LOG_LEVEL", "DEBUG", "log_level", "debug"),
    ("MTLS_LOG_FORMAT", "text", "log_format", "text"),
    ("MTLS_PEER_IDENTITY_CAP", "0", "peer_identity_cap", 0),
    ("MTLS_DROP_PRIVILEGES", "1", "drop_privileges", True),
    ("MTLS_LOG_LEVEL", "   ", "log_level", "info"),  # blank means unset
]


@pytest.mark.parametrize(("var", "text", "attr", "expected"), GOOD_VALUES)
def test_good_values(var: str, text: str, attr: str, expected: object) -> None:
    overrides = {var: text}
    if var in ("MTLS_INBOUND", "MTLS_OUTBOUND"):
        overrides["MTLS_TRANSPARENT"] = "true"
    assert getattr(load(**overrides), attr) == expected


BAD_VALUES: list[tuple[str, str, str]] = [
    # variable, text, fragment of the message
    ("MTLS_IDENTITY_SOURCE", "file", "must be one of files, ca, spiffe; got 'file'"),
    ("MTLS_CA_URL", "http://ca:1", "https://"),
    ("MTLS_CA_FINGERPRINT", "abc", "64 hex digits"),
    ("MTLS_IDENTITY", "corp.example/x", "does not start with 'spiffe://'"),
    ("MTLS_TRUST_DOMAIN", "Corp.example", "upper-case"),
    ("MTLS_TRUST_DOMAIN", "spiffe://corp.example", "bare trust domain"),
    ("MTLS_INBOUND", "8443=8080", "no ':PORT'"),
    ("MTLS_OUTBOUND", ":1=h:2@x", "spiffe://"),
    ("MTLS_TRANSPARENT", "maybe", "expected true or false"),
    ("MTLS_INBOUND_CAPTURE_PORT", "0", "from 1 to 65535"),
    ("MTLS_OUTBOUND_CAPTURE_PORT", "x", "whole number"),
    ("MTLS_PROXY_UID", "-1", "from 0 to"),
    ("MTLS_EXCLUDE_INBOUND_PORTS", "22,x", "not a number"),
    ("MTLS_EXCLUDE_OUTBOUND_PORTS", "70000", "out of range"),
    ("MTLS_EXCLUDE_OUTBOUND_CIDRS", "10.0.0.0/33", "not an IP network"),
    ("MTLS_INBOUND_MODE", "lenient", "strict, permissive, audit"),
    ("MTLS_OUTBOUND_MODE", "audit", "strict, permissive"),
    ("MTLS_PLAINTEXT_FALLBACK_TTL", "5 minutes", "not a duration"),
    ("MTLS_ALLOW_PEERS", "spiffe://*/x", "wildcard"),
    ("MTLS_MIN_TLS_VERSION", "1.1", "1.2, 1.3"),
    ("MTLS_ADMIN_LISTEN", "15000", "no ':PORT'"),
    ("MTLS_ADMIN_ALLOW_REMOTE_DRAIN", "sure", "expected true or false"),
    ("MTLS_WORKERS", "0", "from 1 to 256"),
    ("MTLS_WORKERS", "257", "from 1 to 256"),
    ("MTLS_HANDSHAKE_TIMEOUT", "0", "longer than 0"),
    ("MTLS_CONNECT_TIMEOUT", "-1s", "negative"),
    ("MTLS_IDLE_TIMEOUT", "forever", "not a duration"),
    ("MTLS_DRAIN_TIMEOUT", "1y", "not a duration"),
    ("MTLS_MAX_CONNECTIONS", "0", "at least 1"),
    ("MTLS_LOG_LEVEL", "trace", "debug, info, warning, error"),
    ("MTLS_LOG_FORMAT", "xml", "json, text"),
    ("MTLS_PEER_IDENTITY_CAP", "-5", "at least 0"),
    ("MTLS_DROP_PRIVILEGES", "2", "expected true or false"),
]


@pytest.mark.parametrize(("var", "text", "fragment"), BAD_VALUES)
def test_bad_values(var: str, text: str, fragment: str) -> None:
    problems = load_problems(**{var: text})
    assert [p.var for p in problems] == [var]
    assert fragment in problems[0].message
    assert problems[0].example, "every problem carries a correct example"
    field = var.removeprefix("MTLS_").lower()
    if field not in ("identity_source",):  # its example is valid on its own
        load(**{var: problems[0].example, "MTLS_TRANSPARENT": "true"})


def test_all_errors_at_once() -> None:
    problems = problems_of(
        {
            "MTLS_WORKERS": "zero",
            "MTLS_IDLE_TIMEOUT": "-1",
            "MTLS_LOG_FORMAT": "xml",
            "MTLS_INBOUNDS": ":1=h:1",
            "MTLS_KEY_FILE": "/nonexistent/key.pem",
        }
    )
    by_var = {p.var: p.message for p in problems}
    assert set(by_var) == {
        "MTLS_WORKERS",
        "MTLS_IDLE_TIMEOUT",
        "MTLS_LOG_FORMAT",
        "MTLS_INBOUNDS",
        "MTLS_CERT_FILE",
        "MTLS_KEY_FILE",
        "MTLS_TRUST_BUNDLE_FILE",
        "MTLS_INBOUND",
    }
    assert by_var["MTLS_CERT_FILE"] == "required when MTLS_IDENTITY_SOURCE=files"
    assert by_var["MTLS_KEY_FILE"] == "/nonexistent/key.pem does not exist"
    assert by_var["MTLS_INBOUND"].startswith("nothing to do")
    assert by_var["MTLS_INBOUNDS"] == "unknown variable; did you mean MTLS_INBOUND?"
    with pytest.raises(ConfigError) as info:
        load_settings({"MTLS_WORKERS": "zero"})
    assert "MTLS_WORKERS: expected a whole number, got 'zero' (example: MTLS_WORKERS=" in str(
        info.value
    )


def test_bad_value_suppresses_dependent_cross_checks() -> None:
    # A malformed MTLS_INBOUND must not also be called "nothing to do".
    problems = load_problems(MTLS_INBOUND="garbage")
    assert [p.var for p in problems] == ["MTLS_INBOUND"]
    assert "nothing to do" not in problems[0].message
    # A bad source is one problem, not also "CERT_FILE required".
    assert [p.var for p in load_problems(MTLS_IDENTITY_SOURCE="x")] == ["MTLS_IDENTITY_SOURCE"]


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"MTLS_INBOUNDS": "x"}, "unknown variable; did you mean MTLS_INBOUND?"),
        ({"MTLS_LOGLEVEL": "x"}, "did you mean MTLS_LOG_LEVEL?"),
        ({"MTLS_CA_FINGERPRNT": "x"}, "did you mean MTLS_CA_FINGERPRINT?"),
        ({"mtls_workers": "2"}, "names are upper-case: did you mean MTLS_WORKERS?"),
        ({"MTLS_QQQQQQQQQQQQQQQ": "x"}, "unknown variable (MTLS_* names are reserved"),
    ],
)
def test_unknown_variables(env: dict[str, str], fragment: str) -> None:
    problems = problems_of({**BASE, **env})
    assert len(problems) == 1
    assert problems[0].var == next(iter(env))
    assert fragment in problems[0].message


def test_kubernetes_service_link_variables_are_not_typos() -> None:
    # Every pod of a namespace with a Service named mtls-ca gets these (enableServiceLinks,
    # on by default): the sidecar must start there (the demo namespace has that Service).
    links = {
        "MTLS_CA_SERVICE_HOST": "10.96.0.12",
        "MTLS_CA_SERVICE_PORT": "8443",
        "MTLS_CA_SERVICE_PORT_HTTPS": "8443",
        "MTLS_CA_PORT": "tcp://10.96.0.12:8443",
        "MTLS_CA_PORT_8443_TCP": "tcp://10.96.0.12:8443",
        "MTLS_CA_PORT_8443_TCP_PROTO": "tcp",
        "MTLS_CA_PORT_8443_TCP_PORT": "8443",
        "MTLS_CA_PORT_8443_TCP_ADDR": "10.96.0.12",
        "MTLS_INJECTOR_PORT_443_UDP": "udp://10.96.0.13:443",
    }
    load_settings({**BASE, **links})
    # A _PORT that is not a link's tcp://host:port is still a typo.
    assert [p.var for p in problems_of({**BASE, "MTLS_ADMIN_PORT": "15000"})] == ["MTLS_ADMIN_PORT"]


def test_unrelated_and_extra_known_variables_pass() -> None:
    load_settings({**BASE, "PATH": "/bin", "HOME": "/root", "XMTLS_FOO": "1"})
    load_settings({**BASE, "MTLS_CA_DIR": "/x"}, also_known={"MTLS_CA_DIR"})
    assert "MTLS_INBOUND" in known_variables()
    assert len(known_variables()) == len(Settings.model_fields)


def test_process_environment_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MTLS_WORKERS", "not-a-number")
    monkeypatch.setenv("MTLS_LOG_LEVEL", "debug")
    assert load_settings(BASE).log_level == "info"


def test_files_source(tmp_path: Path) -> None:
    paths = {}
    for name in ("cert", "key", "bundle"):
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_text("x")
    env = {
        "MTLS_CERT_FILE": str(paths["cert"]),
        "MTLS_KEY_FILE": str(paths["key"]),
        "MTLS_TRUST_BUNDLE_FILE": str(paths["bundle"]),
        "MTLS_TRANSPARENT": "true",
    }
    s = load_settings(env)
    assert s.identity_source == "files"
    assert s.cert_file == paths["cert"]
    assert s.effective_trust_domain is None

    problems = problems_of({**env, "MTLS_KEY_FILE": str(tmp_path)})
    assert [(p.var, p.message) for p in problems] == [
        ("MTLS_KEY_FILE", f"{tmp_path} is not a regular file")
    ]
    if os.getuid() != 0:  # root reads everything
        paths["bundle"].chmod(0)
        problems = problems_of(env)
        assert [p.var for p in problems] == ["MTLS_TRUST_BUNDLE_FILE"]
        assert "not readable" in problems[0].message


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"MTLS_CA_URL": "<unset>", "MTLS_IDENTITY": "<unset>"},
            [
                ("MTLS_CA_URL", "required when MTLS_IDENTITY_SOURCE=ca"),
                ("MTLS_IDENTITY", "required when MTLS_IDENTITY_SOURCE=ca"),
            ],
        ),
        (
            {"MTLS_CA_FINGERPRINT": "<unset>"},
            [("MTLS_CA_FINGERPRINT", "required when MTLS_IDENTITY_SOURCE=ca")],
        ),
        (
            {"MTLS_CA_TOKEN": "<unset>"},
            [
                (
                    "MTLS_CA_TOKEN",
                    "MTLS_IDENTITY_SOURCE=ca needs MTLS_CA_TOKEN or MTLS_CA_TOKEN_FILE",
                )
            ],
        ),
        (
            {"MTLS_CA_TOKEN_FILE": "/nonexistent/token"},
            [
                ("MTLS_CA_TOKEN", "set only one of MTLS_CA_TOKEN and MTLS_CA_TOKEN_FILE"),
                ("MTLS_CA_TOKEN_FILE", "/nonexistent/token does not exist"),
            ],
        ),
        (
            {"MTLS_TRUST_DOMAIN": "other.example"},
            [
                (
                    "MTLS_TRUST_DOMAIN",
                    "is other.example but MTLS_IDENTITY spiffe://corp.example/ns/shop/sa/web "
                    "is in trust domain corp.example",
                )
            ],
        ),
        (
            {"MTLS_INBOUND": "<unset>"},
            [
                (
                    "MTLS_INBOUND",
                    "nothing to do: set MTLS_INBOUND, MTLS_OUTBOUND or MTLS_TRANSPARENT=true",
                )
            ],
        ),
        (
            {"MTLS_OUTBOUND": "o=127.0.0.1:8443=db:1"},
            [
                (
                    "MTLS_OUTBOUND",
                    "route 'o' listens on 127.0.0.1:8443, which collides with "
                    "MTLS_INBOUND route '8443' on 0.0.0.0:8443",
                )
            ],
        ),
        (
            {"MTLS_TRANSPARENT": "true", "MTLS_OUTBOUND_CAPTURE_PORT": "15006"},
            [
                (
                    "MTLS_OUTBOUND_CAPTURE_PORT",
                    "must differ from MTLS_INBOUND_CAPTURE_PORT (both 15006)",
                )
            ],
        ),
        (
            {"MTLS_TRANSPARENT": "true", "MTLS_INBOUND_CAPTURE_PORT": "8443"},
            [
                (
                    "MTLS_INBOUND_CAPTURE_PORT",
                    "port 8443 collides with MTLS_INBOUND route '8443' listening on 0.0.0.0:8443",
                )
            ],
        ),
        (
            {"MTLS_TRANSPARENT": "true", "MTLS_ADMIN_LISTEN": "127.0.0.1:15001"},
            [
                (
                    "MTLS_ADMIN_LISTEN",
                    "127.0.0.1:15001 collides with MTLS_OUTBOUND_CAPTURE_PORT listening on :15001",
                )
            ],
        ),
        (
            {"MTLS_ADMIN_LISTEN": "127.0.0.1:8443"},
            [
                (
                    "MTLS_ADMIN_LISTEN",
                    "127.0.0.1:8443 collides with MTLS_INBOUND route '8443' listening on "
                    "0.0.0.0:8443",
                )
            ],
        ),
    ],
)
def test_cross_field_problems(overrides: dict[str, str], expected: list[tuple[str, str]]) -> None:
    problems = load_problems(**overrides)
    assert [(p.var, p.message) for p in problems] == expected
    assert all(p.example for p in problems)


def test_capture_ports_only_checked_when_transparent() -> None:
    s = load(MTLS_OUTBOUND_CAPTURE_PORT="15006", MTLS_INBOUND_CAPTURE_PORT="15006")
    assert s.inbound_capture_port == s.outbound_capture_port == 15006


def test_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    s = load(MTLS_CA_TOKEN="<unset>", MTLS_CA_TOKEN_FILE=str(token))
    assert s.ca_token_file == token and s.ca_token is None


def test_redacted() -> None:
    s = load(
        MTLS_OUTBOUND="db=127.0.0.1:5432=db:8443@spiffe://corp.example/db",
        MTLS_EXCLUDE_OUTBOUND_PORTS="53,8000-8002",
        MTLS_EXCLUDE_OUTBOUND_CIDRS="10.0.0.0/8",
        MTLS_ALLOW_PEERS="spiffe://corp.example/**",
    )
    out = redacted(s)
    json.dumps(out)  # JSON-able
    assert out["MTLS_CA_TOKEN"] == "***"
    assert "s3cret-token" not in json.dumps(out)
    assert "s3cret-token" not in repr(s)
    assert s.ca_token is not None and s.ca_token.get_secret_value() == "s3cret-token"
    assert out["MTLS_IDENTITY"] == "spiffe://corp.example/ns/shop/sa/web"
    assert out["MTLS_TRUST_DOMAIN"] == "corp.example"
    assert out["MTLS_INBOUND"] == ["8443=0.0.0.0:8443=127.0.0.1:8080"]
    assert out["MTLS_OUTBOUND"] == ["db=127.0.0.1:5432=db:8443@spiffe://corp.example/db"]
    assert out["MTLS_EXCLUDE_OUTBOUND_PORTS"] == "53,8000-8002"
    assert out["MTLS_EXCLUDE_OUTBOUND_CIDRS"] == ["10.0.0.0/8"]
    assert out["MTLS_ALLOW_PEERS"] == ["spiffe://corp.example/**"]
    assert out["MTLS_PLAINTEXT_FALLBACK_TTL"] == "5m"
    assert out["MTLS_IDLE_TIMEOUT"] == "1h"
    assert out["MTLS_ADMIN_LISTEN"] == "127.0.0.1:15000"
    assert out["MTLS_TRANSPARENT"] is False
    assert out["MTLS_MAX_CONNECTIONS"] == 10000
    assert out["MTLS_CERT_FILE"] is None
    assert set(out) == set(known_variables())


def test_redacted_round_trips_through_load() -> None:
    """The redacted view, turned back into env text, loads to the same settings (but for
    the secret)."""
    s = load(MTLS_ALLOW_PEERS="spiffe://corp.example/**", MTLS_EXCLUDE_INBOUND_PORTS="22")
    env: dict[str, str] = {}
    for var, value in redacted(s).items():
        if value is None:
            continue
        if isinstance(value, list):
            env[var] = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            env[var] = str(value).lower()
        else:
            env[var] = str(value)
    env["MTLS_CA_TOKEN"] = "s3cret-token"
    again = load_settings(env)
    assert redacted(again) == redacted(s)
    assert again.model_copy(update={"trust_domain": None}) == s


def test_settings_are_frozen() -> None:
    s = load()
    with pytest.raises(ValueError):
        s.workers = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("listen", "remote", "loops"),
    [
        ("127.0.0.1:28601", "127.0.0.1:28601", True),
        ("127.0.0.1:28601", "localhost:28601", True),
        ("localhost:28601", "127.0.0.1:28601", True),
        ("127.0.0.1:28601", "0.0.0.0:28601", True),
        (":8443", "127.0.0.1:8443", True),
        (":8443", "[::1]:8443", True),
        (":8443", "localhost:8443", True),
        ("[::]:8443", "127.0.0.1:8443", True),
        ("0.0.0.0:8443", "127.0.0.5:8443", True),
        ("0.0.0.0:8443", "[::1]:8443", False),  # an IPv4-only listener
        ("10.0.0.5:80", "10.0.0.5:80", True),
        ("db.local:80", "DB.local:80", True),
        ("127.0.0.1:28601", "127.0.0.1:28602", False),
        ("127.0.0.1:80", "127.0.0.2:80", False),
        ("127.0.0.1:80", "[::1]:80", False),
        ("10.0.0.5:80", "localhost:80", False),
        (":8443", "db.internal:8443", False),
        (":0", "127.0.0.1:0", False),  # port 0: picked at bind time, unknown here
        # IPv4-mapped IPv6 reaches the IPv4 address it carries (issue 22, defect 3).
        ("127.0.0.1:28601", "[::ffff:127.0.0.1]:28601", True),
        ("0.0.0.0:8443", "[::ffff:127.0.0.1]:8443", True),
        (":8443", "[::ffff:127.0.0.1]:8443", True),
        ("[::ffff:127.0.0.1]:8443", "127.0.0.1:8443", True),
        ("127.0.0.1:8443", "[::ffff:0.0.0.0]:8443", True),
        ("10.0.0.5:80", "[::ffff:10.0.0.5]:80", True),
        ("127.0.0.1:80", "[::ffff:127.0.0.2]:80", False),
        ("127.0.0.1:80", "[2002:7f00:1::]:80", False),  # 6to4: routed to a relay, not here
    ],
)
def test_dials_itself(listen: str, remote: str, loops: bool) -> None:
    listen_address = parse_address(listen, allow_zero=True)
    remote_address = parse_address(remote, allow_zero=True)
    assert dials_itself(listen_address, remote_address) is loops


def test_hairpin_through_our_own_inbound_listener_is_allowed() -> None:
    """Outbound to our own inbound listener ends at the app: finite, not a loop."""
    env = {**BASE, "MTLS_OUTBOUND": "o=127.0.0.1:15432=localhost:8443"}
    assert load_settings(env).outbound[0].remote.port == 8443


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"MTLS_INBOUND": "<unset>", "MTLS_OUTBOUND": "lp=127.0.0.1:28601=127.0.0.1:28601"},
            [
                (
                    "MTLS_OUTBOUND",
                    "route 'lp' dials 127.0.0.1:28601, which is this sidecar's own listener "
                    "(MTLS_OUTBOUND route 'lp' on 127.0.0.1:28601): every connection would "
                    "loop back into the sidecar",
                )
            ],
        ),
        (
            {
                "MTLS_INBOUND": "<unset>",
                "MTLS_OUTBOUND": "lp=127.0.0.1:28601=[::ffff:127.0.0.1]:28601",
            },
            [
                (
                    "MTLS_OUTBOUND",
                    "route 'lp' dials [::ffff:7f00:1]:28601, which is this sidecar's own "
                    "listener (MTLS_OUTBOUND route 'lp' on 127.0.0.1:28601): every connection "
                    "would loop back into the sidecar",
                )
            ],
        ),
        (
            {
                "MTLS_INBOUND": "a=127.0.0.1:7001=127.0.0.1:7002",
                "MTLS_OUTBOUND": "b=127.0.0.1:7002=127.0.0.1:7001",
            },
            [
                (
                    "MTLS_INBOUND",
                    "route 'a' forwards to 127.0.0.1:7002, which is this sidecar's own "
                    "listener (MTLS_OUTBOUND route 'b' on 127.0.0.1:7002): every connection "
                    "would loop back into the sidecar",
                ),
                (
                    "MTLS_OUTBOUND",
                    "route 'b' dials 127.0.0.1:7001, which is this sidecar's own listener "
                    "(MTLS_INBOUND route 'a' on 127.0.0.1:7001): every connection would "
                    "loop back into the sidecar",
                ),
            ],
        ),
        (
            {"MTLS_INBOUND": "web=:8443=127.0.0.1:8443"},
            [
                (
                    "MTLS_INBOUND",
                    "route 'web' forwards to 127.0.0.1:8443, which is this sidecar's own "
                    "listener (MTLS_INBOUND route 'web' on :8443): every connection would "
                    "loop back into the sidecar",
                )
            ],
        ),
        (
            {"MTLS_TRANSPARENT": "true", "MTLS_OUTBOUND": "o=127.0.0.1:1=127.0.0.1:15001"},
            [
                (
                    "MTLS_OUTBOUND",
                    "route 'o' dials 127.0.0.1:15001, which is this sidecar's own listener "
                    "(MTLS_OUTBOUND_CAPTURE_PORT on :15001): every connection would loop back "
                    "into the sidecar",
                )
            ],
        ),
    ],
)
def test_loop_routes_refused(overrides: dict[str, str], expected: list[tuple[str, str]]) -> None:
    problems = load_problems(**overrides)
    assert [(p.var, p.message) for p in problems] == expected
    assert all(p.example for p in problems)


def test_routes_to_other_ports_and_hosts_are_no_loop() -> None:
    s = load(
        MTLS_INBOUND="web=0.0.0.0:8443=127.0.0.1:8080",
        MTLS_OUTBOUND="db=127.0.0.1:15432=db.internal:8443,lo=127.0.0.1:15433=127.0.0.1:15434",
    )
    assert [r.name for r in s.outbound] == ["db", "lo"]


# --- HBONE ------------------------------------------------------------------------------


def test_hbone_listen_default_off_explicit_on_transparent() -> None:
    assert load().hbone_address is None
    assert str(load(MTLS_TRANSPARENT="true").hbone_address) == ":15008"
    assert load(MTLS_TRANSPARENT="true", MTLS_HBONE_LISTEN="off").hbone_address is None
    assert str(load(MTLS_HBONE_LISTEN="127.0.0.1:17008").hbone_address) == "127.0.0.1:17008"
    assert redacted(load(MTLS_HBONE_LISTEN="off"))["MTLS_HBONE_LISTEN"] == "off"


def test_hbone_listen_collision_is_reported() -> None:
    (p,) = load_problems(MTLS_HBONE_LISTEN="0.0.0.0:8443")
    assert p.var == "MTLS_HBONE_LISTEN" and "collides" in p.message


def test_hbone_outbound_parsed_and_shown() -> None:
    s = load(
        MTLS_TRANSPARENT="true",
        MTLS_OUTBOUND="db=127.0.0.1:15432=db.internal:5432",
        MTLS_HBONE_OUTBOUND="db, 10.8.0.0/16, 8080, 9000-9002, fd00::/8",
    )
    h = s.hbone_outbound
    assert h.routes == {"db"} and h.ports == {8080, 9000, 9001, 9002}
    assert h.matches("10.8.1.2", 1) and h.matches("fd00::5", 1) and h.matches("10.9.0.1", 9001)
    assert not h.matches("10.9.0.1", 80)
    assert redacted(s)["MTLS_HBONE_OUTBOUND"] == "db,10.8.0.0/16,fd00::/8,8080,9000-9002"


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"MTLS_HBONE_OUTBOUND": "nosuch"}, "no outbound route named nosuch"),
        ({"MTLS_HBONE_OUTBOUND": "10.0.0.0/8"}, "transparent mode only"),
        ({"MTLS_HBONE_OUTBOUND": "a b"}, "neither an outbound route name"),
        ({"MTLS_HBONE_OUTBOUND": "10.0.0.1/8"}, "host bits"),
        ({"MTLS_HBONE_PORT": "0"}, ""),
    ],
)
def test_hbone_outbound_errors(env: dict[str, str], words: str) -> None:
    (p,) = load_problems(**env)
    assert p.var in ("MTLS_HBONE_OUTBOUND", "MTLS_HBONE_PORT") and words in p.message


def test_routes_dial_hbone_where_told() -> None:
    from proxy.routes import routes_for

    s = load(
        MTLS_TRANSPARENT="true",
        MTLS_OUTBOUND="db=127.0.0.1:15432=db.internal:5432,cache=127.0.0.1:16379=cache:6379",
        MTLS_HBONE_OUTBOUND="db,10.8.0.0/16",
        MTLS_HBONE_PORT="16008",
    )
    by_name = {r.name: r for r in routes_for(s) if r.direction == "outbound"}
    assert by_name["db"].dials_hbone("db.internal", 5432) and by_name["db"].hbone_port == 16008
    assert not by_name["cache"].dials_hbone("10.8.0.1", 6379)  # a named route is by name
    capture = by_name["15001"]
    assert capture.dials_hbone("10.8.0.1", 80) and not capture.dials_hbone("10.9.0.1", 80)
    hbone = [r for r in routes_for(s) if r.hbone]
    assert len(hbone) == 1 and hbone[0].listen.port == 15008 and hbone[0].mode == "strict"
