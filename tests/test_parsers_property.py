"""Property tests for every parser in settings, identity and policy: round trips, and
arbitrary text never raises anything but ValueError (or ConfigError from load_settings)."""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import (
    MAX_DURATION,
    Address,
    InboundRoute,
    OutboundRoute,
    Settings,
    env_var,
    format_duration,
    format_port_list,
    format_routes,
    load_settings,
    parse_address,
    parse_bool,
    parse_ca_url,
    parse_cidrs,
    parse_duration,
    parse_fingerprint,
    parse_inbound,
    parse_outbound,
    parse_path,
    parse_port_list,
)
from proxy.errors import ConfigError
from proxy.identity import SpiffeId, parse_spiffe_id, parse_trust_domain
from proxy.policy import InboundPolicy, parse_pattern, parse_patterns

# Shared CI machines are noisy: no per-example deadline, keep the example counts modest.
relaxed = settings(deadline=None)

# --- strategies --------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
labels = st.builds(
    lambda first, middle, last: first + middle + last,
    st.sampled_from("abcxyz"),
    st.text(_ALNUM + "-", max_size=12),
    st.text(_ALNUM, max_size=1),
).filter(lambda label: not label.endswith("-"))
hostnames = st.lists(labels, min_size=1, max_size=4).map(".".join)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
hosts = st.one_of(hostnames, ipv4, ipv6, st.just(""))
ports = st.integers(min_value=1, max_value=65535)
addresses = st.builds(Address, hosts, ports)
remote_addresses = st.builds(Address, st.one_of(hostnames, ipv4, ipv6), ports)

