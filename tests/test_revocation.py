"""proxy/revocation.py: CRLs checked against trusted issuers, all or nothing; table tests."""

from __future__ import annotations

import base64
import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.ca.crl import Revoked, build_crl, crl_bundle_pem
from proxy.ca.issuer import Issuer, issue_leaf, make_intermediate, make_root, new_key
from proxy.revocation import EMPTY, CrlRejected, load_crls

pytestmark = pytest.mark.unit

TD = "corp.example"
WEB = "spiffe://corp.example/ns/shop/sa/web"
NOW = dt.datetime.now(dt.UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def pki() -> dict[str, Issuer]:
    # Dated from NOW (fixed at import), which the tests pass as the time of checking.
    root = make_root(TD, 1, now=NOW)
    inter = make_intermediate(TD, 1, root, now=NOW)
    other_root = make_root(TD, 9, now=NOW)
    # same subject name as `inter`, another key: what a forger would make
    impostor = make_intermediate(TD, 1, other_root, now=NOW)
    return {"root": root, "inter": inter, "other_root": other_root, "impostor": impostor}


def _leaf(issuer: Issuer) -> x509.Certificate:
    return issue_leaf(issuer, new_key().public_key(), spiffe_id=WEB)


def _pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def _crl(issuer: Issuer, serials: list[int], *, now: dt.datetime = NOW, number: int = 1) -> bytes:
    entries = [Revoked(s, now - dt.timedelta(minutes=1), "keyCompromise") for s in serials]
    return _pem(build_crl(issuer, entries, number=number, now=now))


def test_good_crl_with_its_intermediate_checked_against_the_root(pki: dict[str, Issuer]) -> None:
    inter = pki["inter"]
    revoked, kept = _leaf(inter), _leaf(inter)
    crl = build_crl(
        inter,
        [Revoked(revoked.serial_number, NOW, "keyCompromise")],
        number=7,
        now=NOW,
    )
    pem = crl_bundle_pem([crl], [inter.cert])
    rl = load_crls(pem, [pki["root"].cert], now=NOW)
    assert rl.is_revoked(revoked) and not rl.is_revoked(kept)
    assert rl.is_revoked(revoked.serial_number, inter.cert.subject)
    # the same serial from another issuer is another certificate
    assert not rl.is_revoked(revoked.serial_number, pki["root"].cert.subject)
    assert len(rl) == 1 and not rl.stale
    (info,) = rl.crls
    assert info.number == 7 and info.revoked == 1
    assert rl.next_update == NOW + dt.timedelta(hours=24)
    assert rl.this_update is not None and rl.this_update <= NOW
    # the intermediate itself as trusted issuer, CRL alone: also fine
    assert load_crls(_pem(crl), [inter.cert], now=NOW).is_revoked(revoked)
    assert not EMPTY.is_revoked(revoked) and EMPTY.next_update is None


def test_expired_crl_is_accepted_but_stale(pki: dict[str, Issuer]) -> None:
    old = NOW - dt.timedelta(days=2)
    rl = load_crls(_crl(pki["inter"], [5], now=old), [pki["inter"].cert], now=NOW)
    assert rl.stale and rl.next_update is not None and rl.next_update < NOW
    assert rl.is_revoked(5, pki["inter"].cert.subject)


def _cases(pki: dict[str, Issuer]) -> list[tuple[str, bytes, list[x509.Certificate], str]]:
    inter, root, impostor = pki["inter"], pki["root"], pki["impostor"]
    good = _crl(inter, [3])
    forged = _crl(impostor, [3])  # the right issuer name, signed by another key
    future = _crl(inter, [3], now=NOW + dt.timedelta(hours=1))
    bad_base64 = b"-----BEGIN X509 CRL-----\nnot base64 at all\n-----END X509 CRL-----\n"
    key_pem = new_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    leaf_pem = _leaf(inter).public_bytes(serialization.Encoding.PEM)
    delta = _pem(
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter.cert.subject)
        .last_update(NOW)
        .next_update(NOW + dt.timedelta(hours=1))
        .add_extension(x509.DeltaCRLIndicator(1), critical=True)
        .sign(inter.key, hashes.SHA256())
    )
    return [
        ("forged (signed by another key)", forged, [inter.cert], "signature does not verify"),
        ("untrusted issuer", good, [pki["other_root"].cert], "not from an issuer we trust"),
        (
            "impostor intermediate beside it",
            crl_bundle_pem([x509.load_pem_x509_crl(forged)], [impostor.cert]),
            [root.cert],
            "not signed by a trusted root",
        ),
        ("a leaf beside it", good + leaf_pem, [root.cert], "not a CA that signs CRLs"),
        ("garbage", b"hello, world", [inter.cert], "no CRL found"),
        ("empty", b"", [inter.cert], "no CRL found"),
        ("bad base64", bad_base64, [inter.cert], "cannot be parsed"),
        ("a private key inside", good + key_pem, [inter.cert], "unexpected PEM block"),
        ("dated in the future", future, [inter.cert], "in the future"),
        ("delta CRL", delta, [inter.cert], "delta CRL"),
        # all or nothing: one good CRL does not carry a forged one
        ("good then forged", good + forged, [inter.cert], "CRL 2"),
    ]


