"""Tests for proxy.identity: SPIFFE ID parsing and reading identities out of certificates."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.identity import (
    SpiffeId,
    describe_cert_der,
    parse_spiffe_id,
    parse_trust_domain,
    spiffe_id_from_der,
    svid_spiffe_id,
)

_KEY = ec.generate_private_key(ec.SECP256R1())
_NOT_AFTER = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)


def make_der(
    uris: list[str], *, dns: list[str] | None = None, cn: str = "leaf", ca: bool | None = None
) -> bytes:
    """A self-signed-looking leaf (issued by 'CN=Other CA') with the given URI SANs, and
    basicConstraints CA:`ca` unless `ca` is None."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Other CA")]))
        .public_key(_KEY.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime(2020, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(_NOT_AFTER)
    )
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns or []]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca, None), critical=True)
    cert = builder.sign(_KEY, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.DER)


GOOD_IDS = [
    ("spiffe://corp.example", SpiffeId("corp.example", "")),
    ("spiffe://corp.example/ns/shop/sa/web", SpiffeId("corp.example", "/ns/shop/sa/web")),
    ("SPIFFE://td/a", SpiffeId("td", "/a")),
    ("Spiffe://td/A.b-c_D", SpiffeId("td", "/A.b-c_D")),
    ("spiffe://a_b-c.9/x/..y/.z", SpiffeId("a_b-c.9", "/x/..y/.z")),
    ("spiffe://td/" + "a" * 2030, SpiffeId("td", "/" + "a" * 2030)),
]


@pytest.mark.parametrize(("text", "expected"), GOOD_IDS)
def test_parse_good_ids(text: str, expected: SpiffeId) -> None:
    sid = parse_spiffe_id(text)
    assert sid == expected
    assert parse_spiffe_id(str(sid)) == sid


BAD_IDS = [
    ("", "empty"),
    ("corp.example/x", "does not start with 'spiffe://'"),
    ("https://corp.example/x", "scheme 'https'"),
    ("spiffe://", "no trust domain"),
    ("spiffe:///x", "no trust domain"),
    ("spiffe://Corp.example/x", "upper-case"),
    ("spiffe://td:443/x", "port"),
    ("spiffe://user@td/x", "user info"),
    ("spiffe://td/x?y=1", "query"),
    ("spiffe://td/x#frag", "fragment"),
    ("spiffe://td/x%20y", "percent-encoded"),
    ("spiffe://td/", "trailing slash"),
    ("spiffe://td/a/", "trailing slash"),
    ("spiffe://td//a", "empty path segment"),
    ("spiffe://td/a/./b", "'.' path segment"),
    ("spiffe://td/a/..", "'..' path segment"),
    ("spiffe://td/a b", "' '"),
    ("spiffe://td/a*", "'*'"),
    ("spiffe://t d/a", "' '"),
    ("spiffe://td/" + "a" * 2040, "longer than 2048"),
    ("spiffe://" + "a" * 256, "at most 255"),
]