trust_domains = st.text(_ALNUM + "._-", min_size=1, max_size=40)
segments = st.text(_ALNUM + "ABCXYZ._-", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(segments, max_size=6).map(lambda segs: "".join("/" + s for s in segs))
spiffe_ids = st.builds(SpiffeId, trust_domains, paths)

pattern_segments = st.one_of(segments, st.just("*"))


@st.composite
def pattern_texts(draw: st.DrawFn) -> str:
    """Valid pattern texts: literal and '*' segments, maybe a final '**'."""
    segs = draw(st.lists(pattern_segments, max_size=5))
    if draw(st.booleans()):
        segs.append("**")
    return f"spiffe://{draw(trust_domains)}" + "".join("/" + s for s in segs)


route_names = st.text(_ALNUM + "_-", min_size=1, max_size=32)

# Text that is likely to reach deep into the parsers, and text that is anything at all.
parser_alphabet = st.sampled_from(list("spiffe:/[]=,@.*-_09azAZ%?#: \t\0é"))
nasty_text = st.one_of(st.text(), st.text(parser_alphabet, max_size=60))


# --- round trips ---------------------------------------------------------------------------


@relaxed
@given(addresses)
def test_address_round_trip(address: Address) -> None:
    assert parse_address(str(address)) == address


@relaxed
@given(st.floats(min_value=0, max_value=MAX_DURATION, allow_nan=False))
def test_duration_round_trip(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@relaxed
@given(
    st.integers(0, 100),
    st.integers(0, 23),
    st.integers(0, 59),
    st.integers(0, 59),
    st.integers(0, 999),
)
def test_duration_components(d: int, h: int, m: int, s: int, ms: int) -> None:
    text = f"{d}d{h}h{m}m{s}s{ms}ms"
    expected = d * 86400 + h * 3600 + m * 60 + s + ms / 1000
    assert abs(parse_duration(text) - expected) < 1e-6
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)


@relaxed
@given(spiffe_ids)
def test_spiffe_id_round_trip(sid: SpiffeId) -> None:
    assert parse_spiffe_id(str(sid)) == sid
    assert parse_spiffe_id(str(sid).replace("spiffe", "SPIFFE", 1)) == sid
    assert parse_trust_domain(sid.trust_domain) == sid.trust_domain


@relaxed
@given(pattern_texts())
def test_pattern_round_trip(text: str) -> None:
    pattern = parse_pattern(text)
    assert str(pattern) == text
    assert parse_pattern(str(pattern)) == pattern


def reference_match(pattern: str, sid: SpiffeId) -> bool:
    """A slow, obviously right matcher to compare the compiled one against."""
    head = "spiffe://" + sid.trust_domain
    if not (pattern == head or pattern.startswith(head + "/")):
        return False
    want = [s for s in pattern[len(head) :].split("/") if s]
    have = [s for s in sid.path.split("/") if s]
    for index, segment in enumerate(want):
        if segment == "**":
            return True
        if index >= len(have) or (segment != "*" and segment != have[index]):
            return False
    return len(want) == len(have)


@relaxed
@given(pattern_texts(), spiffe_ids)
def test_pattern_matches_like_reference(text: str, sid: SpiffeId) -> None:
    pattern = parse_pattern(text)
    assert pattern.matches(sid) == reference_match(text, sid)
    assert InboundPolicy([pattern], "x").allows(sid) == reference_match(text, sid)


@relaxed
@given(spiffe_ids)
def test_literal_pattern_matches_itself(sid: SpiffeId) -> None:
    assert parse_pattern(str(sid)).matches(sid)
    assert parse_pattern(f"{sid}/**").matches(sid)


@st.composite
def inbound_routes(draw: st.DrawFn) -> list[InboundRoute]:
    listen_ports = draw(st.lists(ports, unique=True, max_size=5))
    names = draw(st.lists(route_names, unique=True, min_size=len(listen_ports)))
    return [
        InboundRoute(name, Address(draw(hosts), port), draw(remote_addresses))
        for name, port in zip(names, listen_ports, strict=False)
    ]


@st.composite
def outbound_routes(draw: st.DrawFn) -> list[OutboundRoute]:
    listen_ports = draw(st.lists(ports, unique=True, max_size=5))
    names = draw(st.lists(route_names, unique=True, min_size=len(listen_ports)))
    return [
        OutboundRoute(
            name,
            Address(draw(hosts), port),
            draw(remote_addresses),
            draw(st.none() | spiffe_ids),
        )
        for name, port in zip(names, listen_ports, strict=False)
    ]


@relaxed
@given(inbound_routes())
def test_inbound_round_trip(routes: list[InboundRoute]) -> None:
    assert parse_inbound(format_routes(routes)) == routes


@relaxed
@given(outbound_routes())
def test_outbound_round_trip(routes: list[OutboundRoute]) -> None:
    assert parse_outbound(format_routes(routes)) == routes


@relaxed
@given(st.lists(ports, max_size=20))
def test_port_list_round_trip(values: list[int]) -> None:
    assert parse_port_list(format_port_list(values)) == sorted(set(values))


@relaxed
@given(st.lists(st.ip_addresses(), max_size=5), st.integers(0, 32))
def test_cidrs_round_trip(addresses_: list[Any], prefix: int) -> None:
    networks = [
        ipaddress.ip_network(f"{a}/{min(prefix, a.max_prefixlen)}", strict=False)
        for a in addresses_
    ]
    assert parse_cidrs(",".join(str(n) for n in networks)) == networks


@relaxed
@given(st.binary(min_size=32, max_size=32), st.booleans())
def test_fingerprint_round_trip(digest: bytes, colons: bool) -> None:
    text = (":" if colons else "").join(f"{b:02X}" for b in digest)
    assert parse_fingerprint(text) == digest.hex()


# --- arbitrary text ------------------------------------------------------------------------

PARSERS: list[Callable[[str], object]] = [
    parse_address,
    lambda t: parse_address(t, allow_zero=True),
    parse_duration,
    parse_spiffe_id,
    parse_trust_domain,
    parse_pattern,
    parse_patterns,
    parse_inbound,
    parse_outbound,
    parse_port_list,
    parse_cidrs,
    parse_fingerprint,
    parse_ca_url,
    parse_bool,
    parse_path,
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PARSERS), nasty_text)
def test_parsers_only_raise_value_error(parse: Callable[[str], object], text: str) -> None:
    try:
        parse(text)
    except ValueError as exc:
        assert str(exc), "every error has a message"


@relaxed
@given(spiffe_ids, nasty_text)
def test_mangled_routes_only_raise_value_error(sid: SpiffeId, junk: str) -> None:
    for parse in (parse_inbound, parse_outbound):
        with contextlib.suppress(ValueError):
            parse(f":1=h:2@{sid}{junk}")


_VARS = [env_var(name) for name in Settings.model_fields]


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(_VARS), st.from_regex(r"MTLS_[A-Z_]{1,12}", fullmatch=True)),
        nasty_text,
        max_size=6,
    )
)
def test_load_settings_only_raises_config_error(env: dict[str, str]) -> None:
    try:
        load_settings(env)
    except ConfigError as exc:
        assert exc.problems
        for problem in exc.problems:
            assert problem.var.upper().startswith("MTLS_")
            assert problem.message