@pytest.mark.parametrize("index", range(11))
def test_bad_crls_are_refused_with_a_reason(pki: dict[str, Issuer], index: int) -> None:
    cases = _cases(pki)
    assert len(cases) == 11
    name, pem, trusted, words = cases[index]
    with pytest.raises(CrlRejected) as caught:
        load_crls(pem, trusted, now=NOW)
    assert words in str(caught.value), name


def test_string_input_and_several_issuers(pki: dict[str, Issuer]) -> None:
    inter = pki["inter"]
    second = make_intermediate(TD, 2, pki["root"], now=NOW)
    pem = (_crl(inter, [11]) + _crl(second, [12])).decode()
    rl = load_crls(pem, [inter.cert, second.cert], now=NOW)
    assert rl.is_revoked(11, inter.cert.subject) and rl.is_revoked(12, second.cert.subject)
    assert not rl.is_revoked(12, inter.cert.subject)
    with pytest.raises(TypeError):
        rl.is_revoked(11)


_ROOT = make_root(TD, 1, now=NOW)
_INTER = make_intermediate(TD, 1, _ROOT, now=NOW)
_GOOD = crl_bundle_pem(
    [build_crl(_INTER, [Revoked(99, NOW, "superseded")], number=1, now=NOW)], [_INTER.cert]
)
_GOOD_DER = x509.load_pem_x509_crl(_GOOD.split(b"-----BEGIN CERTIFICATE")[0]).public_bytes(
    serialization.Encoding.DER
)


def _only_crl_rejected(pem: bytes) -> None:
    try:
        rl = load_crls(pem, [_ROOT.cert], now=NOW)
    except CrlRejected as exc:
        assert str(exc)
        return
    assert all(c.issuer == _INTER.cert.subject.rfc4514_string() for c in rl.crls)


@settings(deadline=None, max_examples=300)
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4))
def test_mutated_crls_are_refused_or_still_genuine(edits: list[tuple[int, int]]) -> None:
    der = bytearray(_GOOD_DER)
    for pos, value in edits:
        der[pos % len(der)] = value
    body = base64.encodebytes(bytes(der))
    _only_crl_rejected(b"-----BEGIN X509 CRL-----\n" + body + b"-----END X509 CRL-----\n")


@settings(deadline=None, max_examples=300)
@given(data=st.binary(max_size=300), text=st.text(max_size=100))
def test_arbitrary_input_is_refused(data: bytes, text: str) -> None:
    _only_crl_rejected(data)
    _only_crl_rejected(text.encode())
    _only_crl_rejected(b"-----BEGIN X509 CRL-----\n" + data + b"\n-----END X509 CRL-----\n")


def test_a_crl_of_an_unknown_version_is_refused() -> None:
    der = _GOOD_DER.replace(b"\x02\x01\x01", b"\x02\x01\x07", 1)  # version v2 -> "v8"
    body = base64.encodebytes(der)
    with pytest.raises(CrlRejected, match="CRL 1 cannot be parsed"):
        load_crls(b"-----BEGIN X509 CRL-----\n" + body + b"-----END X509 CRL-----\n", [_ROOT.cert])


@settings(deadline=None, max_examples=200)
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=4))
def test_mutated_intermediates_beside_the_crl_are_refused_or_genuine(
    edits: list[tuple[int, int]],
) -> None:
    der = bytearray(_INTER.cert.public_bytes(serialization.Encoding.DER))
    for pos, value in edits:
        der[pos % len(der)] = value
    crl_part = _GOOD.split(b"-----BEGIN CERTIFICATE")[0]
    cert = b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(bytes(der))
    _only_crl_rejected(crl_part + cert + b"-----END CERTIFICATE-----\n")