@pytest.mark.parametrize(("text", "fragment"), BAD_IDS)
def test_parse_bad_ids(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_spiffe_id(text)
    assert fragment in str(info.value)


def test_str_and_order() -> None:
    a = parse_spiffe_id("spiffe://td/a")
    b = parse_spiffe_id("spiffe://td/b")
    assert str(a) == "spiffe://td/a"
    assert str(SpiffeId("td")) == "spiffe://td"
    assert sorted([b, a]) == [a, b]
    assert len({a, parse_spiffe_id("spiffe://td/a")}) == 1


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("spiffe://td", "bare trust domain"),
        ("TD", "upper-case"),
        ("td:1", "port"),
        ("u@td", "user info"),
        ("td/x", "'/'"),
    ],
)
def test_parse_trust_domain_bad(text: str, fragment: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_trust_domain(text)
    assert fragment in str(info.value)


def test_parse_trust_domain_good() -> None:
    assert parse_trust_domain("corp.example") == "corp.example"


@pytest.mark.parametrize(
    ("uris", "expected"),
    [
        (["spiffe://td/ns/a/sa/b"], SpiffeId("td", "/ns/a/sa/b")),
        (["https://example.com", "spiffe://td/x"], None),  # an extra URI SAN
        ([], None),
        (["https://example.com"], None),
        (["spiffe://td/a", "spiffe://td/b"], None),
        (["spiffe://td/a/"], None),
    ],
)
def test_spiffe_id_from_der(uris: list[str], expected: SpiffeId | None) -> None:
    assert spiffe_id_from_der(make_der(uris, dns=["web.local"])) == expected


@pytest.mark.parametrize(
    ("uris", "ca", "message"),
    [
        (["spiffe://td/a"], False, None),
        (["spiffe://td/a"], None, None),
        ([], None, "has no URI SAN, so no SPIFFE ID; an X509-SVID has exactly one URI SAN"),
        (
            ["https://x.example"],
            None,
            "has no spiffe:// URI SAN, only 'https://x.example'; an X509-SVID has exactly one "
            "URI SAN, its SPIFFE ID",
        ),
        (
            ["spiffe://td/a", "spiffe://td/b"],
            None,
            "has 2 SPIFFE IDs ('spiffe://td/a', 'spiffe://td/b'); an X509-SVID has exactly "
            "one URI SAN",
        ),
        (
            ["spiffe://td/a", "https://x.example"],
            None,
            "has URI SANs besides its SPIFFE ID ('spiffe://td/a', 'https://x.example'); an "
            "X509-SVID has exactly one URI SAN",
        ),
        (
            ["spiffe://Corp.Example/svc"],
            None,
            "has an invalid SPIFFE ID: 'spiffe://Corp.Example/svc': the trust domain "
            "'Corp.Example' contains 'C' (upper-case letters are not allowed); only lower-case "
            "letters, digits, '.', '-' and '_' are allowed",
        ),
        (
            ["spiffe://td.example/ns/api/sa/api/"],
            None,
            "has an invalid SPIFFE ID: 'spiffe://td.example/ns/api/sa/api/' ends with '/'; "
            "drop the trailing slash",
        ),
        (
            ["spiffe://td/a"],
            True,
            "is a CA certificate (basicConstraints CA:TRUE); an X509-SVID leaf is not",
        ),
        (
            ["spiffe://td/a", "spiffe://td/b"],
            True,
            "has 2 SPIFFE IDs ('spiffe://td/a', 'spiffe://td/b'); an X509-SVID has exactly "
            "one URI SAN; is a CA certificate (basicConstraints CA:TRUE); an X509-SVID leaf "
            "is not",
        ),
    ],
)
def test_x509_svid_rules(uris: list[str], ca: bool | None, message: str | None) -> None:
    """One set of rules for our own leaf (svid_spiffe_id) and for peers (spiffe_id_from_der)."""
    der = make_der(uris, ca=ca)
    cert = x509.load_der_x509_certificate(der)
    if message is None:
        assert svid_spiffe_id(cert) == parse_spiffe_id(uris[0]) == spiffe_id_from_der(der)
        return
    with pytest.raises(ValueError) as info:
        svid_spiffe_id(cert)
    assert str(info.value) == message
    assert spiffe_id_from_der(der) is None


def test_spiffe_id_from_der_garbage_and_cache() -> None:
    assert spiffe_id_from_der(b"not a certificate") is None
    der = make_der(["spiffe://td/cached"])
    before = spiffe_id_from_der.cache_info().hits
    assert spiffe_id_from_der(der) == spiffe_id_from_der(der)
    assert spiffe_id_from_der.cache_info().hits > before
    assert spiffe_id_from_der.cache_info().maxsize == 4096


def test_describe_cert_der() -> None:
    der = make_der(["spiffe://x/y"])
    assert describe_cert_der(der) == (
        "certificate for spiffe://x/y issued by 'CN=Other CA', "
        "valid until 2030-01-01T00:00:00+00:00"
    )


@pytest.mark.parametrize(
    ("uris", "fragment"),
    [
        ([], "subject 'CN=web' (has no URI SAN, so no SPIFFE ID;"),
        (["spiffe://td/a", "spiffe://td/b"], "2 SPIFFE IDs"),
        (["spiffe://TD/a"], "invalid SPIFFE ID"),
    ],
)
def test_describe_cert_der_without_one_id(uris: list[str], fragment: str) -> None:
    text = describe_cert_der(make_der(uris, cn="web"))
    assert fragment in text
    assert "issued by 'CN=Other CA'" in text


def test_describe_garbage() -> None:
    assert describe_cert_der(b"xyz") == "unparseable certificate (3 bytes)"
