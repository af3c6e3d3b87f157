"""Tests for proxy.policy: SPIFFE ID patterns and the inbound/outbound identity checks."""

from __future__ import annotations

import pytest

from proxy.errors import PolicyDenied
from proxy.identity import SpiffeId, parse_spiffe_id
from proxy.policy import (
    InboundPolicy,
    SpiffePattern,
    check_outbound,
    parse_pattern,
    parse_patterns,
)


def sid(text: str) -> SpiffeId:
    return parse_spiffe_id(text)


MATCHES = [
    # pattern, id, matches?
    ("spiffe://td", "spiffe://td", True),
    ("spiffe://td", "spiffe://td/a", False),
    ("spiffe://td/a", "spiffe://td/a", True),
    ("spiffe://td/a", "spiffe://td/a/b", False),
    ("spiffe://td/a", "spiffe://td/A", False),
    ("spiffe://td/a", "spiffe://other/a", False),
    ("spiffe://td/*", "spiffe://td/a", True),
    ("spiffe://td/*", "spiffe://td", False),
    ("spiffe://td/*", "spiffe://td/a/b", False),
    ("spiffe://td/**", "spiffe://td", True),
    ("spiffe://td/**", "spiffe://td/a", True),
    ("spiffe://td/**", "spiffe://td/a/b/c", True),
    ("spiffe://td/**", "spiffe://tdx/a", False),
    ("spiffe://td/ns/*/sa/web", "spiffe://td/ns/shop/sa/web", True),
    ("spiffe://td/ns/*/sa/web", "spiffe://td/ns/shop/sa/api", False),
    ("spiffe://td/ns/shop/*/**", "spiffe://td/ns/shop/sa", True),
    ("spiffe://td/ns/shop/*/**", "spiffe://td/ns/shop/sa/web/x", True),
    ("spiffe://td/ns/shop/*/**", "spiffe://td/ns/shop", False),
    ("spiffe://td/ns/shop/*/**", "spiffe://td/ns/shopping/sa", False),
    ("spiffe://td/a.b", "spiffe://td/aXb", False),  # '.' is literal, not a regex dot
    ("SPIFFE://td/a", "spiffe://td/a", True),
]


@pytest.mark.parametrize(("pattern", "identity", "expected"), MATCHES)
def test_matches(pattern: str, identity: str, expected: bool) -> None:
    assert parse_pattern(pattern).matches(sid(identity)) is expected
    policy = InboundPolicy([parse_pattern(pattern)], "unrelated")
    assert policy.allows(sid(identity)) is expected


BAD_PATTERNS = [
    ("", "empty"),
    ("spiffe://*/a", "trust domain may not be a wildcard"),
    ("spiffe://**", "trust domain may not be a wildcard"),
    ("spiffe://t*/a", "trust domain may not be a wildcard"),
    ("spiffe://td/**/a", "'**' may only be the last path segment"),
    ("spiffe://td/a*", "'*' must be a whole path segment"),
    ("spiffe://td/***", "'*' must be a whole path segment"),
    ("spiffe://td/a/", "trailing slash"),
    ("spiffe://td//*", "empty path segment"),
    ("spiffe://td/../*", "'..' path segment"),
    ("td/*", "does not start with 'spiffe://'"),
    ("spiffe://TD/*", "upper-case"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_PATTERNS)
def test_bad_patterns(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_pattern(text)
    assert fragment in str(info.value)


def test_pattern_text_is_canonical_and_round_trips() -> None:
    pattern = parse_pattern("SPIFFE://td/ns/*/**")
    assert pattern.text == "spiffe://td/ns/*/**"
    assert str(pattern) == pattern.text
    assert parse_pattern(str(pattern)) == pattern
    assert pattern == SpiffePattern("spiffe://td/ns/*/**")
    assert pattern.trust_domain == "td"


def test_parse_patterns_list() -> None:
    patterns = parse_patterns(" spiffe://td/a , spiffe://td/b/**,")
    assert [p.text for p in patterns] == ["spiffe://td/a", "spiffe://td/b/**"]
    assert parse_patterns("") == []


def test_inbound_default_is_same_trust_domain() -> None:
    policy = InboundPolicy([], "corp.example")
    policy.check(sid("spiffe://corp.example/anything/at/all"))
    with pytest.raises(PolicyDenied) as info:
        policy.check(sid("spiffe://other.example/x"))
    assert info.value.reason == "peer_not_allowed"
    assert "not in trust domain corp.example" in str(info.value)


def test_inbound_patterns() -> None:
    policy = InboundPolicy(
        [parse_pattern("spiffe://corp.example/ns/shop/*/**"), parse_pattern("spiffe://o.ex/db")],
        "corp.example",
    )
    policy.check(sid("spiffe://corp.example/ns/shop/sa/web"))
    policy.check(sid("spiffe://o.ex/db"))  # another trust domain, named explicitly
    with pytest.raises(PolicyDenied) as info:
        policy.check(sid("spiffe://corp.example/ns/x/sa/y"))
    assert info.value.reason == "peer_not_allowed"
    assert str(info.value) == (
        "peer identity spiffe://corp.example/ns/x/sa/y is not in MTLS_ALLOW_PEERS "
        "(spiffe://corp.example/ns/shop/*/**, spiffe://o.ex/db)"
    )


def test_inbound_no_identity() -> None:
    with pytest.raises(PolicyDenied) as info:
        InboundPolicy([], "td").check(None)
    assert info.value.reason == "bad_cert"
    assert str(info.value) == (
        "peer certificate is not a valid X509-SVID (that is: exactly one URI SAN, a valid "
        "SPIFFE ID, not a CA)"
    )


OUTBOUND = [
    # peer, expected, trust domain, error reason or None
    ("spiffe://td/db", "spiffe://td/db", "td", None),
    ("spiffe://td/db", None, "td", None),
    ("spiffe://other/db", "spiffe://other/db", "td", None),
    ("spiffe://td/web", "spiffe://td/db", "td", "identity_mismatch"),
    ("spiffe://other/db", None, "td", "identity_mismatch"),
    (None, "spiffe://td/db", "td", "bad_cert"),
    (None, None, "td", "bad_cert"),
]


@pytest.mark.parametrize(("peer", "expected", "trust_domain", "reason"), OUTBOUND)
def test_check_outbound(
    peer: str | None, expected: str | None, trust_domain: str, reason: str | None
) -> None:
    peer_id = sid(peer) if peer else None
    expected_id = sid(expected) if expected else None
    if reason is None:
        check_outbound(peer_id, expected_id, trust_domain)
        return
    with pytest.raises(PolicyDenied) as info:
        check_outbound(peer_id, expected_id, trust_domain)
    assert info.value.reason == reason


def test_check_outbound_message() -> None:
    with pytest.raises(PolicyDenied) as info:
        check_outbound(sid("spiffe://td/web"), sid("spiffe://td/db"), "td")
    assert str(info.value) == "remote presented spiffe://td/web but spiffe://td/db was expected"
